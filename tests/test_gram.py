"""Gram Newton-Schulz (``ortho.gram``): the same polynomial as plain Newton-Schulz, other rounding.

References: the exact polar factor (``svd_polar``) on matrices with known spectra (``matrix_with_spectrum``),
and plain ``newton_schulz``, which Gram must equal to rounding. Tolerances, and why:

- float64, Gram vs plain: max |difference| / max |entry| <= 1e-12. Measured <= 3.5e-14 over every schedule and
  steps 1..8 (float64 epsilon 2.2e-16 amplified by cond(Q), a few hundred within a two-step segment).
- float32, the same: <= 1e-4; measured <= 1.9e-5 (float32 epsilon 1.2e-7 times the same amplification).
- bf16: Gram's error against float64 Newton-Schulz is at most 4x plain bf16 Newton-Schulz's (measured <= 3.1x
  here, <= 4.0x over the spectra of the module docstring's table).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from muonprof import ProfiledMuon
from muonprof.bench.candidates import GRAM, GRAM_MAX_FLOP_RATIO, GridSpec, build_candidates, fits
from muonprof.bench.cost import cost_key, workspace_bytes
from muonprof.optim.distributed import ortho_flops
from muonprof.ortho import (
    SCHEDULES,
    OrthoConfig,
    default_restarts,
    gram_newton_schulz,
    gram_newton_schulz_flops,
    matrix_with_spectrum,
    model_singular_values,
    newton_schulz,
    orthogonalize,
    predict,
    rel_err,
    svd_polar,
)
from muonprof.ortho.newton_schulz import newton_schulz_flops
from muonprof.profile import json_schema, parse_profile, resolve_layers
from muonprof.tune.writer import settings_of

F64 = torch.float64
SHAPES: dict[str, tuple[int, int]] = {"tall": (112, 48), "wide": (48, 112), "square": (64, 64)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def known(kind: str, shape: tuple[int, int], seed: int = 0, batch: int | None = None) -> Tensor:
    k = min(shape)
    spectra = {
        "well": torch.logspace(0, -1, k, dtype=F64),
        "loguniform": torch.logspace(0, -2, k, dtype=F64),
        "rank8": torch.cat([torch.logspace(0, -1, 8, dtype=F64), torch.zeros(k - 8, dtype=F64)]),
    }
    return matrix_with_spectrum(spectra[kind], *shape, batch=batch, generator=gen(seed))


def rel_diff(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))


# ------------------------------------------------------------------ against the exact polar factor


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kind", ["well", "loguniform", "rank8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_converges_to_the_polar_factor(shape: tuple[int, int], kind: str, dtype: torch.dtype) -> None:
    # Polar Express x8 converges for singular values down to ~1e-3 of the top (its design range).
    # The reference is the polar factor of the exact (float64) matrix: for rank8, a partial isometry of rank 8.
    G64 = known(kind, shape)
    G = G64.float()
    O = gram_newton_schulz(G, steps=8, coefficients="polar_express", dtype=dtype)
    assert O.shape == G.shape and O.dtype == dtype
    err = float(rel_err(O, G64))
    if dtype == torch.float32:
        # measured <= 7.5e-6 (plain 1.3e-6); rank8: 1.5e-4, float32 rounding of the zeros lifted ~6e3-fold, as plain
        plain = float(rel_err(newton_schulz(G, steps=8, coefficients="polar_express", dtype=dtype), G64))
        assert err < max(1e-4, 1.5 * plain), (err, plain)
    else:
        # bf16 rounding (~4e-3) of a rank-8 matrix's zero singular values is lifted towards 1 by both iterations,
        # so there the bar is plain bf16 Newton-Schulz; elsewhere measured 0.024-0.036 (plain 0.006-0.027).
        plain = float(rel_err(newton_schulz(G, steps=8, coefficients="polar_express", dtype=dtype), G64))
        assert err < max(0.05, 1.5 * plain), (err, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "3d"])
def test_zero_matrix_maps_to_zero(dtype: torch.dtype, batched: bool) -> None:
    G = torch.zeros(*((2,) if batched else ()), 48, 112)
    O = gram_newton_schulz(G, dtype=dtype)
    assert torch.equal(O, torch.zeros_like(O))


@pytest.mark.parametrize("scale", [2.0**-20, 2.0**-10, 2.0**10, 2.0**50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_and_huge_norms_are_scale_free(scale: float, dtype: torch.dtype) -> None:
    """Gram Newton-Schulz acts on X / ||X||_F: its result does not depend on the input's scale (as long as the
    norm is above eps and does not overflow), and never holds a NaN. Powers of two scale without rounding, so
    the normalized input, and everything after it, is the same up to the norm's last bit."""
    G = known("loguniform", (48, 112)).float()
    ref = gram_newton_schulz(G, dtype=dtype)
    O = gram_newton_schulz(G * scale, dtype=dtype)
    assert torch.isfinite(O).all()
    assert rel_diff(O, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_norms_below_eps_and_overflowing_norms_match_plain_newton_schulz() -> None:
    for scale in (1e-30, 1e25):  # ||X||_F < eps: only scaled; ||X||_F = inf: the update is zero
        G = torch.randn(48, 112, generator=gen(3)) * scale
        for dtype in (torch.float32, torch.bfloat16):
            O = gram_newton_schulz(G, dtype=dtype)
            plain = newton_schulz(G, dtype=dtype)
            assert torch.isfinite(O).all()
            torch.testing.assert_close(O.float(), plain.float(), rtol=0.05, atol=1e-30)


# ------------------------------------------------------------------ against plain Newton-Schulz


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_equals_plain_newton_schulz_in_float64_and_fp32(name: str, shape: tuple[int, int]) -> None:
    G = torch.randn(*shape, generator=gen(1), dtype=F64)
    for steps in range(1, 9):
        for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-4)):
            plain = newton_schulz(G, steps=steps, coefficients=name, dtype=dtype)
            gram = gram_newton_schulz(G, steps=steps, coefficients=name, dtype=dtype)
            assert gram.dtype == dtype
            assert rel_diff(gram, plain) < tol, (steps, dtype)


