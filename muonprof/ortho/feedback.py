"""Updates that keep the spectral tail: each step reports what it applied, so the momentum keeps the rest.

Two approximations whose one-step accuracy understates them (DESIGN.md, "Approximations that keep the
tail"): a rank-r update with *error feedback* (Dion, microsoft/dion) and *subset* orthogonalization
(Dion2 / NorDion2, arXiv 2512.16928). Both change the momentum rule; ``applied_update`` returns, beside
the update O, the part A of the momentum X that O applied, and the optimizer (and bench's multi-step
accuracy, through ``optim.momentum_rules``) keeps ``X - (1 - mu) A``:

- error feedback (``lowrank`` / ``rsvd`` with ``error_feedback``): A = Q Q^T X, the projection of the
  momentum on the short-side basis Q the rank-r update was built from (X Q Q^T for a tall matrix).
- ``subset``: O is zero except on the ceil(f x long side) rows (columns, for a wide matrix) of U with the
  largest norms, where it is ``core``'s orthogonalization of that submatrix; A is X on those rows, zero
  elsewhere.
- everything else applies the whole space: A = X.

Why the long side: the submatrix k x short keeps the full short side, so with k >= short it can still
reach full rank, and a fraction of the long side is a fraction of the rows an FSDP shard or a dense
layer has most of.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import OrthoConfig
from .exact import svd_polar
from .gram import configured_newton_schulz, configured_newton_schulz_flops
from .lowrank import Generators, lowrank_with_basis, rsvd_with_basis


def subset_size(shape: tuple[int, ...], fraction: float) -> int:
    """How many long-side rows a subset step orthogonalizes: ceil(fraction x long side), at least 1."""
    long = max(shape[-2], shape[-1])
    return max(1, min(long, math.ceil(fraction * long - 1e-9)))


def _as_tall_batch(G: Tensor) -> tuple[Tensor, bool, bool]:
    """``G`` as ``(B, long, short)``: rows are the long side. Returns (X, transposed, squeezed)."""
    squeeze = G.ndim == 2
    X = G.unsqueeze(0) if squeeze else G
    wide = X.size(-2) < X.size(-1)
    return (X.mT if wide else X), wide, squeeze


def _back(X: Tensor, transposed: bool, squeeze: bool) -> Tensor:
    if transposed:
        X = X.mT
    return X.squeeze(0) if squeeze else X


def _core(sub: Tensor, config: OrthoConfig) -> Tensor:
    """The selected submatrix orthogonalized by the config's core (its Newton-Schulz settings, or SVD)."""
    if config.core == "svd":
        return svd_polar(sub).to(config.torch_dtype)
    return configured_newton_schulz(sub, config)


def subset_rows(U: Tensor, fraction: float) -> Tensor:
    """Indices ``(B, k)`` of the long-side rows of the tall-oriented ``U`` (``(B, long, short)``) with the
    largest norms (topk on the device: no host sync)."""
    k = subset_size(tuple(U.shape), fraction)
    norms = torch.linalg.vector_norm(U.float(), dim=-1)
    return torch.topk(norms, k, dim=-1, sorted=False).indices


def subset_parts(U: Tensor, config: OrthoConfig) -> tuple[Tensor, Tensor, bool, bool]:
    """The subset update in tall orientation ``(B, long, short)``, the selected row indices ``(B, k)``, and how
    to orient back (transposed, squeezed)."""
    if config.method != "subset" or config.fraction is None:
        raise ValueError("subset_parts needs a config with method 'subset' and a fraction")
    T, transposed, squeeze = _as_tall_batch(U)
    idx = subset_rows(T, config.fraction)
    gather = idx.unsqueeze(-1).expand(-1, -1, T.size(-1))
    sub = torch.take_along_dim(T, idx.unsqueeze(-1), dim=-2)
    O_sub = _core(sub, config)
    O = torch.zeros(T.shape, dtype=O_sub.dtype, device=T.device).scatter_(-2, gather, O_sub)
    return O, idx, transposed, squeeze


def subset_orthogonalize(G: Tensor, config: OrthoConfig) -> Tensor:
    """The subset update of ``G`` (same shape): zero outside the selected long-side rows."""
    O, _, transposed, squeeze = subset_parts(G, config)
    return _back(O, transposed, squeeze)


def _project(X: Tensor, Q: Tensor) -> Tensor:
    """Q Q^T X on the short side (``Q``: ``(B, short, r)``), in X's orientation and dtype."""
    squeeze = X.ndim == 2
    Xb = (X.unsqueeze(0) if squeeze else X).float()
    tall = Xb.size(-2) > Xb.size(-1)
    W = Xb.mT if tall else Xb
    A = Q @ (Q.mT @ W)
    A = A.mT if tall else A
    return (A.squeeze(0) if squeeze else A).to(X.dtype)


def applied_update(U: Tensor, X: Tensor, config: OrthoConfig, *, generator: Generators = None) -> tuple[Tensor, Tensor]:
    """(O, A): the update of the orthogonalizer input ``U`` and the part of the momentum ``X`` it applied.

    ``U`` and ``X`` have the same shape, ``(m, n)`` or ``(B, m, n)`` (U = X without Nesterov). O is what
    ``orthogonalize(U, config)`` returns, drawn from the same generator state; A is in X's dtype.
    """
    if config.method == "subset":
        O, idx, transposed, squeeze = subset_parts(U, config)
        T = _as_tall_batch(X)[0]
        mask = torch.zeros(T.shape[:-1], dtype=T.dtype, device=T.device).scatter_(-1, idx, 1.0)
        return _back(O, transposed, squeeze), _back(T * mask.unsqueeze(-1), transposed, squeeze)
    if config.error_feedback and config.method == "lowrank":
        O, Q = lowrank_with_basis(U, config, generator)
        return O, (X if Q is None else _project(X, Q))
    if config.error_feedback and config.method == "rsvd":
        O, Q = rsvd_with_basis(U, config, generator)
        return O, _project(X, Q)
    from . import orthogonalize  # the package entry point (a cycle at import time)

    return orthogonalize(U, config, generator=generator), X


def subset_flops(m: int, n: int, config: OrthoConfig) -> float:
    """Matmul flops of one subset step: Newton-Schulz (or an SVD) on the k x short submatrix."""
    k = subset_size((m, n), config.fraction or 1.0)
    short = min(m, n)
    if config.core == "svd":
        from .exact import svd_flops

        return svd_flops(k, short)
    return configured_newton_schulz_flops(k, short, config)


def feedback_flops(m: int, n: int, config: OrthoConfig) -> float:
    """Extra matmul flops of error feedback's projection Q (Q^T X): 4 m n r."""
    return 4.0 * m * n * (config.rank or min(m, n)) if config.error_feedback else 0.0
