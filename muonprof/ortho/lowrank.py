"""Low-rank orthogonalization (He, Deng, Lu 2025) and randomized SVD (LiMuon's orthogonalizer).

Both find Q (m x r, orthonormal columns) spanning G's leading left singular subspace and return a
rank-r partial isometry, at O(m n r) instead of the O(m^2 n) of full Newton-Schulz:

- ``lowrank``: Q . orth(Q^T G), where orth is Newton-Schulz or SVD on the small r x n core. Because Q
  has orthonormal columns, Q . polar(Q^T G) = polar(Q Q^T G): the exact polar factor of G's projection.
- ``rsvd``: Halko-Martinsson-Tropp randomized SVD, B = Q^T G = U_b S V^T, returning (Q U_b)_r V_r^T.

Every matrix is first oriented wide (short side first), as the reference code does, so that Q lives on
the short side. QR and the small SVD / eigendecomposition run in float32 whatever the compute dtype:
torch has no bf16 QR, and the reference code does its QR in float32 too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .config import OrthoConfig
from .exact import numerical_rank_mask, svd_polar
from .gram import configured_newton_schulz, configured_newton_schulz_flops
from .newton_schulz import frobenius_norm


def cholesky_qr(Y: Tensor, shift: float = 1e-6, passes: int = 3) -> Tensor:
    """Orthonormal columns spanning Y's range by shifted CholeskyQR3: passes of Y <- Y chol(Y^T Y + sI)^-T.

    Why: on a GPU batched Householder QR and eigh are slow (H100, 12 x 768 x 104: QR 5 ms, eigh 20 ms,
    Cholesky + triangular solve 0.17 ms), and they dominated the low-rank step. The later passes restore
    orthogonality to float32 level; the trace-relative shift keeps Cholesky defined when Y is rank
    deficient (those directions come out as near-zero columns, which contribute nothing downstream).
    """
    Y = Y.float()
    eye = torch.eye(Y.size(-1), device=Y.device, dtype=Y.dtype)
    for _ in range(passes):
        gram = Y.mT @ Y
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=1e-30)
        L = torch.linalg.cholesky_ex(gram + (shift * trace)[..., None, None] * eye).L
        Y = torch.linalg.solve_triangular(L.mT, Y, upper=True, left=False)
    return Y


def _qr_q(Y: Tensor) -> Tensor:
    """Orthonormal basis of Y's columns, float32: Householder on CPU, CholeskyQR2 on accelerators."""
    if Y.device.type == "cpu":
        return torch.linalg.qr(Y.float(), mode="reduced").Q
    return cholesky_qr(Y)