@pytest.mark.parametrize("restarts", [(), (1,), (3,), (1, 2, 3, 4)])
def test_restarts_change_nothing_in_float64(restarts: tuple[int, ...]) -> None:
    G = known("loguniform", (48, 112)).double()
    ref = gram_newton_schulz(G, steps=5, coefficients="you", dtype=F64)
    O = gram_newton_schulz(G, steps=5, coefficients="you", dtype=F64, restarts=restarts)
    assert rel_diff(O, ref) < 1e-12


@pytest.mark.parametrize("name", ["jordan", "polar_express", "quintic"])
def test_bf16_error_stays_near_plain_newton_schulz(name: str) -> None:
    G = known("loguniform", (48, 112))
    for steps in (3, 5, 8):
        ref = newton_schulz(G, steps=steps, coefficients=name, dtype=F64)
        plain = rel_diff(newton_schulz(G, steps=steps, coefficients=name, dtype=torch.bfloat16), ref)
        gram = rel_diff(gram_newton_schulz(G, steps=steps, coefficients=name, dtype=torch.bfloat16), ref)
        assert gram < 4 * plain, (steps, gram, plain)


def test_restarts_keep_bf16_from_drifting() -> None:
    """Without restarts the rounded Gram matrix's negative eigenvalues grow ~a^2 per step: 8 Jordan steps in bf16
    diverge (measured: NaN), while the default rule (after every other step) stays near plain Newton-Schulz."""
    G = matrix_with_spectrum(torch.logspace(0, -3, 128, dtype=F64), 128, 512, generator=gen(0))
    ref = newton_schulz(G, steps=8, dtype=F64)
    err = lambda O: float(torch.linalg.matrix_norm(O.double() - ref) / torch.linalg.matrix_norm(ref))  # noqa: E731
    plain = err(newton_schulz(G, steps=8, dtype=torch.bfloat16))
    none = err(gram_newton_schulz(G, steps=8, dtype=torch.bfloat16, restarts=()))
    default = err(gram_newton_schulz(G, steps=8, dtype=torch.bfloat16))
    assert not math.isfinite(none) or none > 10 * plain, (none, plain)
    assert default < 2 * plain, (default, plain)  # measured 0.92x


