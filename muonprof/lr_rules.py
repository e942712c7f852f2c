"""Learning-rate shape rules: how a layer's step size depends on the shape of the matrix it updates.

(A, B) = (fan_out, fan_in) of the matrix that is actually orthogonalized, so a conv weight is scaled by
its flattened (out, in*kh*kw) shape, not by its kernel dims (the reference Muon's conv bug).
"""

from __future__ import annotations

import math

LR_RULES: tuple[str, ...] = ("original", "match_rms_adamw", "spectral", "none")


def lr_rule_factor(rule: str, fan_out: int, fan_in: int) -> float:
    """The multiplier ``rule`` applies to the base lr for an (fan_out x fan_in) matrix.

    - ``original``: sqrt(max(1, A/B)), Keller Jordan's and torch.optim.Muon's default;
    - ``match_rms_adamw``: 0.2 sqrt(max(A, B)), Moonlight's, so Muon can reuse AdamW's lr;
    - ``spectral``: sqrt(A/B), the spectral-muP rule (shrinks wide matrices, unlike ``original``);
    - ``none``: 1.
    """
    a, b = fan_out, fan_in
    if rule == "original":
        return math.sqrt(max(1.0, a / b))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    if rule == "spectral":
        return math.sqrt(a / b)
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown lr_rule {rule!r} (known: {', '.join(LR_RULES)})")


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The (fan_out, fan_in) matrix Muon orthogonalizes: a conv weight is flattened to (out, in*kh*kw)."""
    cols = 1
    for d in shape[1:]:
        cols *= int(d)
    return int(shape[0]), cols