def _small_svd(B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a short-wide B (l x n). On CUDA via the transposed tall matrix and cuSOLVER's gesvda,
    which is ~30x faster than the default batched driver for these shapes (measured on an H100)."""
    if B.device.type == "cuda":
        U, S, Vh = torch.linalg.svd(B.mT, full_matrices=False, driver="gesvda")
        return Vh.mT, S, U.mT
    return torch.linalg.svd(B, full_matrices=False)


Generators = torch.Generator | Sequence[torch.Generator] | None


def range_finder(
    X: Tensor,
    rank: int,
    *,
    method: str = "power",
    power_iters: int = 1,
    oversample: int = 8,
    generator: Generators = None,
) -> Tensor:
    """Orthonormal basis (float32, ``(B, m, l)``) of the leading column space of the wide ``X`` (``(B, m, n)``).

    ``columns`` returns exactly ``rank`` columns. ``power`` returns ``rank + oversample`` (at most m)
    columns; ``truncate_basis`` narrows them to the best rank-``rank`` subspace.

    ``generator`` may be one generator for the whole batch or one per matrix. Per matrix, matrix i's
    sketch depends on its own generator only, so a batched call draws exactly what B separate calls
    would: the optimizer relies on that to give the same update whichever rank (or batch) computes it.
    """
    batch, m, n = X.shape
    per_matrix = generator is not None and not isinstance(generator, torch.Generator)
    if per_matrix and len(generator) != batch:  # type: ignore[arg-type]
        raise ValueError(f"range_finder: {len(generator)} generators for a batch of {batch}")  # type: ignore[arg-type]
    if method == "columns":
        if per_matrix:
            cols = torch.stack([torch.randperm(n, generator=g, device=X.device)[:rank] for g in generator])  # type: ignore[union-attr]
            return _qr_q(torch.take_along_dim(X, cols[:, None, :], dim=-1))
        # Uniform columns without replacement, shared across the batch (as in the reference code).
        idx = torch.randperm(n, generator=generator, device=X.device)[:rank]  # type: ignore[arg-type]
        return _qr_q(X[..., idx])
    if method != "power":
        raise ValueError(f"range_finder: unknown method {method!r}")
    width = min(rank + oversample, m)
    if per_matrix:
        omega = torch.stack(
            [torch.randn(n, width, generator=g, device=X.device, dtype=torch.float32) for g in generator]  # type: ignore[union-attr]
        )
    else:
        omega = torch.randn(batch, n, width, generator=generator, device=X.device, dtype=torch.float32)  # type: ignore[arg-type]
    Y = X @ omega.to(X.dtype)
    for _ in range(power_iters):
        # Subspace iteration with re-orthogonalization after each product: without it the columns of
        # (X X^T)^p X Omega collapse onto the top singular vector in low precision.
        Q = _qr_q(Y).to(X.dtype)
        Z = _qr_q(X.mT @ Q).to(X.dtype)
        Y = X @ Z
    return _qr_q(Y)


def truncate_basis(Q: Tensor, X: Tensor, rank: int) -> Tensor:
    """Narrow an oversampled basis Q (m x l) to the leading rank-``rank`` subspace of Q Q^T X.

    The top left singular vectors of the small B = Q^T X (l x n) rotate Q onto that subspace. On CPU
    they come from eigh of the l x l Gram B B^T (5-10x faster there than an SVD of B; squaring the
    condition number only blurs the tail we discard); on CUDA from the gesvda SVD (eigh is slow there).
    """
    if Q.size(-1) <= rank:
        return Q
    B = (Q.mT.to(X.dtype) @ X).float()
    if B.device.type == "cpu":
        _, vecs = torch.linalg.eigh(B @ B.mT)  # ascending eigenvalues
        return Q @ vecs[..., -rank:]
    U, _, _ = _small_svd(B)
    return Q @ U[..., :rank]


def _configured_range_finder(X: Tensor, config: OrthoConfig, generator: Generators) -> Tensor:
    assert config.rank is not None
    return range_finder(
        X,
        config.rank,
        method=config.range_finder,
        power_iters=config.power_iters,
        oversample=config.oversample,
        generator=generator,
    )


def _unit_frobenius(X: Tensor) -> Tensor:
    return X / frobenius_norm(X).clamp(min=torch.finfo(X.dtype).tiny)


def _as_wide_batch(G: Tensor) -> tuple[Tensor, bool, bool]:
    squeeze = G.ndim == 2
    X = G.unsqueeze(0) if squeeze else G
    tall = X.size(-2) > X.size(-1)
    return (X.mT if tall else X), tall, squeeze


def _restore(O: Tensor, tall: bool, squeeze: bool) -> Tensor:
    if tall:
        O = O.mT
    return O.squeeze(0) if squeeze else O


def lowrank_orthogonalize(G: Tensor, config: OrthoConfig, generator: Generators = None) -> Tensor:
    """Rank-r Q . orth(Q^T G); short sides <= ``config.full_below`` get full Newton-Schulz instead.

    The rank-r result is not rescaled: its Frobenius norm is about sqrt(r) rather than sqrt(min(m, n)).
    Compensating for that is a learning-rate decision, and the profile's ``lr_scale`` carries it.
    """
    return lowrank_with_basis(G, config, generator)[0]


def lowrank_with_basis(G: Tensor, config: OrthoConfig, generator: Generators = None) -> tuple[Tensor, Tensor | None]:
    """``lowrank_orthogonalize``'s update and the basis it applied: Q (float32, ``(B, short, r)``, orthonormal
    columns on G's short side, batched even for a 2-D G), or None where the ``full_below`` gate ran full
    Newton-Schulz (then the whole space was applied). Error feedback projects the momentum on Q."""
    if config.rank is None:
        raise ValueError("lowrank needs a rank")
    X, tall, squeeze = _as_wide_batch(G)
    short = X.size(-2)
    if short <= config.full_below:
        return configured_newton_schulz(G, config), None
    # Scale-free from here on (the result does not depend on ||G||), and no Gram matrix can overflow.
    Xc = _unit_frobenius(X).to(config.torch_dtype)
    Q = _configured_range_finder(Xc, config, generator)
    Q = truncate_basis(Q, Xc, config.rank)
    Qc = Q.to(config.torch_dtype)
    core = Qc.mT @ Xc  # (B, r, n): wide whenever r <= m <= n
    if config.core == "svd":
        core_o = svd_polar(core).to(config.torch_dtype)
    else:
        core_o = configured_newton_schulz(core, config)
    return _restore(Qc @ core_o, tall, squeeze), Q.float()


def rsvd_factors(
    G: Tensor, config: OrthoConfig, generator: Generators = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD of the wide-oriented ``G``: (U_r, S_r, V_r^T) in float32, batched ``(B, ...)``."""
    if config.rank is None:
        raise ValueError("rsvd needs a rank")
    X, _, _ = _as_wide_batch(G)
    Xc = X.to(config.torch_dtype)
    Q = _configured_range_finder(Xc, config, generator)
    Ub, S, Vh = _small_svd(Q.mT @ Xc.float())
    r = min(config.rank, S.size(-1))
    return Q @ Ub[..., :r], S[..., :r], Vh[..., :r, :]


def rsvd_orthogonalize(G: Tensor, config: OrthoConfig, generator: Generators = None) -> Tensor:
    """U_r V_r^T from a randomized SVD; singular values that are numerically zero are dropped."""
    return rsvd_with_basis(G, config, generator)[0]


def rsvd_with_basis(G: Tensor, config: OrthoConfig, generator: Generators = None) -> tuple[Tensor, Tensor]:
    """``rsvd_orthogonalize``'s update and its left basis U_r (float32, ``(B, short, r)``, wide orientation;
    columns of numerically zero singular values zeroed): the subspace error feedback projects on."""
    X, tall, squeeze = _as_wide_batch(G)
    U, S, Vh = rsvd_factors(_unit_frobenius(X), config, generator)
    keep = numerical_rank_mask(S, G.size(-2), G.size(-1)).float()
    basis = U * keep.unsqueeze(-2)
    O = basis @ Vh
    return _restore(O.to(config.torch_dtype), tall, squeeze), basis


def lowrank_flops(m: int, n: int, config: OrthoConfig) -> float:
    """Matmul flops of one low-rank orthogonalization (QR and small factorizations counted as 4 m l^2)."""
    s, long = min(m, n), max(m, n)
    r = config.rank or s
    if config.method == "lowrank" and s <= config.full_below:
        return configured_newton_schulz_flops(m, n, config)
    width = r if config.range_finder == "columns" else min(r + config.oversample, s)
    sketch = 0.0 if config.range_finder == "columns" else 2.0 * s * long * width * (1 + 2 * config.power_iters)
    qr = 4.0 * s * width * width * (1 + config.power_iters) + 4.0 * long * width * width * config.power_iters
    project_lift = 2.0 * 2 * s * long * r
    if config.method == "rsvd" or config.core == "svd":
        core = 4.0 * width * width * long + 8.0 * width**3
    else:
        core = configured_newton_schulz_flops(r, long, config)
    return sketch + qr + project_lift + core