def test_default_restarts_are_every_other_step() -> None:
    assert [default_restarts(s) for s in (0, 1, 2, 3, 4, 5, 8)] == [(), (), (), (2,), (2,), (2, 4), (2, 4, 6)]


@pytest.mark.parametrize("restarts", [(0,), (5,), (2, 2), (1.5,), (True,)])
def test_bad_restarts_are_refused(restarts: tuple) -> None:
    with pytest.raises(ValueError, match="restart"):
        gram_newton_schulz(torch.randn(8, 16), steps=5, restarts=restarts)


def test_batched_equals_per_matrix_and_input_is_left_alone() -> None:
    G = known("well", (48, 112), batch=3).float() * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    for dtype in (torch.float32, torch.bfloat16):
        for g in (G, G.to(dtype)):
            before = g.clone()
            batched = gram_newton_schulz(g, dtype=dtype)
            single = torch.stack([gram_newton_schulz(x, dtype=dtype) for x in g])
            assert torch.equal(g, before)
            atol = 1e-6 if dtype == torch.float32 else 1e-2  # baddbmm vs addmm: rounding at most
            torch.testing.assert_close(batched.float(), single.float(), rtol=0, atol=atol)
            batched.add_(1.0)  # no aliasing with the input either
            assert torch.equal(g, before)


def test_zero_steps_is_the_normalized_input() -> None:
    G = torch.randn(48, 112, generator=gen(2))
    O = gram_newton_schulz(G, steps=0, dtype=torch.float32)
    torch.testing.assert_close(O, newton_schulz(G, steps=0, dtype=torch.float32))


def test_refuses_other_ranks_of_tensor() -> None:
    with pytest.raises(ValueError, match="expects"):
        gram_newton_schulz(torch.randn(2, 2, 8, 16))


# ------------------------------------------------------------------ flops


def test_flops_match_a_hand_count() -> None:
    m, n = 48, 112
    # 5 quintic steps, restarts after 2 and 4: R0, X <- QX and R <- XX^T twice, final QX: 6 products m x m x n;
    # m x m products: step 1 Z + R update (3), step 2 Z + Q (2), step 3 Z + R (3), step 4 Z + Q (2), step 5 Z (1).
    assert gram_newton_schulz_flops(m, n, 5, (2, 4)) == 6 * 2 * m * m * n + 11 * 2 * m**3
    # The reference's one restart after 2: 4 long products, 3 + 2 + 3 + 4 + 2 = 14 short ones (8 m^2 n + 28 m^3).
    assert gram_newton_schulz_flops(m, n, 5, (2,)) == 8 * m * m * n + 28 * m**3
    # No restart: R0 and QX; 3 + 4 + 4 + 4 + 2 short products.
    assert gram_newton_schulz_flops(m, n, 5) == 4 * m * m * n + 34 * m**3
    # Cubic, restarts (2, 4): no Z products; R updates after steps 1 and 3, Q products at steps 2 and 4.
    assert gram_newton_schulz_flops(m, n, 5, (2, 4), cubic=True) == 12 * m * m * n + 12 * m**3
    assert gram_newton_schulz_flops(n, m, 5, (2, 4)) == gram_newton_schulz_flops(m, n, 5, (2, 4))  # short side
    assert gram_newton_schulz_flops(m, n, 0) == 0.0
    # vs plain: cheaper at 1:4, dearer on squares.
    assert gram_newton_schulz_flops(768, 3072, 5, (2, 4)) < 0.8 * newton_schulz_flops(768, 3072, 5)
    assert gram_newton_schulz_flops(768, 768, 5, (2, 4)) > newton_schulz_flops(768, 768, 5)
    gram = OrthoConfig(gram=True)
    assert ortho_flops((m, n), gram) == gram_newton_schulz_flops(m, n, 5, (2, 4))


# ------------------------------------------------------------------ OrthoConfig, orthogonalize, profile


