"""Scalar summaries of a singular value spectrum: how much work an orthogonalizer has to do on it.

All take the singular values of one matrix (or a batch, last dimension) and compute in float64: spectra
span many decades and the sums below lose the small values in float32.

- stable rank ``||A||_F^2 / ||A||_2^2``: how many directions carry the energy, robust to tiny values;
- effective rank ``exp(H(p))`` with ``p_i = s_i / sum(s)`` (Roy & Vetterli 2007): the nuclear-norm analogue,
  and the one that matters for Muon because its update's descent is measured in nuclear norm (a rank-r
  orthogonalizer keeps about ``sum(s[:r]) / sum(s)`` of it, DESIGN.md's alignment);
- energy ranks: the smallest r holding q of ``sum(s^2)`` (Frobenius) and of ``sum(s)`` (nuclear);
- ``sv_min`` / ``sv_max`` of ``s / ||s||_2``: Newton-Schulz starts from ``X / ||X||_F``, so these are the
  values its polynomial must lift to ~1 (a tiny ``sv_min`` needs more steps or never gets there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

QUANTILES = (0.5, 0.9, 0.99)


def rank_holding(s: Tensor, fraction: float) -> Tensor:
    """Smallest r with ``sum(s[:r]) >= fraction * sum(s)`` along the last dim (0 for an all-zero spectrum)."""
    s = s.to(torch.float64)
    total = s.sum(-1, keepdim=True)
    cumulative = s.cumsum(-1)
    # A small relative slack so that a spectrum that reaches the fraction exactly (e.g. r equal values)
    # is not pushed one rank up by rounding in the cumulative sum.
    reached = cumulative >= fraction * total * (1 - 1e-12)
    r = reached.to(torch.int64).argmax(-1) + 1
    return torch.where(total.squeeze(-1) > 0, r, torch.zeros_like(r))


def spectrum_stats(s: Tensor) -> dict[str, Tensor]:
    """Per-matrix statistics of singular values ``s`` (shape (k,) or (B, k), any order)."""
    s = s.to(torch.float64).sort(-1, descending=True).values.clamp_min(0)
    k = s.shape[-1]
    frob2 = (s * s).sum(-1)
    nuclear = s.sum(-1)
    top = s[..., 0]
    nonzero = nuclear > 0
    safe = torch.where(nonzero, nuclear, torch.ones_like(nuclear))
    p = s / safe.unsqueeze(-1)
    entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(-1)
    norm = torch.where(nonzero, frob2.sqrt(), torch.ones_like(frob2))
    stats = {
        "stable_rank": torch.where(nonzero, frob2 / torch.where(nonzero, top * top, torch.ones_like(top)), 0.0),
        "effective_rank": torch.where(nonzero, entropy.exp(), 0.0),
        "numerical_rank": (s > top.unsqueeze(-1) * (k * torch.finfo(torch.float32).eps)).sum(-1).where(nonzero, 0),
        "sv_max": s[..., 0] / norm,
        "sv_min": s[..., -1] / norm,
        "frobenius": frob2.sqrt(),
        "nuclear": nuclear,
    }
    for q in QUANTILES:
        pct = round(q * 100)
        stats[f"energy_rank_{pct}"] = rank_holding(s * s, q)
        stats[f"nuclear_rank_{pct}"] = rank_holding(s, q)
    return stats


def stats_row(s: Tensor) -> dict[str, float | int]:
    """``spectrum_stats`` of one spectrum as plain Python numbers (for tables and JSON)."""
    out: dict[str, float | int] = {}
    for key, value in spectrum_stats(s).items():
        v = value.item()
        out[key] = int(v) if value.dtype == torch.int64 else (float(v) if math.isfinite(v) else float("nan"))
    return out
