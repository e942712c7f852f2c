"""Quality of an actual update O for an actual matrix G (batched), against the exact polar factor.

The same measures as ``spectral.py`` but on matrices, in float64: this is how the tests check every
orthogonalizer and how bench checks the spectral model against real (bf16) runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .exact import svd_polar


def rel_err(O: Tensor, G: Tensor) -> Tensor:
    """||O - polar(G)||_F / ||polar(G)||_F per matrix; for a zero G, ||O||_F (zero is the right answer)."""
    P = svd_polar(G.double())
    err = torch.linalg.matrix_norm(O.double() - P)
    ref = torch.linalg.matrix_norm(P)
    return torch.where(ref > 0, err / ref.clamp(min=1e-300), err)


def alignment(O: Tensor, G: Tensor) -> Tensor:
    """<G, O> / (||G||_* ||O||_op) per matrix; 0 where either is zero."""
    Gd, Od = G.double(), O.double()
    inner = (Gd * Od).sum(dim=(-2, -1))
    denom = torch.linalg.matrix_norm(Gd, ord="nuc") * torch.linalg.matrix_norm(Od, ord=2)
    return torch.where(denom > 0, inner / denom.clamp(min=1e-300), torch.zeros_like(inner))


def singular_range(O: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """(min, max) singular value of O per matrix, over its top ``rank`` values when given."""
    s = torch.linalg.svdvals(O.double())
    if rank is not None:
        s = s[..., :rank]
    return s.min(dim=-1).values, s.max(dim=-1).values


def matrix_with_spectrum(
    s: Tensor, m: int, n: int, *, batch: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """A float64 m x n matrix U diag(s) V^T with Haar-random U, V: a known spectrum for tests and bench."""
    s = torch.as_tensor(s, dtype=torch.float64)
    k = min(m, n)
    if s.numel() != k:
        raise ValueError(f"need min(m, n) = {k} singular values, got {s.numel()}")
    U, V = haar_factors(m, n, batch=batch, generator=generator)
    return (U * s) @ V.mT


def haar_factors(
    m: int, n: int, *, batch: int | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Haar-random U (m x k) and V (n x k), k = min(m, n), float64: ``matrix_with_spectrum``'s singular vectors
    (its polar factor is U V^T, so a caller that keeps them needs no SVD to score an update)."""
    k = min(m, n)
    shape = (batch,) if batch else ()

    def haar(rows: int) -> Tensor:
        Z = torch.randn(*shape, rows, k, dtype=torch.float64, generator=generator)
        Q, R = torch.linalg.qr(Z)
        return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)

    return haar(m), haar(n)