def test_config_dispatches_labels_and_round_trips() -> None:
    config = OrthoConfig(gram=True, dtype="float32")
    G = torch.randn(48, 112, generator=gen(4))
    torch.testing.assert_close(orthogonalize(G, config), gram_newton_schulz(G, dtype=torch.float32), rtol=0, atol=0)
    assert config.label() == "gns5-jordan-fp32" and OrthoConfig().label() == "ns5-jordan-bf16"
    explicit = OrthoConfig(gram=True, gram_restarts=[1, 3])
    assert explicit.gram_restarts == (1, 3) and explicit.restart_steps == (1, 3)
    assert explicit.label() == "gns5-jordan-bf16-rs1.3"
    assert OrthoConfig(gram=True, gram_restarts=()).label() == "gns5-jordan-bf16-rs"
    assert config.restart_steps == (2, 4)
    for c in (config, explicit):
        assert OrthoConfig.from_json(c.to_json()) == c and hash(OrthoConfig.from_json(c.to_json())) == hash(c)
    assert len({OrthoConfig(), config, explicit, OrthoConfig(dtype="float32")}) == 4
    core = OrthoConfig(method="lowrank", rank=8, gram=True)
    assert core.label() == "lowrank-r8-power1-gns5-jordan-bf16"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "svd", "gram": True}, "gram"),
        ({"method": "rsvd", "rank": 4, "gram": True}, "gram"),
        ({"method": "lowrank", "rank": 4, "core": "svd", "gram": True}, "gram"),
        ({"gram": 1}, "gram"),
        ({"gram_restarts": [2]}, "gram_restarts"),
        ({"gram": True, "gram_restarts": [5]}, "gram_restarts"),
        ({"gram": True, "gram_restarts": [0]}, "gram_restarts"),
        ({"gram": True, "gram_restarts": [3, 1]}, "gram_restarts"),
        ({"gram": True, "gram_restarts": [2, 2]}, "gram_restarts"),
        ({"gram": True, "gram_restarts": 2}, "gram_restarts"),
        ({"gram": True, "ns_steps": 2, "gram_restarts": [2]}, "gram_restarts"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError) as info:
        OrthoConfig(**kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "config",
    [
        OrthoConfig(method="lowrank", rank=8, gram=True, dtype="float32"),
        OrthoConfig(method="subset", fraction=0.5, gram=True, dtype="float32"),
    ],
    ids=["lowrank", "subset"],
)
def test_gram_core_of_lowrank_and_subset_equals_the_plain_core(config: OrthoConfig) -> None:
    G = torch.randn(48, 112, generator=gen(5))
    O = orthogonalize(G, config, generator=gen(6))
    plain = orthogonalize(G, config.replace(gram=False), generator=gen(6))
    assert rel_diff(O, plain) < 1e-4


def test_profile_accepts_round_trips_and_resolves_gram() -> None:
    doc = {
        "format": "muonprof.profile/1",
        "defaults": {"gram": True},
        "layers": {"b": {"gram": True, "gram_restarts": [1, 3], "coefficients": "you"}, "c": {"gram": False}},
    }
    profile = parse_profile(doc)
    shapes = {"a": (64, 256), "b": (64, 256), "c": (64, 256)}
    routes = {name: ("muon", "hidden matrix") for name in shapes}
    plans = resolve_layers(profile, shapes, routes)
    assert plans["a"].ortho == OrthoConfig(gram=True)
    assert plans["b"].ortho == OrthoConfig(gram=True, gram_restarts=(1, 3), coefficients="you")
    assert plans["c"].ortho == OrthoConfig()
    # What tune writes for a Gram candidate reads back as the same config.
    for config in (plans["a"].ortho, plans["b"].ortho):
        written = parse_profile({"format": "muonprof.profile/1", "layers": {"a": settings_of(config)}})
        assert resolve_layers(written, {"a": (64, 256)}, {"a": ("muon", "x")})["a"].ortho == config
    props = json_schema()["$defs"]["LayerSettings"]["properties"]
    assert {"gram", "gram_restarts"} <= props.keys()


def test_profile_refuses_bad_gram_settings_naming_the_layer() -> None:
    from muonprof.profile import ProfileError

    for bad, needle in (({"gram": "yes"}, "gram"), ({"method": "svd", "gram": True}, "gram")):
        with pytest.raises((ProfileError, ValueError), match=needle):
            profile = parse_profile({"format": "muonprof.profile/1", "layers": {"w": bad}})
            resolve_layers(profile, {"w": (16, 64)}, {"w": ("muon", "x")})


