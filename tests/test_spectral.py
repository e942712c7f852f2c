"""The spectral model (scalar arithmetic on singular values) against the real iteration on real matrices.

Newton-Schulz maps U diag(s) V^T to U diag(p(s / ||s||)) V^T, so the model's singular values, rel_err
and alignment must match what the real code produces on a matrix built with that spectrum. References
are float64 (matrices from ``matrix_with_spectrum``, quality measures in float64).

Tolerances. fp32: 1e-3 on rel_err / alignment and 2e-3 on singular values. fp32 rounding of the input
and of each matmul is ~1e-7 relative; the odd polynomials amplify an error at x by their slope, at
most ~|a| per step near 0, i.e. up to prod(a_t) ~ 6e3 over 8 Polar Express steps and 3.4445^8 ~ 2e4 for
8 Jordan steps. That bound is reached only by singular values that should be exactly zero (rank
deficient spectra), where it gives ~6e-4 (measured worst: 5.7e-4 on singular values, 1.8e-4 on
rel_err); everywhere else the agreement is ~1e-6. The float64 runs show the model itself is exact:
they agree to ~1e-12 (asserted at 1e-9).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from muonprof.ortho import (
    PRESETS,
    SCHEDULES,
    OrthoConfig,
    alignment,
    matrix_with_spectrum,
    model_singular_values,
    newton_schulz,
    ns_singular_values,
    orthogonalize,
    predict,
    rel_err,
    singular_range,
    svd_polar,
)
from muonprof.ortho.spectral import alignment_from_spectrum, rel_err_from_spectrum

F64 = torch.float64
K = 48
SHAPES: dict[str, tuple[int, int]] = {"tall": (72, K), "wide": (K, 72)}
EXPLICIT = ((3.0, -3.2, 1.2), (1.5, -0.5))  # a quintic row, then a cubic row repeated
SCHEDULE_CASES: dict[str, str | tuple[tuple[float, ...], ...]] = {
    **{name: name for name in SCHEDULES},
    "explicit": EXPLICIT,
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spectrum(kind: str, k: int = K) -> Tensor:
    if kind == "loguniform":  # [1e-3, 1]
        return torch.logspace(0, -3, k, dtype=F64)
    if kind == "harmonic":  # 1/i
        return 1.0 / torch.arange(1, k + 1, dtype=F64)
    if kind == "rank8":  # rank deficient: 8 values in [0.1, 1], then exact zeros
        return torch.cat([torch.logspace(0, -1, 8, dtype=F64), torch.zeros(k - 8, dtype=F64)])
    if kind == "spike":  # one dominant value over a [0.01, 0.1] tail
        return torch.cat([torch.tensor([100.0], dtype=F64), torch.logspace(-1, -2, k - 1, dtype=F64)])
    if kind == "gap":  # 8 values in [0.5, 1], a 50x gap, then a [0.001, 0.01] tail
        return torch.cat([torch.linspace(1, 0.5, 8, dtype=F64), 0.01 * torch.logspace(0, -1, k - 8, dtype=F64)])
    raise ValueError(kind)


def sorted_model(s: Tensor, config: OrthoConfig) -> Tensor:
    """The model's singular values as a set (sorted descending), comparable with svdvals of the output."""
    return torch.sort(model_singular_values(s, config).abs(), descending=True).values


def check_against_model(O: Tensor, G: Tensor, s: Tensor, config: OrthoConfig, tol: float, sv_tol: float) -> None:
    predicted = predict(s, config)
    assert rel_err(O, G).item() == pytest.approx(predicted["rel_err"], abs=tol)
    assert alignment(O, G).item() == pytest.approx(predicted["alignment"], abs=tol)
    real_sv = torch.linalg.svdvals(O.double())
    torch.testing.assert_close(real_sv, sorted_model(s, config), rtol=0, atol=sv_tol)
    rank = int((s > 0).sum())
    lo, hi = singular_range(O, rank=rank)
    assert lo.item() == pytest.approx(predicted["sv_min"], abs=sv_tol)
    assert hi.item() == pytest.approx(predicted["sv_max"], abs=sv_tol)


# ---------------------------------------------------------------------------------------------------
# Newton-Schulz: model vs the real iteration


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kind", ["loguniform", "harmonic", "rank8", "spike"])
@pytest.mark.parametrize("steps", [1, 3, 5, 8])
@pytest.mark.parametrize("coefficients", SCHEDULE_CASES.values(), ids=SCHEDULE_CASES.keys())
def test_model_matches_the_real_fp32_iteration(
    coefficients: str | tuple[tuple[float, ...], ...], steps: int, kind: str, shape: tuple[int, int]
) -> None:
    s = spectrum(kind)
    G = matrix_with_spectrum(s, *shape, generator=gen(steps))
    config = OrthoConfig(ns_steps=steps, coefficients=coefficients, dtype="float32")
    O = orthogonalize(G.float(), config)
    check_against_model(O, G, s, config, tol=1e-3, sv_tol=2e-3)


