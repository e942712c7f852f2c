"""The accelerator-only code paths of the low-rank methods, exercised on CPU.

On CUDA the low-rank orthogonalizers use shifted CholeskyQR2 and a transposed gesvda SVD instead of
Householder QR and eigh (30-100x faster there); CI has no GPU, so the kernels are checked here.
"""

from __future__ import annotations

import torch

from muonprof.ortho import OrthoConfig, alignment, matrix_with_spectrum
from muonprof.ortho import lowrank as lowrank_module
from muonprof.ortho.lowrank import cholesky_qr


def test_cholesky_qr_gives_orthonormal_columns_with_the_same_span() -> None:
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(3, 200, 24, generator=g) @ torch.diag(torch.logspace(0, -3, 24))
    Q = cholesky_qr(Y)
    eye = torch.eye(24).expand(3, 24, 24)
    # The trace-relative shift (1e-6) that keeps Cholesky defined costs ~shift * trace / sigma_min^2 of
    # orthogonality on a condition-1e3 input: ~2e-5 here, far below what bf16 Newton-Schulz resolves.
    torch.testing.assert_close(Q.mT @ Q, eye, rtol=0, atol=1e-4)
    Q_ref = torch.linalg.qr(Y).Q
    torch.testing.assert_close(Q @ Q.mT, Q_ref @ Q_ref.mT, rtol=0, atol=1e-4)


def test_cholesky_qr_survives_rank_deficient_and_zero_input() -> None:
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(100, 5, generator=g) @ torch.randn(5, 12, generator=g)  # rank 5 in 12 columns
    Q = cholesky_qr(Y)
    assert torch.isfinite(Q).all()
    P = Q @ Q.mT
    torch.testing.assert_close(P @ Y, Y, rtol=0, atol=1e-3 * Y.abs().max().item())  # spans range(Y)
    assert torch.linalg.matrix_norm(Q, ord=2) < 1.01  # the null directions come out small, not blown up
    assert torch.equal(cholesky_qr(torch.zeros(2, 50, 8)), torch.zeros(2, 50, 8))


def test_lowrank_with_accelerator_kernels_matches_the_cpu_kernels(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s = torch.cat([torch.logspace(0, -1, 16), torch.full((48,), 1e-3)]).double()
    G = matrix_with_spectrum(s, 96, 64, generator=torch.Generator().manual_seed(2)).float()
    config = OrthoConfig(method="lowrank", rank=16, dtype="float32", power_iters=1, oversample=8, core="svd")
    cpu = lowrank_module.lowrank_orthogonalize(G, config, torch.Generator().manual_seed(3))
    monkeypatch.setattr(lowrank_module, "_qr_q", cholesky_qr)
    accel = lowrank_module.lowrank_orthogonalize(G, config, torch.Generator().manual_seed(3))
    # Same sketch, different orthonormalization: the result is basis-invariant, so it must agree.
    torch.testing.assert_close(accel, cpu, rtol=0, atol=1e-4)
    ky_fan = (s[:16].sum() / s.sum()).item()
    assert abs(alignment(accel, G).item() - ky_fan) < 1e-3
