"""Every orthogonalizer against the exact SVD polar factor on matrices with known spectra.

Tolerances say which dtype they hold for: fp32 results are compared tightly; bf16 Newton-Schulz is
compared with the fp32 spectral prediction within bf16's plateau (it never converges further).
bf16 work is kept to matrices at most ~128 wide (bf16 matmul is slow on CPUs without native support).
"""

from __future__ import annotations

import pytest
import torch

from muonprof.ortho import (
    PRESETS,
    SCHEDULES,
    OrthoConfig,
    alignment,
    matrix_with_spectrum,
    newton_schulz,
    ns_singular_values,
    orthogonalize,
    predict,
    rel_err,
    singular_range,
    svd_polar,
)
from muonprof.ortho.spectral import model_singular_values

SHAPES = {"tall": (96, 48), "wide": (40, 120), "square": (64, 64)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spectrum(kind: str, k: int) -> torch.Tensor:
    if kind == "loguniform":  # sigma in [1e-3, 1]: ill-conditioned, what Jordan x5 cannot fix
        return torch.logspace(0, -3, k, dtype=torch.float64)
    if kind == "well":  # [0.1, 1]
        return torch.logspace(0, -1, k, dtype=torch.float64)
    if kind == "harmonic":
        return 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    if kind == "rank8":
        return torch.cat([torch.logspace(0, -1, 8, dtype=torch.float64), torch.zeros(k - 8, dtype=torch.float64)])
    if kind == "spike":
        return torch.cat(
            [torch.tensor([100.0], dtype=torch.float64), torch.logspace(-1, -2, k - 1, dtype=torch.float64)]
        )
    raise ValueError(kind)


def known(kind: str, shape: tuple[int, int], seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    s = spectrum(kind, min(shape)) * scale
    return s, matrix_with_spectrum(s, *shape, generator=gen(seed))


# ---------------------------------------------------------------- exact reference


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kind", ["loguniform", "rank8", "spike"])
def test_svd_polar_is_the_exact_partial_isometry(shape: tuple[int, int], kind: str) -> None:
    s, G = known(kind, shape)
    O = svd_polar(G.float())
    rank = int((s > 0).sum())
    sv = torch.linalg.svdvals(O.double())
    torch.testing.assert_close(sv[:rank], torch.ones(rank, dtype=torch.float64), rtol=0, atol=1e-5)
    assert all(v < 1e-5 for v in sv[rank:].tolist())  # zero singular values stay zero
    # fp32 SVD: singular vectors of the smallest singular values (1e-3 of the largest, or 1e-4 under a
    # spike) are accurate to ~eps/relative gap, which gives rel_err up to a few 1e-4.
    assert rel_err(O, G).item() < 5e-4 and alignment(O, G).item() > 1 - 1e-5


def test_every_method_maps_zero_to_zero_and_survives_extreme_norms() -> None:
    configs = [
        OrthoConfig(),
        OrthoConfig(dtype="float32", coefficients="polar_express", ns_steps=8),
        OrthoConfig(method="svd"),
        OrthoConfig(method="lowrank", rank=8, dtype="float32"),
        OrthoConfig(method="lowrank", rank=8, range_finder="columns", dtype="float32"),
        OrthoConfig(method="rsvd", rank=8),
    ]
    _, G = known("well", (48, 32))
    for config in configs:
        assert torch.equal(orthogonalize(torch.zeros(2, 48, 32), config), torch.zeros(2, 48, 32)), config.label()
        reference = orthogonalize(G.float(), config, generator=gen(1))
        for scale in (1e-20, 1e-6, 1e15, 1e25):
            O = orthogonalize((G * scale).float(), config, generator=gen(1))
            assert torch.isfinite(O).all(), (config.label(), scale)
            if 1e-6 <= scale <= 1e15:  # above eps: scale-invariant (Newton-Schulz divides by the norm)
                torch.testing.assert_close(O.float(), reference.float(), rtol=0, atol=0.05)
            if scale == 1e25 and config.method != "svd":  # ||G||_F overflows: a zero update, documented
                assert not O.any(), config.label()


def test_below_eps_norms_are_scaled_not_blown_up() -> None:
    """‖G‖_F < eps = 1e-7: NS divides by eps instead of the norm, so the output just stays small."""
    _, G = known("well", (32, 32))
    O = newton_schulz((G * 1e-12).float(), dtype=torch.float32)
    assert torch.isfinite(O).all() and O.abs().max() < 1e-2  # an orthogonal 32x32 has entries ~0.18


# ---------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_converging_schedules_reach_the_polar_factor_in_fp32(shape: tuple[int, int]) -> None:
    _, G = known("well", shape)
    for coefficients, steps, tol in (("polar_express", 8, 1e-3), ("quintic", 12, 1e-3), ("cubic", 20, 1e-3)):
        O = newton_schulz(G.float(), steps=steps, coefficients=coefficients, dtype=torch.float32)
        assert O.shape == G.shape and O.dtype == torch.float32
        assert rel_err(O, G).item() < tol, coefficients


def test_jordan_quintic_plateaus_in_its_documented_band() -> None:
    _, G = known("harmonic", (96, 64))
    for dtype in (torch.float32, torch.bfloat16):
        lo, hi = singular_range(newton_schulz(G.float(), dtype=dtype))
        assert lo.item() > 0.62 and hi.item() < 1.25, (dtype, lo.item(), hi.item())
    # ... so it never converges: its fp32 rel_err is what the spectral model says, well above zero.
    s, G = known("harmonic", (96, 64))
    err = rel_err(newton_schulz(G.float(), dtype=torch.float32), G).item()
    assert err == pytest.approx(predict(s, OrthoConfig())["rel_err"], abs=1e-4) and err > 0.1


@pytest.mark.parametrize("kind", ["loguniform", "harmonic"])
def test_bf16_stays_within_its_plateau_of_the_fp32_prediction(kind: str) -> None:
    s, G = known(kind, (128, 96))
    for config in (OrthoConfig(), OrthoConfig(coefficients="polar_express", ns_steps=8)):
        predicted = predict(s, config)
        O = orthogonalize(G.float(), config)
        assert O.dtype == torch.bfloat16
        # bf16 rounding (8 mantissa bits) moves rel_err by at most a few 1e-2 on these spectra; it is
        # the floor that keeps 8-step Polar Express near 0.05-0.4 in bf16 (fp32 reaches ~1e-3).
        assert abs(rel_err(O, G).item() - predicted["rel_err"]) < 0.45
        assert abs(alignment(O, G).item() - predicted["alignment"]) < 0.02


def test_bf16_convergent_schedules_fill_the_null_space_of_rank_deficient_input() -> None:
    """A measured hazard, not a wish: bf16 rounding leaves ~1e-3 singular values where G has exact zeros,
    and a schedule that converges (8-step Polar Express) lifts them towards 1. In fp32 it does not."""
    s, G = known("rank8", (128, 96))
    config = OrthoConfig(coefficients="polar_express", ns_steps=8)
    assert rel_err(orthogonalize(G.float(), config.replace(dtype="float32")), G).item() < 1e-2
    polar_bf16 = rel_err(orthogonalize(G.float(), config), G).item()
    assert polar_bf16 > 1.0
    # Jordan x5 lifts tiny values far less (slope product ~485 over 5 steps): measured ~0.46 here against
    # an exact-arithmetic 0.22, still a third of Polar Express's error.
    jordan_bf16 = rel_err(orthogonalize(G.float(), OrthoConfig()), G).item()
    assert predict(s, OrthoConfig())["rel_err"] < jordan_bf16 < min(0.6, polar_bf16 / 3)


def test_batched_equals_per_matrix_and_input_is_never_modified() -> None:
    G = torch.stack([known("loguniform", (64, 48), seed=i)[1].float() for i in range(3)])
    for config in (OrthoConfig(dtype="float32"), OrthoConfig(method="svd")):
        batched = orthogonalize(G, config)
        single = torch.stack([orthogonalize(g, config) for g in G])
        torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    for dtype in (torch.float32, torch.bfloat16):
        X = G.to(dtype)
        before = X.clone()
        for config in (OrthoConfig(), OrthoConfig(dtype="float32"), OrthoConfig(method="lowrank", rank=4)):
            orthogonalize(X, config, generator=gen(0))
            assert torch.equal(X, before), (dtype, config.label())


@pytest.mark.parametrize("shape", [(64, 96), (96, 64), (80, 80)])
def test_default_is_bit_identical_to_torch_muon_kernel(shape: tuple[int, int]) -> None:
    from torch.optim._muon import _zeropower_via_newtonschulz

    G = torch.randn(*shape, generator=gen(7))
    assert torch.equal(newton_schulz(G), _zeropower_via_newtonschulz(G, (3.4445, -4.775, 2.0315), 5, 1e-7))


# ---------------------------------------------------------------- low rank and randomized SVD


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(
    "config",
    [
        OrthoConfig(method="lowrank", rank=8, power_iters=1, oversample=4, core="svd", dtype="float32"),
        OrthoConfig(method="lowrank", rank=8, dtype="float32", coefficients="polar_express", ns_steps=10),
        OrthoConfig(method="lowrank", rank=8, range_finder="columns", core="svd", dtype="float32"),
        OrthoConfig(method="rsvd", rank=8, dtype="float32"),
    ],
    ids=lambda c: c.label(),
)
def test_low_rank_methods_recover_the_polar_factor_of_a_rank_r_matrix(shape, config) -> None:  # type: ignore[no-untyped-def]
    _, G = known("rank8", shape)
    O = orthogonalize(G.float(), config, generator=gen(3))
    assert O.shape == G.shape
    assert rel_err(O, G).item() < 2e-3, config.label()
    # In bf16 the projection is rounded to 8 bits: the same recovery holds to a few 1e-2.
    O16 = orthogonalize(G.float(), config.replace(dtype="bfloat16"), generator=gen(3))
    assert rel_err(O16, G).item() < 3e-2, config.label()


@pytest.mark.parametrize("method", ["lowrank", "rsvd"])
def test_low_rank_on_a_full_spectrum_achieves_the_ky_fan_share(method: str) -> None:
    s, G = known("harmonic", (128, 96))
    k = 12
    config = OrthoConfig(method=method, rank=k, dtype="float32", power_iters=2, oversample=8, core="svd")
    ky_fan = (s[:k].sum() / s.sum()).item()
    assert predict(s, config)["alignment"] == pytest.approx(ky_fan, rel=1e-9)
    for seed in range(3):
        O = orthogonalize(G.float(), config, generator=gen(seed))
        sv = torch.linalg.svdvals(O.double())
        assert (sv > 1e-3).sum().item() == k  # exactly rank k ...
        torch.testing.assert_close(sv[:k], torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-4)  # ... unit values
        assert alignment(O, G).item() == pytest.approx(ky_fan, abs=0.01)


def test_he2025_preset_gates_small_layers_to_full_newton_schulz() -> None:
    preset = PRESETS["lowrank_he2025"]
    assert (preset.range_finder, preset.oversample, preset.power_iters, preset.full_below) == ("columns", 0, 0, 500)
    _, small = known("harmonic", (128, 96))
    assert torch.equal(orthogonalize(small.float(), preset), newton_schulz(small.float()))
    # Short side 520 > 500 takes the low-rank path (fp32 here: bf16 at this width is slow on some CPUs).
    big = torch.randn(520, 560, generator=gen(0))
    O = orthogonalize(big, preset.replace(dtype="float32"), generator=gen(0))
    assert (torch.linalg.svdvals(O) > 0.1).sum().item() <= 100


def test_randomized_methods_are_deterministic_per_generator_seed() -> None:
    _, G = known("harmonic", (64, 96))
    for config in (OrthoConfig(method="lowrank", rank=8, range_finder="columns"), OrthoConfig(method="rsvd", rank=8)):
        a = orthogonalize(G.float(), config, generator=gen(5))
        b = orthogonalize(G.float(), config, generator=gen(5))
        c = orthogonalize(G.float(), config, generator=gen(6))
        assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- the spectral model


@pytest.mark.parametrize(
    "coefficients",
    [*SCHEDULES, ((3.0, -3.2, 1.2), (1.5, -0.5, 0.0))],
    ids=[*SCHEDULES, "explicit"],
)
@pytest.mark.parametrize("steps", [1, 3, 5, 8])
@pytest.mark.parametrize("kind", ["loguniform", "harmonic", "rank8", "spike"])
def test_spectral_model_agrees_with_the_real_fp32_iteration(coefficients, steps: int, kind: str) -> None:  # type: ignore[no-untyped-def]
    s, G = known(kind, (72, 48), seed=steps)
    config = OrthoConfig(ns_steps=steps, coefficients=coefficients, dtype="float32")
    O = orthogonalize(G.float(), config)
    predicted = predict(s, config)
    # fp32 rounding of a few matmuls: 1e-3 absolute on measures of order 1.
    assert rel_err(O, G).item() == pytest.approx(predicted["rel_err"], abs=1e-3)
    assert alignment(O, G).item() == pytest.approx(predicted["alignment"], abs=1e-3)
    model_sv = torch.sort(model_singular_values(s, config).abs(), descending=True).values
    real_sv = torch.linalg.svdvals(O.double())
    torch.testing.assert_close(real_sv, model_sv, rtol=0, atol=2e-3)


def test_spectral_model_edge_cases() -> None:
    assert predict(torch.zeros(10), OrthoConfig())["rel_err"] == 0.0
    assert predict(torch.zeros(10), OrthoConfig())["alignment"] == 0.0
    exact = predict(spectrum("loguniform", 50), OrthoConfig(method="svd"))
    assert exact["rel_err"] == 0.0 and exact["alignment"] == 1.0
    out = ns_singular_values([1.0], steps=1, coefficients="cubic")
    assert out.item() == pytest.approx(1.0)  # 1.5 - 0.5 = 1: the cubic's fixed point


# ---------------------------------------------------------------- the config object


def test_config_round_trips_and_is_hashable() -> None:
    configs = [
        OrthoConfig(),
        OrthoConfig(method="svd"),
        OrthoConfig(method="lowrank", rank=96, range_finder="columns", full_below=500),
        OrthoConfig(method="rsvd", rank=16, power_iters=0, oversample=4, dtype="fp32"),
        OrthoConfig(coefficients=[[3.0, -3.2, 1.2], [1.5, -0.5]], ns_steps=4),
    ]
    for config in configs:
        assert OrthoConfig.from_json(config.to_json()) == config
        assert hash(OrthoConfig.from_dict(config.to_dict())) == hash(config)
    assert configs[3].dtype == "float32"
    assert len({OrthoConfig(), OrthoConfig(), OrthoConfig(ns_steps=3)}) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "qr"}, "method: unknown method"),
        ({"method": "lowrank"}, "rank: method 'lowrank' needs a rank"),
        ({"method": "rsvd", "rank": -1}, "rank: must be a positive integer"),
        ({"coefficients": "fastest"}, "coefficients: unknown coefficient schedule"),
        ({"coefficients": [[1.0, 2.0, 3.0, 4.0]]}, "coefficients: each coefficient row needs 2 or 3"),
        ({"ns_steps": 101}, r"ns_steps: must be an integer in \[0, 100\]"),
        ({"dtype": "float16"}, "dtype: must be one of"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OrthoConfig(**kwargs)


def test_rank_above_the_short_side_is_an_error() -> None:
    config = OrthoConfig(method="lowrank", rank=65)
    with pytest.raises(ValueError, match=r"rank: 65 exceeds min\(m, n\) = 64"):
        orthogonalize(torch.randn(64, 100), config)
    with pytest.raises(ValueError, match=r"\(m, n\) or \(B, m, n\)"):
        orthogonalize(torch.randn(64), OrthoConfig())


def test_schedules_ship_with_their_normalization() -> None:
    pe = SCHEDULES["polar_express"]
    assert pe.norm_scale == 1.01 and len(pe.rows) == 8
    assert pe.rows[0][0] == pytest.approx(8.28721201814563 / 1.01)
    assert pe.rows[0][2] == pytest.approx(17.300387312530933 / 1.01**5)
    assert pe.rows[-1] == (1.875, -1.25, 0.375)  # the last row carries no safety factor
    nano = SCHEDULES["polar_express_nanogpt"]
    assert nano.norm_scale == 1.02 and len(nano.rows) == 5
    assert SCHEDULES["jordan"].coefficients(3) == [(3.4445, -4.7750, 2.0315)] * 3
    assert nano.coefficients(7)[5:] == [nano.rows[-1]] * 2