@pytest.mark.parametrize("kind", ["loguniform", "rank8", "spike"])
@pytest.mark.parametrize("steps", [3, 8])
@pytest.mark.parametrize("coefficients", SCHEDULE_CASES.values(), ids=SCHEDULE_CASES.keys())
def test_model_is_exact_against_a_float64_iteration(
    coefficients: str | tuple[tuple[float, ...], ...], steps: int, kind: str
) -> None:
    s = spectrum(kind)
    G = matrix_with_spectrum(s, 72, K, generator=gen(steps))
    O = newton_schulz(G, steps=steps, coefficients=coefficients, dtype=F64)
    config = OrthoConfig(ns_steps=steps, coefficients=coefficients)
    check_against_model(O, G, s, config, tol=1e-9, sv_tol=1e-9)


def test_model_follows_the_eps_clamp_below_eps() -> None:
    """||s|| < eps: both the model and the iteration divide by eps, so the output is tiny and linear in G."""
    s = torch.logspace(0, -1, K, dtype=F64) * 1e-12
    G = matrix_with_spectrum(s, 72, K, generator=gen(0))
    model = ns_singular_values(s)
    assert model.max().item() < 1e-2  # ~3.4445^5 * 1e-12 / 1e-7
    real = torch.linalg.svdvals(newton_schulz(G.float(), dtype=torch.float32).double())
    torch.testing.assert_close(real, model, rtol=1e-5, atol=0)  # measured 9e-8 relative


# ---------------------------------------------------------------------------------------------------
# SVD and the low-rank "ideal"


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kind", ["loguniform", "harmonic", "rank8"])
def test_svd_model_is_ones_on_the_nonzero_part(kind: str, shape: tuple[int, int]) -> None:
    s = spectrum(kind)
    config = OrthoConfig(method="svd")
    model = model_singular_values(s, config)
    assert torch.equal(model, (s > 0).to(F64))
    assert predict(s, config) == {"rel_err": 0.0, "alignment": 1.0, "sv_min": 1.0, "sv_max": 1.0}
    G = matrix_with_spectrum(s, *shape, generator=gen(0))
    O = svd_polar(G.float())
    # fp32 SVD: 1e-5 (measured <= 2e-6 on singular values; alignment's ||O||_op carries the same).
    torch.testing.assert_close(torch.linalg.svdvals(O.double()), sorted_model(s, config), rtol=0, atol=1e-5)
    assert alignment(O, G).item() == pytest.approx(1.0, abs=1e-5)


