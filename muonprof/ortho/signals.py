"""Cheap quality signals of an orthogonalizer's output, measured while training (ladders, ``optim.ladder``).

Each signal is a quality in [0, 1], 1 for the exact polar factor, computed on the device from tensors the
step has anyway, plus at most a handful of matrix-vector products:

- range finders (``lowrank`` / ``rsvd`` without error feedback): the share of the input's energy the basis
  captured, ``captured_energy`` = ||Q^T X||_F^2 / ||X||_F^2 (Q is computed anyway). On the spectrum s of X and
  an ideal basis that is sum_{i<=r} s_i^2 / sum_i s_i^2, the *squared* Ky Fan share; stage 1's alignment of a
  rank-r update is about the plain share sum_{i<=r} s_i / sum_i s_i, which is never larger (for a descending
  s). ``predicted_signal`` gives the signal a recipe has on a captured spectrum: a floor is set from it, in
  the signal's own units, not copied from an alignment.
- error feedback / subset: the share of the momentum's mass the update applied, ``applied_share`` =
  ||A||_F^2 / ||X||_F^2 (A is an orthogonal projection of X: the Q Q^T X of error feedback, or X's selected
  rows); 1 minus it is the share left unapplied for later steps.
- Newton-Schulz: ``orthogonality_quality`` = 1 - ||O O^T - I||_F^2 / k on the short side k, estimated with a few
  Gaussian probes z: E ||(O O^T - I) z||^2 = sum_i (sigma_i^2 - 1)^2 (Hutchinson). It is 1 - the mean of
  (sigma_i^2 - 1)^2 over O's singular values sigma (clipped at 0): about the share of directions lifted to the
  unit band, the quantity Newton-Schulz trades for steps. Its spectral-model value is ``predicted_signal``.
- svd: 1 (exact).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .config import OrthoConfig
from .spectral import model_singular_values

PROBES = 4  # Gaussian probes per Newton-Schulz measurement: 2 x 4 matrix-vector products per layer


def _wide(X: Tensor) -> Tensor:
    """``X`` (``(m, n)`` or ``(B, m, n)``) as a batch with the short side first."""
    Xb = X.unsqueeze(0) if X.ndim == 2 else X
    return Xb.mT if Xb.size(-2) > Xb.size(-1) else Xb


def _share(part: Tensor, whole: Tensor) -> Tensor:
    """part / whole per matrix, 1 where whole is zero (a zero momentum is served exactly), clipped to [0, 1]."""
    return torch.where(whole > 0, part / whole.clamp(min=torch.finfo(whole.dtype).tiny), torch.ones_like(whole)).clamp(
        0.0, 1.0
    )


def captured_energy(X: Tensor, Q: Tensor | None) -> Tensor:
    """||Q^T X||_F^2 / ||X||_F^2 per matrix (float32, ``(B,)``); Q (``(B, short, r)``, orthonormal columns on X's
    short side) None means the whole space was applied (a ``full_below`` gate): 1."""
    W = _wide(X).float()
    if Q is None:
        return torch.ones(W.shape[0], dtype=torch.float32, device=W.device)
    whole = W.square().sum(dim=(-2, -1))
    part = (Q.float().mT @ W).square().sum(dim=(-2, -1))
    return _share(part, whole)


def applied_share(X: Tensor, A: Tensor) -> Tensor:
    """||A||_F^2 / ||X||_F^2 per matrix (float32, ``(B,)``): the share of the momentum X the update applied."""
    Xb = (X.unsqueeze(0) if X.ndim == 2 else X).float()
    Ab = (A.unsqueeze(0) if A.ndim == 2 else A).float().reshape(Xb.shape)
    return _share(Ab.square().sum(dim=(-2, -1)), Xb.square().sum(dim=(-2, -1)))


def orthogonality_quality(O: Tensor, generator: torch.Generator | None = None, probes: int = PROBES) -> Tensor:
    """1 - ||O O^T - I||_F^2 / k per matrix (float32, ``(B,)``, clipped to [0, 1]), estimated with ``probes``
    Gaussian vectors on the short side k: two thin products per probe block, no factorization."""
    W = _wide(O).float()
    batch, k, _ = W.shape
    Z = torch.randn(batch, k, probes, generator=generator, device=W.device, dtype=torch.float32)
    R = W @ (W.mT @ Z) - Z
    defect = R.square().sum(dim=(-2, -1)) / Z.square().sum(dim=(-2, -1)).clamp(min=1e-30)
    return (1.0 - defect).clamp(0.0, 1.0)


def signal_kind(config: OrthoConfig) -> str:
    """Which signal a recipe reports: ``exact``, ``energy`` (range finder), ``applied`` (error feedback /
    subset) or ``orthogonality`` (Newton-Schulz)."""
    if config.method == "svd":
        return "exact"
    if config.keeps_tail:
        return "applied"
    if config.method in ("lowrank", "rsvd"):
        return "energy"
    return "orthogonality"


def predicted_signal(s: Tensor | Sequence[float], config: OrthoConfig, shape: tuple[int, int] | None = None) -> float:
    """The signal ``config`` would report on a matrix with singular values ``s`` (descending), by the spectral
    model: what a floor is set from (e.g. by tune, from the spectrum the race accepted a recipe on).

    Range finders and error feedback: the ideal basis's energy share of the top ``rank`` values (the
    ``full_below`` gate applies the whole space). Subset: its rows' share is spectrum-free; ``fraction`` of the
    energy is the value for evenly spread rows. Newton-Schulz: 1 - mean((p(s)^2 - 1)^2) of the model's output.
    """
    x = torch.as_tensor(s, dtype=torch.float64).flatten().clamp(min=0)
    kind = signal_kind(config)
    if kind == "exact" or float(x.square().sum()) == 0.0:
        return 1.0
    if config.method == "subset":
        return float(config.fraction or 1.0)
    if kind in ("energy", "applied"):
        if config.method == "lowrank" and shape is not None and min(shape) <= config.full_below:
            return 1.0
        r = config.rank or x.numel()
        energy = x.square()
        return float(energy[:r].sum() / energy.sum())
    out = model_singular_values(x, config)
    return float((1.0 - (out.square() - 1.0).square().mean()).clamp(0.0, 1.0))
