"""The spectral model: what an orthogonalizer does to singular values, with scalar arithmetic only.

Newton-Schulz acts on singular values alone, NS(U diag(s) V^T) = U diag(p(s / ||s||_2)) V^T, so for a
captured spectrum we can predict the update's singular values, its error against the exact polar factor
and its descent quality for any schedule in microseconds, without a matmul. The quality measures are
defined here once (DESIGN.md) and reused by bench, tune and the tests:

- ``rel_err``   = ||O - U V^T||_F / ||U V^T||_F
- ``alignment`` = <G, O> / (||G||_* ||O||_op)  (1 for the exact polar factor; about the Ky Fan share
  sum_{i<=r} s_i / sum_i s_i for a rank-r partial isometry)

The model is exact in exact arithmetic; bf16 round-off is not modelled (bench measures that gap). Gram
Newton-Schulz (``gram``) is the same polynomial evaluated through the Gram matrix, so it gets the same
prediction; only its rounding differs (``ortho.gram``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .config import OrthoConfig
from .schedules import resolve_schedule


def _as_spectrum(s: Tensor | Sequence[float]) -> Tensor:
    t = torch.as_tensor(s, dtype=torch.float64)
    if t.ndim == 0:
        t = t.unsqueeze(0)
    return t.clamp(min=0)


def nonzero_mask(s: Tensor) -> Tensor:
    """Singular values that count as rank (same rule as ``exact.numerical_rank_mask``, in float64)."""
    top = s.max(dim=-1, keepdim=True).values
    return s > top * (s.size(-1) * torch.finfo(torch.float64).eps)


def ns_singular_values(
    s: Tensor | Sequence[float],
    *,
    steps: int = 5,
    coefficients: str | Sequence[Sequence[float]] = "jordan",
    eps: float = 1e-7,
) -> Tensor:
    """Singular values of Newton-Schulz's output for an input with singular values ``s`` (float64, ``(..., r)``)."""
    x = _as_spectrum(s)
    schedule = resolve_schedule(coefficients)
    fro = torch.linalg.vector_norm(x, dim=-1, keepdim=True) * schedule.norm_scale
    x = x / fro.clamp(min=eps)
    for a, b, c in schedule.coefficients(steps):
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x


def model_singular_values(s: Tensor | Sequence[float], config: OrthoConfig) -> Tensor:
    """Predicted singular values of ``config``'s output, aligned with the descending ``s``.

    For ``lowrank`` / ``rsvd`` this is the *ideal* subspace (the true top-r singular vectors): the
    randomized finders approach it, and bench measures how closely per layer. Column selection is not
    rotation invariant and is not modelled here at all.
    """
    x = _as_spectrum(s)
    x, _ = torch.sort(x, dim=-1, descending=True)
    keep = nonzero_mask(x)
    ns = dict(steps=config.ns_steps, coefficients=config.coefficients, eps=config.eps)
    if config.method == "svd":
        return keep.to(torch.float64)
    if config.method == "newton_schulz":
        return ns_singular_values(x, **ns)  # type: ignore[arg-type]
    short = x.size(-1)
    if config.method == "lowrank" and short <= config.full_below:
        return ns_singular_values(x, **ns)  # type: ignore[arg-type]
    r = min(config.rank or short, short)
    head = x[..., :r]
    if config.method == "rsvd" or config.core == "svd":
        out_head = keep[..., :r].to(torch.float64)
    else:
        # The low-rank path is scale-free: G is divided by ||G||_F before the core is formed (lowrank.py,
        # ``_unit_frobenius``), so ``eps`` only ever meets the core's norm ||head|| / ||s||, never ||head||.
        fro = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
        out_head = ns_singular_values(head / fro, **ns)  # type: ignore[arg-type]
    return torch.cat([out_head, torch.zeros_like(x[..., r:])], dim=-1)


def rel_err_from_spectrum(s: Tensor | Sequence[float], out: Tensor) -> Tensor:
    """||O - U V^T||_F / ||U V^T||_F when O = U diag(out) V^T, ``out`` aligned with ``s`` (zero G: ||O||_F)."""
    x = _as_spectrum(s)
    out = torch.as_tensor(out, dtype=torch.float64)
    target = nonzero_mask(x).to(torch.float64)
    err = torch.linalg.vector_norm(out - target, dim=-1)
    rank = target.sum(dim=-1)
    return torch.where(rank > 0, err / rank.clamp(min=1).sqrt(), err)


def alignment_from_spectrum(s: Tensor | Sequence[float], out: Tensor) -> Tensor:
    """<G, O> / (||G||_* ||O||_op) when O shares G's singular vectors; 0 when either side is zero."""
    x = _as_spectrum(s)
    out = torch.as_tensor(out, dtype=torch.float64)
    inner = (x * out).sum(dim=-1)
    denom = x.sum(dim=-1) * out.abs().max(dim=-1).values
    return torch.where(denom > 0, inner / denom.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(inner))


def predict(s: Tensor | Sequence[float], config: OrthoConfig) -> dict[str, float]:
    """``rel_err``, ``alignment`` and the output singular-value range of ``config`` on spectrum ``s``."""
    x, _ = torch.sort(_as_spectrum(s), dim=-1, descending=True)
    out = model_singular_values(x, config)
    keep = nonzero_mask(x)
    active = out[keep] if bool(keep.any()) else out
    return {
        "rel_err": float(rel_err_from_spectrum(x, out)),
        "alignment": float(alignment_from_spectrum(x, out)),
        "sv_min": float(active.min()),
        "sv_max": float(active.max()),
    }
