"""LiMuon's low-rank momentum: the momentum lives as randomized-SVD factors between steps.

Each step rebuilds the rank-r momentum M_hat = U diag(S) V^T as a transient, folds the new gradient in
(EMA or STORM), and compresses the result back with a randomized SVD (Halko-Martinsson-Tropp: Gaussian
sketch with ``MOMENTUM_OVERSAMPLE`` extra columns and ``MOMENTUM_POWER_ITERS`` re-orthogonalized power
passes). The update direction is the polar factor of the stored rank-r momentum, U V^T, which the
factors give for free: no Newton-Schulz on an m x n matrix at all.

Why power iterations when LiMuon's description has none: the momentum's tail is discarded every step,
so a poor subspace compounds; one pass (two extra m n l products) makes the captured subspace match the
exact truncated SVD closely on the decaying spectra measured by ``muonprof spectrum``.

Persistent state per layer: U (m x r), S (r,), V (n x r) in the parameter's dtype, i.e. (m + n + 1) r
numbers instead of m n. Everything is computed in float32 whatever that dtype is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ortho.config import OrthoConfig
from ..ortho.exact import numerical_rank_mask
from ..ortho.lowrank import Generators, rsvd_factors

MOMENTUM_OVERSAMPLE = 8
MOMENTUM_POWER_ITERS = 1


def compression_config(rank: int) -> OrthoConfig:
    """The randomized SVD used to compress a rank-``rank`` momentum (float32, power range finder)."""
    return OrthoConfig(
        method="rsvd",
        rank=rank,
        dtype="float32",
        range_finder="power",
        power_iters=MOMENTUM_POWER_ITERS,
        oversample=MOMENTUM_OVERSAMPLE,
    )


def compress(M: Tensor, rank: int, *, generator: Generators = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``rank`` factors (U ``(.., m, r)``, S ``(.., r)``, V ``(.., n, r)``) of ``M`` (``(m, n)`` or batched).

    In M's own orientation, float32. The sketch works on M / ||M||_F (so tiny and huge momenta behave
    alike) and S is scaled back (S overflows to inf only when M's singular values do). A zero M gives
    zero S (and a zero direction).
    """
    squeeze = M.ndim == 2
    X = (M.unsqueeze(0) if squeeze else M).float()
    # Scale by the largest entry first: ||X||_F itself overflows float32 once entries pass ~1e19.
    peak = X.abs().amax(dim=(-2, -1)).clamp(min=torch.finfo(torch.float32).tiny)
    X = X / peak[:, None, None]
    fro = torch.linalg.matrix_norm(X).clamp(min=torch.finfo(torch.float32).tiny)
    X = X / fro[:, None, None]
    norm = peak * fro
    tall = X.size(-2) > X.size(-1)
    U, S, Vh = rsvd_factors(X, compression_config(rank), generator)  # wide orientation
    S = S * norm[:, None]
    if tall:  # X = Vh^T S U^T: swap the roles back to M's orientation
        U, Vh = Vh.mT, U.mT
    V = Vh.mT
    if squeeze:
        return U[0], S[0], V[0]
    return U, S, V


def expand(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """The rank-r momentum U diag(S) V^T as a dense float32 matrix (a transient)."""
    return (U.float() * S.float().unsqueeze(-2)) @ V.float().mT


def polar_of_factors(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """U_r V_r^T over the numerically non-zero singular values: the exact polar factor of the factors."""
    keep = numerical_rank_mask(S.float(), U.size(-2), V.size(-2)).float()
    return (U.float() * keep.unsqueeze(-2)) @ V.float().mT


def compression_flops(m: int, n: int, rank: int) -> float:
    """Matmul flops of one compress + expand + direction (the step's low-rank momentum overhead)."""
    from ..ortho.lowrank import lowrank_flops

    expand_and_direction = 2 * 2.0 * m * n * rank
    return lowrank_flops(m, n, compression_config(rank)) + expand_and_direction
