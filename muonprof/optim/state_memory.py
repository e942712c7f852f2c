"""What ProfiledMuon keeps between steps, per layer, predicted from the plan alone.

Bench and tune need the number before any optimizer exists (to price a candidate, to meet
``--state-memory-budget``); the optimizer's real state is checked against these formulas by the tests,
so the prediction and ``optimizer_state_bytes`` of a live optimizer agree to the byte.

Per Muon layer of matrix shape (m, n) and element size e:

- ``ema`` (torch.optim.Muon): one m x n momentum buffer: ``m n e``. Error feedback and subset keep the same
  one buffer (holding E of ``optim.momentum_rules``), so the same bytes.
- ``momentum_rank = r``: factors U (m x r), S (r), V (n x r): ``(m + n + 1) r e``.
- ``storm``: adds the previous parameters (the same numel as the layer) for the second gradient; with
  ``momentum_rank`` the previous iterate is rebuilt from the factors instead, for 3 numbers.
- every layer: a float32 step counter (4 bytes).

AdamW layers: ``exp_avg`` and ``exp_avg_sq`` (2 x numel x e) and a float32 step (4 bytes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from pydantic import ByteSize, TypeAdapter, ValidationError

from ..lr_rules import matrix_shape
from ..profile import LayerPlan

STEP_COUNTER_BYTES = 4


def momentum_numel(shape: Sequence[int], momentum_rank: int | None = None) -> int:
    """Numbers in one Muon layer's momentum: the full buffer, or its rank-r factors."""
    if momentum_rank is None:
        return math.prod(shape)
    m, n = matrix_shape(tuple(shape))
    return (m + n + 1) * momentum_rank


def muon_state_bytes(
    shape: Sequence[int],
    *,
    momentum: str = "ema",
    momentum_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes one Muon layer keeps between steps (momentum, STORM's previous parameters, step counter)."""
    element = torch.empty((), dtype=dtype).element_size()
    numel = momentum_numel(shape, momentum_rank)
    extra = 0
    if momentum == "storm" and momentum_rank is None:
        numel += math.prod(shape)
    elif momentum == "storm":
        extra = 3 * element  # [lr step, decay, moved] to rebuild the previous iterate
    return numel * element + STEP_COUNTER_BYTES + extra


def adamw_state_bytes(shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one AdamW-routed parameter keeps: two moments and a step counter."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * math.prod(shape) * element + STEP_COUNTER_BYTES


def plan_state_bytes(plan: LayerPlan, dtype: torch.dtype = torch.float32) -> int:
    """Predicted optimizer state of one parameter under its resolved plan."""
    if plan.optimizer == "adamw":
        return adamw_state_bytes(plan.shape, dtype=dtype)
    return muon_state_bytes(plan.shape, momentum=plan.momentum, momentum_rank=plan.momentum_rank, dtype=dtype)


def plans_state_bytes(plans: Iterable[LayerPlan], dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Predicted state split into ``muon``, ``adamw`` and ``total`` bytes."""
    muon = adamw = 0
    for plan in plans:
        if plan.optimizer == "adamw":
            adamw += plan_state_bytes(plan, dtype)
        else:
            muon += plan_state_bytes(plan, dtype)
    return {"muon": muon, "adamw": adamw, "total": muon + adamw}


def parse_bytes(text: str) -> int:
    """``"512MB"``, ``"1.5GiB"``, ``"2e9"`` or ``"750k"`` as a byte count (decimal k/M/G, binary Ki/Mi/Gi).

    Sizes with a unit are pydantic's ``ByteSize`` (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB, ...); a bare number (also
    in exponent form) is bytes, and a bare k/M/G/T prefix means kB/MB/GB/TB, as before ByteSize parsed them.
    """
    raw = text.strip().replace(" ", "")
    if raw.startswith("-"):
        raise ValueError(f"a size must be a positive number of bytes, got {text!r}")
    try:
        value = float(raw)
    except ValueError:
        sized = raw + "B" if raw[-1:].lower() in ("k", "m", "g", "t") else raw
        try:
            value = float(TypeAdapter(ByteSize).validate_python(sized))
        except ValidationError:
            raise ValueError(
                f"not a size: {text!r} (examples: 512MB, 1.5GiB, 2e9; units B, kB, MB, GB, KiB, MiB, GiB)"
            ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a size must be a positive number of bytes, got {text!r}")
    return int(value)


def format_bytes(count: float) -> str:
    """Human-readable binary size: ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"