LOW_RANK_IDEAL: dict[str, OrthoConfig] = {
    "lowrank-svdcore": OrthoConfig(method="lowrank", rank=8, core="svd", power_iters=3, oversample=10, dtype="float32"),
    "lowrank-jordan": OrthoConfig(method="lowrank", rank=8, power_iters=3, oversample=10, dtype="float32"),
    "lowrank-polar8": OrthoConfig(
        method="lowrank",
        rank=8,
        power_iters=3,
        oversample=10,
        coefficients="polar_express",
        ns_steps=8,
        dtype="float32",
    ),
    "rsvd": OrthoConfig(method="rsvd", rank=8, power_iters=3, oversample=10, dtype="float32"),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("config", LOW_RANK_IDEAL.values(), ids=LOW_RANK_IDEAL.keys())
def test_ideal_low_rank_prediction_matches_power_iteration_across_a_gap(
    config: OrthoConfig, shape: tuple[int, int]
) -> None:
    """With a 50x gap after the top 8 and 3 power iterations, the sketch finds the top-8 subspace to
    ~(0.01 / 0.5)^7 ~ 1e-12, so only fp32 rounding separates the real output from the model's ideal
    (measured <= 1.6e-6 over 3 seeds); asserted at 1e-4."""
    s = spectrum("gap")
    G = matrix_with_spectrum(s, *shape, generator=gen(0))
    for seed in range(3):
        O = orthogonalize(G.float(), config, generator=gen(seed))
        check_against_model(O, G, s, config, tol=1e-4, sv_tol=1e-4)


def test_low_rank_model_with_a_newton_schulz_core_is_scale_free() -> None:
    """lowrank divides G by ||G||_F before forming the core, so its result does not depend on the scale
    of G, even far below NS's eps; the model must not apply eps to the unnormalized top-r values (it
    used to, and predicted a ~0 update for ||s|| < 1e-7 where the real one is a normal rank-r update)."""
    s = torch.logspace(0, -1, K, dtype=F64)
    config = OrthoConfig(method="lowrank", rank=8, power_iters=3, dtype="float32")
    reference = predict(s, config)
    for scale in (1e-6, 1e-12, 1e-20):
        assert predict(s * scale, config) == pytest.approx(reference, rel=1e-9, abs=1e-12)
        G = matrix_with_spectrum(s * scale, 72, K, generator=gen(0))
        O = orthogonalize(G.float(), config, generator=gen(1))
        # A flat spectrum has no gap: the sketch's subspace is off by ~1e-3 in alignment (measured).
        assert alignment(O, G).item() == pytest.approx(reference["alignment"], abs=1e-2)
        assert singular_range(O, rank=8)[1].item() == pytest.approx(reference["sv_max"], abs=1e-2)


@pytest.mark.parametrize("k", [1, 4, 12, K])
def test_rank_k_ideal_alignment_is_the_ky_fan_share(k: int) -> None:
    s = spectrum("harmonic")
    ky_fan = (s[:k].sum() / s.sum()).item()
    for config in (
        OrthoConfig(method="rsvd", rank=k),
        OrthoConfig(method="lowrank", rank=k, core="svd"),
        OrthoConfig(method="lowrank", rank=k, coefficients="polar_express", ns_steps=10),
    ):
        predicted = predict(s, config)
        # svd core / rsvd: exactly; a converged Polar Express core: to its convergence (~1e-7 here).
        assert predicted["alignment"] == pytest.approx(ky_fan, abs=1e-6), config.label()
        # k ones against K ones: ||O - U V^T||_F / ||U V^T||_F = sqrt((K - k) / K).
        assert predicted["rel_err"] == pytest.approx(math.sqrt((K - k) / K), abs=1e-6), config.label()


def test_gated_low_rank_model_is_full_newton_schulz() -> None:
    s = spectrum("harmonic")
    preset = PRESETS["lowrank_he2025"]  # short side 48 <= 500: full NS
    assert torch.equal(model_singular_values(s, preset), ns_singular_values(s, steps=5, coefficients="jordan"))
    ungated = preset.replace(full_below=0, rank=8)
    model = model_singular_values(s, ungated)
    assert bool((model[8:] == 0).all()) and bool((model[:8] > 0.6).all())


# ---------------------------------------------------------------------------------------------------
# Edge cases and input forms


@pytest.mark.parametrize(
    "config",
    [
        OrthoConfig(),
        OrthoConfig(coefficients="polar_express", ns_steps=8),
        OrthoConfig(method="svd"),
        OrthoConfig(method="lowrank", rank=4),
        OrthoConfig(method="lowrank", rank=4, core="svd"),
        OrthoConfig(method="rsvd", rank=4),
        PRESETS["lowrank_he2025"],
    ],
    ids=lambda c: c.label(),
)
def test_zero_spectrum_predicts_a_zero_update_without_nan(config: OrthoConfig) -> None:
    zeros = torch.zeros(K, dtype=F64)
    assert torch.equal(model_singular_values(zeros, config), zeros)
    assert predict(zeros, config) == {"rel_err": 0.0, "alignment": 0.0, "sv_min": 0.0, "sv_max": 0.0}
    # ... which is what the real method returns, and what the matrix measures say about it.
    G = torch.zeros(72, K, dtype=F64)
    O = orthogonalize(G.float(), config, generator=gen(0))
    assert rel_err(O, G).item() == 0.0 and alignment(O, G).item() == 0.0


def test_quality_measures_on_zero_matrices() -> None:
    Z = torch.zeros(6, 4, dtype=F64)
    assert rel_err(Z, Z).item() == 0.0 and alignment(Z, Z).item() == 0.0
    # A nonzero update for a zero G: the error is the update's own size (zero is the right answer).
    assert rel_err(torch.ones(6, 4), Z).item() == pytest.approx(math.sqrt(24))
    assert alignment(torch.ones(6, 4), Z).item() == 0.0
    assert float(rel_err_from_spectrum(torch.zeros(4), torch.tensor([1.0, 0, 0, 0]))) == 1.0
    assert float(alignment_from_spectrum(torch.zeros(4), torch.zeros(4))) == 0.0


def test_alignment_of_the_exact_polar_factor_is_one() -> None:
    s = spectrum("spike")
    G = matrix_with_spectrum(s, 72, K, generator=gen(3))
    assert alignment(svd_polar(G), G).item() == pytest.approx(1.0, abs=1e-12)  # float64 throughout
    assert float(alignment_from_spectrum(s, torch.ones(K))) == pytest.approx(1.0, abs=1e-15)


def test_model_accepts_lists_unsorted_and_batched_spectra() -> None:
    s = spectrum("harmonic", 16)
    config = OrthoConfig(coefficients="you")
    shuffled = s[torch.randperm(16, generator=gen(0))]
    assert predict(shuffled, config) == predict(s, config) == predict(s.tolist(), config)
    # model_singular_values is aligned with the *sorted* spectrum.
    assert torch.equal(model_singular_values(shuffled, config), model_singular_values(s, config))
    batch = torch.stack([s, 2 * s, spectrum("loguniform", 16)])
    out = ns_singular_values(batch, steps=5, coefficients="jordan")
    for row, spec in zip(out, batch):
        torch.testing.assert_close(row, ns_singular_values(spec, steps=5, coefficients="jordan"), rtol=0, atol=0)
    torch.testing.assert_close(out[0], out[1], rtol=1e-14, atol=0)  # scale-invariant above eps
