"""Batched Newton-Schulz: odd polynomial iterations on X / ||X||_F.

With X = U diag(s) V^T, one step X <- a X + (b A + c A^2) X, A = X X^T, maps every singular value
s -> a s + b s^3 + c s^5 and leaves U, V alone; that is why ``spectral.py`` can predict the result from
singular values alone. The arithmetic below mirrors torch.optim.Muon (2.13) operation for operation
(bf16 cast, transpose to the short side, divide by max(||X||_F, eps), ``addmm`` with beta/alpha), batched
with ``baddbmm`` so that same-shape layers cost one kernel per product instead of one per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .schedules import Schedule, resolve_schedule


def newton_schulz(
    G: Tensor,
    *,
    steps: int = 5,
    coefficients: str | Sequence[Sequence[float]] = "jordan",
    dtype: torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
) -> Tensor:
    """Approximately orthogonalize ``G`` (``(m, n)`` or ``(B, m, n)``); returns the same shape in ``dtype``.

    The Gram matrix is formed on the short side (a tall input is transposed and transposed back), so
    each quintic step costs about 4 m^2 n + 2 m^3 flops with m = min(rows, cols).
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz expects (m, n) or (B, m, n), got shape {tuple(G.shape)}")
    schedule = resolve_schedule(coefficients)
    # A single matrix takes torch.optim.Muon's exact kernels (addmm); a batch takes baddbmm. `.to` may
    # return G itself when the dtype already matches; everything below is out of place, so the caller's
    # tensor (e.g. a momentum buffer) is never modified (torch 2.13 gets this wrong for bf16).
    fma = torch.addmm if G.ndim == 2 else torch.baddbmm
    X, tall = normalized_short_side(G, dtype, schedule, eps)
    for a, b, c in schedule.coefficients(steps):
        A = X @ X.mT
        if c == 0.0:
            # Cubic: X <- a X + b A X, one product fewer than the quintic form.
            X = fma(X, A, X, beta=a, alpha=b)
        else:
            B = fma(A, A, A, beta=b, alpha=c)
            X = fma(X, B, X, beta=a)
    return X.mT if tall else X


def normalized_short_side(G: Tensor, dtype: torch.dtype, schedule: Schedule, eps: float) -> tuple[Tensor, bool]:
    """``G`` cast to ``dtype``, short side first, divided by max(norm_scale x ||G||_F, eps); and whether it was
    transposed. Shared with Gram Newton-Schulz so that both iterate on the very same X."""
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    norm = frobenius_norm(X)
    if schedule.norm_scale != 1.0:
        norm = norm * schedule.norm_scale
    return X / norm.clamp(min=eps), tall


def frobenius_norm(X: Tensor) -> Tensor:
    """||X||_F over the last two dims (keepdim), exactly as torch.optim.Muon computes it.

    A Frobenius norm above ~1.8e19 overflows the sum of squares (fp32 and bf16 alike; entries of ~6e18 do it
    in a 96x48 matrix): the norm is inf and the orthogonalized update is zero for that matrix, never NaN.
    Guarding against it costs two extra passes over X (~+10% of a CPU step at GPT-2-small sizes,
    measured), too much for a case that is already a diverged run.
    """
    return torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)


def newton_schulz_flops(m: int, n: int, steps: int, cubic: bool = False) -> float:
    """Matmul flops of ``steps`` iterations on one m x n matrix (Gram on the short side)."""
    s, long = min(m, n), max(m, n)
    per_step = 2 * s * s * long * 2 + (0 if cubic else 2 * s**3)
    return float(per_step * steps)
