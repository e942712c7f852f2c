"""The exact polar factor via SVD: the reference every other orthogonalizer is measured against.

For a rank-deficient G the polar factor is not unique; we return the partial isometry U_r V_r^T over
the numerically non-zero singular values, which is the limit every odd polynomial iteration converges
to (a zero singular value stays zero), so comparisons against it are fair. A zero matrix maps to zero.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _svd_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def numerical_rank_mask(S: Tensor, m: int, n: int) -> Tensor:
    """Which singular values count as non-zero: above max(m, n) * eps * s_max, LAPACK's usual rule."""
    tol = S[..., :1] * (max(m, n) * torch.finfo(S.dtype).eps)
    return tol < S


def svd_polar(G: Tensor) -> Tensor:
    """U_r V_r^T of ``G`` (``(m, n)`` or ``(B, m, n)``), computed in float32 (float64 stays float64)."""
    X = G.to(_svd_dtype(G.dtype))
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = numerical_rank_mask(S, X.size(-2), X.size(-1)).to(X.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


def svd_flops(m: int, n: int) -> float:
    """Rough flop count of a thin SVD plus the U V^T product (Kim & Oh's Appendix E: 4 m^2 n + 8 m^3)."""
    s, long = min(m, n), max(m, n)
    return float(4 * s * s * long + 8 * s**3 + 2 * s * s * long)