def test_profiled_muon_with_a_gram_profile_steps_like_plain_newton_schulz() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16, bias=False), nn.Linear(16, 64, bias=False), nn.Linear(64, 4))
    twin = nn.Sequential(nn.Linear(64, 16, bias=False), nn.Linear(16, 64, bias=False), nn.Linear(64, 4))
    twin.load_state_dict(model.state_dict())
    base = {"format": "muonprof.profile/1", "defaults": {"dtype": "float32"}}
    gram_opt = ProfiledMuon(model, {**base, "defaults": {"dtype": "float32", "gram": True}}, lr=0.02)
    plain_opt = ProfiledMuon(twin, base, lr=0.02)
    muon = [name for name, plan in gram_opt.plans.items() if plan.optimizer == "muon"]
    assert muon == ["0.weight", "1.weight"]  # the hidden matrices (1:4 and 4:1), with Gram
    assert all(gram_opt.plans[name].ortho == OrthoConfig(gram=True, dtype="float32") for name in muon)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 64, generator=gen(7))
    for _ in range(3):
        for net, opt in ((model, gram_opt), (twin, plain_opt)):
            opt.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
    for p, q, p0 in zip(model.parameters(), twin.parameters(), before, strict=True):
        assert not torch.equal(p, p0)  # it trained
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)  # update entries ~0.02 x 1, fp32 rounding 1e-5 of it


# ------------------------------------------------------------------ spectral model and bench


def test_spectral_model_predicts_gram_exactly() -> None:
    s = torch.logspace(0, -2, 48, dtype=F64)
    for name in ("jordan", "polar_express", "cubic"):
        plain, gram = OrthoConfig(coefficients=name), OrthoConfig(coefficients=name, gram=True)
        assert predict(s, gram) == predict(s, plain)
        G = matrix_with_spectrum(s, 48, 112, generator=gen(8))
        O = gram_newton_schulz(G, steps=5, coefficients=name, dtype=F64)
        measured = torch.linalg.svdvals(O)
        model = torch.sort(model_singular_values(s, gram), descending=True).values
        torch.testing.assert_close(measured, model, rtol=1e-9, atol=1e-12)
    assert float(rel_err(svd_polar(G), G)) < 1e-12  # the reference itself


def test_bench_grid_offers_gram_where_it_saves_flops() -> None:
    grid = GridSpec()
    candidates = build_candidates(grid)
    grams = [c for c in candidates if isinstance(c, OrthoConfig) and c.gram]
    plain = [c for c in candidates if isinstance(c, OrthoConfig) and c.method == "newton_schulz" and not c.gram]
    assert len(grams) == len(plain) == 80  # a twin of each: 5 schedules x 8 steps x 2 dtypes
    gram5 = OrthoConfig(gram=True)
    assert fits(gram5, (768, 3072)) and fits(gram5, (2304, 768)) and not fits(gram5, (768, 768))
    assert not fits(OrthoConfig(ns_steps=1, gram=True), (768, 3072))  # one step: no saving
    ratio = gram_newton_schulz_flops(768, 1536, 5, (2, 4)) / newton_schulz_flops(768, 1536, 5)
    assert fits(gram5, (768, 1536)) == (ratio <= GRAM_MAX_FLOP_RATIO)
    assert GRAM not in build_candidates(GridSpec(methods=("newton_schulz",)))
    assert not any(getattr(c, "gram", False) for c in build_candidates(GridSpec(methods=("newton_schulz",))))
    # Cost: its own timing key (per steps, dtype and restarts, not per schedule), more workspace.
    assert cost_key(gram5) != cost_key(OrthoConfig())
    assert cost_key(gram5) == cost_key(OrthoConfig(gram=True, coefficients="you"))
    assert cost_key(gram5) != cost_key(OrthoConfig(gram=True, gram_restarts=(2,)))
    k, n = 64, 256
    assert workspace_bytes(k, n, gram5) - workspace_bytes(k, n, OrthoConfig()) == 2 * 3 * k * k
