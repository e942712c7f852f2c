"""Bench: the grid, the timing harness, the three accuracy sources, Pareto logic, the artifact and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from muonprof.bench import (
    BASELINE,
    BenchError,
    CostRecord,
    GridError,
    GridSpec,
    Point,
    build_candidates,
    candidate_label,
    layer_accuracy,
    load_bench,
    measure_costs,
    pareto_front,
    parse_grid,
    run_bench,
    save_bench,
    simulate_accuracy,
    spectral_accuracy,
    time_op,
)
from muonprof.bench import cost as cost_module
from muonprof.bench.accuracy import NEEDS_MATRICES, model_check
from muonprof.bench.candidates import MomentumRank, check_ranks, fits
from muonprof.bench.pareto import fastest_reaching, layer_points, model_summary
from muonprof.capture import LayerRecord, Spectra, capture_spectra, save_spectra
from muonprof.commands.bench import register
from muonprof.device import DeviceRates
from muonprof.device.probe import Timer
from muonprof.optim.lowrank_momentum import compress, polar_of_factors
from muonprof.optim.state_memory import muon_state_bytes
from muonprof.ortho import OrthoConfig, orthogonalize
from muonprof.ortho.quality import alignment, matrix_with_spectrum, rel_err
from muonprof.workload import Workload

CPU = torch.device("cpu")
runner = CliRunner()


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # a callback keeps "bench" a named subcommand
        pass

    return app


def spectrum(k: int, decay: float = 0.8, floor: float = 0.0) -> torch.Tensor:
    return torch.tensor([decay**i + floor for i in range(k)], dtype=torch.float32)


def tiny_spectra(matrices: bool = False) -> Spectra:
    """Three Muon layers of two shapes and one AdamW layer, built by hand (no training)."""
    shapes = {"a.weight": (24, 16), "b.weight": (24, 16), "c.weight": (32, 32), "head.weight": (5, 32)}
    roles = {"a.weight": "mlp_up", "b.weight": "mlp_up", "c.weight": "attn_out", "head.weight": "head"}
    layers = [LayerRecord(n, s, s, roles[n], "adamw" if n == "head.weight" else "muon") for n, s in shapes.items()]
    gen = torch.Generator().manual_seed(0)
    momentum = {n: spectrum(min(s), 0.7 + 0.05 * i) for i, (n, s) in enumerate(shapes.items())}
    mats = None
    if matrices:
        mats = {
            "grad": {},
            "momentum": {
                n: matrix_with_spectrum(momentum[n].double(), *s, generator=gen).float() for n, s in shapes.items()
            },
        }
    from muonprof.capture import CaptureRecord

    capture = CaptureRecord(step=1, loss=1.0, grad=dict(momentum), momentum=momentum)
    return Spectra(
        meta={"fingerprint": "abc", "model": {"spec": "tiny"}}, layers=layers, captures=[capture], matrices=mats
    )


class FakeClock:
    """A clock that only moves when an op says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------------ grid


def test_default_grid_has_baseline_first_and_the_whole_family() -> None:
    cands = build_candidates(GridSpec())
    assert cands[0] == BASELINE and candidate_label(BASELINE) == "ns5-jordan-bf16"
    labels = [candidate_label(c) for c in cands]
    assert len(labels) == len(set(labels))
    assert {"svd", "ns8-polar_express-fp32", "ns1-cubic-bf16", "lowrank-r256-power2-ns5-jordan-bf16"} <= set(labels)
    assert "lowrank-r16-cols-ns5-jordan-fp32" in labels and "rsvd-r64-p1-o8-bf16" in labels


def test_flags_narrow_the_grid_and_keep_the_baseline() -> None:
    grid = parse_grid(
        methods="newton_schulz,lowrank", ranks="32,64", steps="3,5", schedules="polar_express", dtypes="fp32"
    )
    labels = [candidate_label(c) for c in build_candidates(grid)]
    assert labels[0] == "ns5-jordan-bf16"  # baseline, though bf16 and jordan were not asked for
    assert "ns3-polar_express-fp32" in labels and "ns5-polar_express-fp32" in labels
    assert not any(lbl.startswith(("svd", "rsvd")) for lbl in labels)
    assert {"lowrank-r32-power0-ns5-jordan-fp32", "lowrank-r64-cols-ns5-jordan-fp32"} <= set(labels)
    assert len(labels) == 1 + 2 + 2 * 4
    assert grid.explicit == {"methods", "ranks", "steps", "schedules", "dtypes"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": "newton_schulz,magic"}, "unknown method magic"),
        ({"schedules": "jordan,nope"}, "unknown schedule nope"),
        ({"ranks": "0"}, "must be positive"),
        ({"ranks": "-4"}, "must be positive"),
        ({"ranks": "abc"}, "not an integer"),
        ({"dtypes": "fp8"}, "unknown dtype fp8"),
        ({"steps": ""}, "empty"),
    ],
)
def test_bad_flags_are_one_line_grid_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(GridError, match=message) as info:
        parse_grid(**kwargs)
    assert "\n" not in str(info.value)


def test_ranks_are_checked_against_the_layers() -> None:
    shapes = [(24, 16), (32, 32)]
    grid, notes = check_ranks(GridSpec(), shapes)  # defaults: too-big ranks dropped with a note
    assert grid.ranks == (16,) and len(notes) == 4
    assert not fits(OrthoConfig(method="rsvd", rank=16), (24, 16)) and fits(
        OrthoConfig(method="rsvd", rank=16), (32, 32)
    )
    with pytest.raises(GridError, match="--ranks: 64 not below min"):
        check_ranks(parse_grid(ranks="8,64"), shapes)
    kept, _ = check_ranks(parse_grid(ranks="8,20"), shapes)  # 20 fits the 32x32 layer only: kept
    assert kept.ranks == (8, 20)


def test_momentum_rank_family_in_the_grid() -> None:
    labels = [candidate_label(c) for c in build_candidates(GridSpec())]
    assert {"momentum_rank-r16", "momentum_rank-r256"} <= set(labels)  # in the default grid
    grid = parse_grid(methods="momentum_rank", ranks="4,20")
    cands = build_candidates(grid)
    assert [candidate_label(c) for c in cands] == ["ns5-jordan-bf16", "momentum_rank-r4", "momentum_rank-r20"]
    assert cands[1].to_dict() == {"method": "momentum_rank", "momentum_rank": 4}
    assert not fits(MomentumRank(16), (24, 16)) and fits(MomentumRank(15), (24, 16))  # below min(m, n)
    with pytest.raises(GridError, match="--ranks: 64 not below min"):
        check_ranks(parse_grid(methods="momentum_rank", ranks="8,64"), [(24, 16), (32, 32)])


# ------------------------------------------------------------------------------------------------ cost


def test_time_op_excludes_warmup_and_takes_the_median() -> None:
    clock = FakeClock()
    durations = iter([10.0, 0.3, 0.1, 0.2, 0.5, 0.4])

    def op() -> None:
        clock.now += next(durations)

    t = time_op(op, Timer(clock=clock), min_repeats=5, max_repeats=5, target_s=0.0, slow_s=20.0)
    assert t.warmup_s == 10.0 and t.repeats == 5
    assert t.median_s == pytest.approx(0.3) and t.min_s == pytest.approx(0.1) and t.max_s == pytest.approx(0.5)
    assert t.p10_s == pytest.approx(0.14) and t.p90_s == pytest.approx(0.46)
    assert t.q1_s == pytest.approx(0.2) and t.q3_s == pytest.approx(0.4)
    assert t.spread == pytest.approx((0.4 - 0.2) / 0.3)  # relative IQR
    assert t.rounds is None and t.figure_s == t.median_s  # back-to-back: no rounds, the median is the figure


def test_time_op_repeats_adapt_to_the_budget() -> None:
    def run(step: float, **kw: float) -> int:
        clock = FakeClock()

        def op() -> None:
            clock.now += step

        return time_op(op, Timer(clock=clock), **kw).repeats

    assert run(0.001, min_repeats=3, max_repeats=15, target_s=0.15) == 15  # fast: up to max_repeats
    assert run(0.05, min_repeats=3, max_repeats=15, target_s=0.15) == 3  # 3 x 0.05 reaches the budget
    assert run(0.04, min_repeats=3, max_repeats=15, target_s=0.15) == 4
    assert run(6.0, min_repeats=3, max_repeats=15, target_s=0.15, slow_s=5.0) == 1  # pathological: one sample


def test_newton_schulz_cost_is_shared_across_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake(G: torch.Tensor, config: OrthoConfig, generator: torch.Generator | None = None) -> torch.Tensor:
        calls.append(candidate_label(config))
        return G

    monkeypatch.setattr(cost_module, "orthogonalize", fake)
    grid = parse_grid(methods="newton_schulz", steps="2,5", schedules="jordan,polar_express,cubic", dtypes="bf16")
    records = measure_costs({(8, 6): 3}, build_candidates(grid), CPU, timer=Timer(clock=FakeClock()), max_repeats=3)
    timed = set(calls)
    # jordan and polar_express share per step count; cubic (one product fewer per step) is timed apart
    assert timed == {"ns5-jordan-bf16", "ns2-jordan-bf16", "ns2-cubic-bf16", "ns5-cubic-bf16"}
    by_label = {r.label: r for r in records}
    assert by_label["ns5-polar_express-bf16"].shared_from == "ns5-jordan-bf16"
    assert by_label["ns5-polar_express-bf16"].timing is by_label["ns5-jordan-bf16"].timing
    assert by_label["ns5-cubic-bf16"].shared_from is None
    assert all(r.batch == 1 and r.count == 3 for r in records)  # CPU: one matrix per call, x count per bucket


def test_out_of_memory_skips_the_candidate_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    real = cost_module.orthogonalize

    def flaky(G: torch.Tensor, config: OrthoConfig, generator: torch.Generator | None = None) -> torch.Tensor:
        if config.method == "lowrank":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(G, config, generator=generator)

    monkeypatch.setattr(cost_module, "orthogonalize", flaky)
    grid = parse_grid(methods="newton_schulz,lowrank", ranks="4", steps="2", schedules="jordan", dtypes="fp32")
    records = measure_costs({(12, 8): 1}, build_candidates(grid), CPU, max_repeats=3, target_s=0.0)
    lowrank = [r for r in records if r.config.method == "lowrank"]
    assert lowrank and all(r.skipped and r.skipped.startswith("out of memory: OutOfMemoryError") for r in lowrank)
    assert all(r.timing is not None and r.skipped is None for r in records if r.config.method == "newton_schulz")


def test_momentum_rank_is_timed_as_its_whole_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = cost_module.momentum_rank_step

    def spy(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, G: torch.Tensor, rank: int, **kw: object) -> object:
        calls.append((*U.shape, *S.shape, *V.shape, *G.shape, rank))
        return real(U, S, V, G, rank, **kw)

    monkeypatch.setattr(cost_module, "momentum_rank_step", spy)
    records = measure_costs({(12, 20): 2}, [BASELINE, MomentumRank(4)], CPU, max_repeats=2, target_s=0.0)
    low = next(r for r in records if isinstance(r.config, MomentumRank))
    assert low.timing is not None and low.batch == 1 and low.peak_memory_bytes > 0
    assert calls and set(calls) == {(12, 4, 4, 20, 4, 12, 20, 4)}
    # The direction of one step is U V^T of the recompressed momentum: orthonormal rank-4.
    U, S, V = compress(torch.randn(12, 20), 4)
    O = real(U, S, V, torch.randn(12, 20), 4)
    assert torch.linalg.svdvals(O)[:4] == pytest.approx(torch.ones(4), abs=1e-4)
    assert CostRecord.from_json(low.to_json()).config == MomentumRank(4)


def test_state_bytes_follow_the_formula() -> None:
    records = measure_costs({(24, 16): 2}, [BASELINE, MomentumRank(4)], CPU, max_repeats=1, target_s=0.0)
    by_label = {r.label: r for r in records}
    assert by_label["ns5-jordan-bf16"].state_bytes == 24 * 16 * 4 + 4
    assert by_label["momentum_rank-r4"].state_bytes == (24 + 16 + 1) * 4 * 4 + 4
    assert by_label["momentum_rank-r4"].to_json()["state_bytes"] == muon_state_bytes((24, 16), momentum_rank=4)


def test_emulated_bf16_is_skipped_unless_asked_for() -> None:
    sp = tiny_spectra()
    slow_bf16 = DeviceRates(peak_tflops={"bf16": 0.001, "fp32": 0.2})
    grid = parse_grid(methods="newton_schulz", steps="2", schedules="jordan")
    result = run_bench(sp, device=CPU, grid=grid, rates=slow_bf16, seeds=1, timing={"max_repeats": 2})
    costs = {(c.shape, c.label): c for c in result.costs}
    assert "emulated" in (costs[((32, 32), "ns2-jordan-bf16")].skipped or "")
    assert costs[((32, 32), "ns5-jordan-bf16")].timing is not None  # the baseline is always timed
    assert costs[((32, 32), "ns2-jordan-fp32")].timing is not None
    asked = parse_grid(methods="newton_schulz", steps="2", schedules="jordan", dtypes="bf16,fp32")
    result = run_bench(sp, device=CPU, grid=asked, rates=slow_bf16, seeds=1, timing={"max_repeats": 2})
    assert all(c.skipped is None for c in result.costs)


# -------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "config",
    [
        OrthoConfig(ns_steps=5, dtype="float32"),
        OrthoConfig(ns_steps=3, coefficients="polar_express", dtype="float32"),
        OrthoConfig(ns_steps=8, coefficients="cubic", dtype="float32"),
        OrthoConfig(method="svd"),
    ],
)
def test_spectral_model_matches_the_real_method(config: OrthoConfig) -> None:
    s = spectrum(16, 0.75, 0.01)
    G = matrix_with_spectrum(s.double(), 24, 16, generator=torch.Generator().manual_seed(3))
    O = orthogonalize(G.float(), config)
    model = spectral_accuracy(s, config)
    assert model["source"] == "spectral-model"
    assert model["alignment"] == pytest.approx(float(alignment(O, G)), abs=1e-4)
    assert model["rel_err"] == pytest.approx(float(rel_err(O, G)), abs=1e-4)
    sv = torch.linalg.svdvals(O.double())
    assert model["sv_min"] == pytest.approx(float(sv.min()), abs=1e-4)
    assert model["sv_max"] == pytest.approx(float(sv.max()), abs=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        OrthoConfig(method="lowrank", rank=4, power_iters=1, dtype="float32"),
        OrthoConfig(method="lowrank", rank=6, power_iters=0, dtype="float32"),
        OrthoConfig(method="rsvd", rank=4, power_iters=1, dtype="float32"),
    ],
)
def test_simulation_on_square_diag_matches_a_direct_run(config: OrthoConfig) -> None:
    """Seed for seed, the k x k diag(s) run equals the run on the m x n diag(s) (see simulate_accuracy)."""
    s = spectrum(16, 0.8)
    sim = simulate_accuracy(s, config, seeds=1)
    assert sim["source"] == "simulated (1 seeds)"
    for m, n in ((16, 40), (40, 16)):
        G = torch.zeros(m, n)
        G[torch.arange(16), torch.arange(16)] = s
        O = orthogonalize(G, config, generator=torch.Generator().manual_seed(0))
        assert sim["alignment"] == pytest.approx(float(alignment(O, G)), abs=2e-4)
        assert sim["rel_err"] == pytest.approx(float(rel_err(O, G)), abs=2e-4)
        top = torch.linalg.svdvals(O.double())[: config.rank]
        assert sim["sv_min"] == pytest.approx(float(top.min()), abs=2e-3)
        assert sim["sv_max"] == pytest.approx(float(top.max()), abs=2e-3)
    several = simulate_accuracy(s, config, seeds=3)
    assert several["alignment_worst"] <= several["alignment"] <= 1.0 and several["source"] == "simulated (3 seeds)"


def test_momentum_rank_accuracy_grows_with_rank_and_is_exact_on_low_rank_spectra() -> None:
    s = spectrum(32, 0.8)
    table = layer_accuracy(s, [MomentumRank(r) for r in (2, 4, 8, 16)], seeds=3)
    aligns = [table[f"momentum_rank-r{r}"]["alignment"] for r in (2, 4, 8, 16)]
    errs = [table[f"momentum_rank-r{r}"]["rel_err"] for r in (2, 4, 8, 16)]
    assert aligns == sorted(aligns) and aligns[-1] > 0.95 and errs == sorted(errs, reverse=True)
    assert table["momentum_rank-r4"]["source"] == "simulated (3 seeds)"
    assert table["momentum_rank-r4"]["alignment_worst"] <= table["momentum_rank-r4"]["alignment"]
    low = torch.tensor([1.0, 0.6, 0.3, 0.1] + [0.0] * 28)  # rank 4 <= r: the exact polar factor
    for r in (4, 8):
        got = simulate_accuracy(low, MomentumRank(r), seeds=2)
        assert got["alignment_worst"] > 1 - 1e-4 and got["rel_err_worst"] < 1e-4
    # The simulation on diag(s) is what the real matrix with that spectrum gives (rotation invariance).
    G = matrix_with_spectrum(s.double(), 40, 32, generator=torch.Generator().manual_seed(2)).float()
    direct = [
        float(alignment(polar_of_factors(*compress(G, 8, generator=torch.Generator().manual_seed(i))), G))
        for i in range(8)
    ]
    assert sum(direct) / 8 == pytest.approx(table["momentum_rank-r8"]["alignment"], abs=0.03)


def test_columns_need_the_real_matrix() -> None:
    s = spectrum(16, 0.8)
    cols = OrthoConfig(method="lowrank", rank=4, range_finder="columns", power_iters=0, oversample=0, dtype="float32")
    ns = OrthoConfig(ns_steps=5, dtype="float32")
    table = layer_accuracy(s, [ns, cols], seeds=2)
    assert table[candidate_label(cols)] == {"source": NEEDS_MATRICES}
    points = layer_points(table, {candidate_label(cols): 1e-6, candidate_label(ns): 1.0})
    assert [p.label for p in points] == [candidate_label(ns)]  # left out of the front

    M = matrix_with_spectrum(s.double(), 24, 16, generator=torch.Generator().manual_seed(1)).float()
    table = layer_accuracy(s, [cols], seeds=2, matrix=M)
    got = table[candidate_label(cols)]
    assert got["source"] == "real matrix (2 seeds)"
    direct = [orthogonalize(M, cols, generator=torch.Generator().manual_seed(seed)) for seed in range(2)]
    aligns = [float(alignment(O, M)) for O in direct]
    assert got["alignment"] == pytest.approx(sum(aligns) / 2, abs=1e-4)
    assert got["alignment_worst"] == pytest.approx(min(aligns), abs=1e-4)
    assert got["rel_err"] == pytest.approx(sum(float(rel_err(O, M)) for O in direct) / 2, abs=1e-4)


def test_model_check_reports_a_small_bf16_gap() -> None:
    s = spectrum(16, 0.8, 0.02)
    check = model_check([("a", (24, 16), s)])
    assert len(check["rows"]) == 3 and check["layers"] == ["a"]
    assert 0 <= check["max_gap_alignment"] < 0.05 and 0 <= check["max_gap_rel_err"] < 0.1
    fp32 = model_check([("a", (24, 16), s)], configs=[OrthoConfig(dtype="float32")])
    assert fp32["max_gap_alignment"] < 1e-4  # in fp32 the model is exact up to round-off


# ---------------------------------------------------------------------------------------------- pareto


def test_pareto_front_on_a_hand_made_example() -> None:
    pts = [
        Point("slow-exact", 10.0, 1.0),
        Point("fast-rough", 1.0, 0.6),
        Point("mid", 3.0, 0.9),
        Point("dominated", 4.0, 0.85),  # slower and less aligned than mid
        Point("tie-time", 3.0, 0.7),  # as fast as mid, less aligned
        Point("twin", 3.0, 0.9),  # exactly mid: not dominated by it
        Point("slower-same", 12.0, 1.0),
    ]
    front = pareto_front(pts)
    assert [p.label for p in front] == ["fast-rough", "mid", "twin", "slow-exact"]
    assert fastest_reaching(pts, 0.95).label == "slow-exact"
    assert fastest_reaching(pts, 0.5).label == "fast-rough"
    assert fastest_reaching(pts, 1.01) is None


def test_model_summary_default_vs_fastest_reaching_target() -> None:
    per_layer = {
        "a": [Point("ns5-jordan-bf16", 2.0, 0.90), Point("cheap", 0.5, 0.96), Point("svd", 8.0, 1.0)],
        "b": [Point("ns5-jordan-bf16", 2.0, 0.97), Point("cheap", 0.5, 0.80), Point("svd", 8.0, 1.0)],
        "c": [Point("ns5-jordan-bf16", 1.0, 0.50)],
    }
    out = model_summary(per_layer, "ns5-jordan-bf16", 0.95)
    assert out["default_step_s"] == 5.0
    assert out["choices"]["a"]["label"] == "cheap" and out["choices"]["b"]["label"] == "ns5-jordan-bf16"
    assert out["short_of_target"] == ["c"]  # nothing reaches it: the most aligned is kept
    assert out["tuned_step_s"] == 3.5 and out["speedup"] == pytest.approx(5.0 / 3.5)


# -------------------------------------------------------------------------------------- run + artifact


def test_run_bench_and_artifact_round_trip(tmp_path: Path) -> None:
    sp = tiny_spectra(matrices=True)
    grid = parse_grid(ranks="4,16", steps="1,5", schedules="jordan,polar_express", power_iters="1")
    phases: set[str] = set()
    result = run_bench(
        sp,
        device=CPU,
        grid=grid,
        seeds=2,
        probe=False,
        progress=lambda phase, _d, _i, _n: phases.add(phase),
        timing={"max_repeats": 2, "target_s": 0.0},
    )
    assert phases == {"timing", "accuracy", "model check"}
    assert [layer["name"] for layer in result.layers] == ["a.weight", "b.weight", "c.weight"]  # Muon-routed only
    costs = {(c.shape, c.label): c for c in result.costs}
    assert costs[((24, 16), "ns5-jordan-bf16")].count == 2
    assert ((24, 16), "lowrank-r4-power1-ns5-jordan-bf16") in costs
    assert ((24, 16), "rsvd-r16-p1-o8-fp32") not in costs  # rank 16 is not below min(24, 16): skipped there
    assert ((32, 32), "rsvd-r16-p1-o8-fp32") in costs and "rsvd-r16-p1-o8-fp32" in result.accuracy["c.weight"]

    acc = result.accuracy["a.weight"]
    assert acc["ns5-jordan-bf16"]["source"] == "spectral-model"
    assert acc["rsvd-r4-p1-o8-fp32"]["source"] == "simulated (2 seeds)"
    assert acc["lowrank-r4-cols-ns5-jordan-fp32"]["source"] == "real matrix (2 seeds)"
    assert set(result.fronts["roles"]) == {"mlp_up", "attn_out"}
    assert result.summary["baseline"] == "ns5-jordan-bf16" and result.summary["speedup"] > 0
    assert result.model_check["max_gap_alignment"] is not None and len(result.model_check["layers"]) == 2
    assert result.meta["spectra"]["fingerprint"] == "abc" and result.meta["memory_source"].startswith("estimate")
    assert result.meta["telemetry"]["samples"] >= 2

    # Optimizer state: per cost record, per front point, and the model summary (3 Muon layers, fp32).
    assert costs[((24, 16), "ns5-jordan-bf16")].state_bytes == 24 * 16 * 4 + 4
    assert costs[((32, 32), "momentum_rank-r16")].state_bytes == (32 + 32 + 1) * 16 * 4 + 4
    assert all("state_bytes" in p for pts in result.fronts["layers"].values() for p in pts)
    default = 2 * (24 * 16 * 4 + 4) + 32 * 32 * 4 + 4
    assert result.summary["default_state_bytes"] == default
    assert result.summary["min_state_bytes"] == 2 * ((24 + 16 + 1) * 4 * 4 + 4) + (32 + 32 + 1) * 4 * 4 + 4
    assert result.fronts["roles_state"]["attn_out"][0]["label"] == "momentum_rank-r4"

    path = save_bench(result, tmp_path / "x.bench.json")
    back = load_bench(path)
    assert back.to_json() == json.loads(result.dumps())
    assert back.summary == result.summary and back.costs[0].config == result.costs[0].config

    # A bench/1 file from before state_bytes existed: the bench/1 -> bench/2 migration derives the numbers
    # from the shapes on load.
    old = json.loads(path.read_text())
    old["format"] = "muonprof.bench/1"
    for c in old["costs"]:
        del c["state_bytes"]
    for key in ("default_state_bytes", "tuned_state_bytes", "min_state_bytes"):
        del old["summary"][key]
    old["fronts"] = {k: v for k, v in old["fronts"].items() if k != "roles_state"}
    for pts in old["fronts"]["layers"].values():
        for p in pts:
            del p["state_bytes"]
    (tmp_path / "old.bench.json").write_text(json.dumps(old))
    assert load_bench(tmp_path / "old.bench.json").to_json() == back.to_json()

    all_layers = run_bench(sp, device=CPU, grid=parse_grid(methods="svd"), seeds=1, probe=False, all_layers=True)
    assert len(all_layers.layers) == 4


def test_bad_bench_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="no such bench file"):
        load_bench(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BenchError, match="not a muonprof bench file"):
        load_bench(bad)
    bad.write_text(json.dumps({"format": "muonprof.bench/0"}))
    with pytest.raises(BenchError, match=r"is not 'muonprof\.bench/2' and is too old to upgrade"):
        load_bench(bad)
    bad.write_text(json.dumps({"format": "muonprof.bench/1", "meta": {}}))
    with pytest.raises(BenchError, match="corrupt bench file") as info:
        load_bench(bad)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------- CLI


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 24)
        self.hidden = nn.Linear(24, 24)
        self.up = nn.Linear(24, 40)
        self.out = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.up(torch.tanh(self.hidden(torch.tanh(self.inp(x)))))))


@pytest.fixture(scope="module")
def spectra_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = Tiny()
    data = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(64, 8, generator=data), torch.randint(0, 3, (64,), generator=data)
    workload = Workload(
        spec="tiny",
        model=model,
        task=None,
        train_batch=lambda step: (xs, ys),
        val_batches=lambda: [],
        loss_fn=lambda module, batch: nn.functional.cross_entropy(module(batch[0]), batch[1]),
        batch_size=None,
        seq_len=None,
    )
    spectra = capture_spectra(workload, steps=2, every=1)
    path = tmp_path_factory.mktemp("spectra") / "tiny.spectra.pt"
    save_spectra(spectra, path)
    return path


def test_cli_json_and_plot(spectra_file: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "b.json", tmp_path / "pareto.png"
    args = ["bench", str(spectra_file), "--methods", "newton_schulz,svd,rsvd", "--ranks", "4"]
    args += ["--steps", "2,5", "--schedules", "jordan,polar_express", "--seeds", "2", "--all-layers"]
    result = runner.invoke(cli(), [*args, "--out", str(out), "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "muonprof.bench/2" and data["summary"]["baseline"] == "ns5-jordan-bf16"
    assert out.is_file() and load_bench(out).summary == data["summary"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = runner.invoke(cli(), [*args, "--out", str(out)])
    assert table.exit_code == 0, table.output
    assert "Pareto-optimal" in table.stdout and "ns5-jordan-bf16 (default)" in table.stdout.replace("\n", " ")
    assert "per step: default ns5-jordan-bf16" in table.stdout
    flat = " ".join(table.stdout.split())
    assert "Muon optimizer state" in flat and "no momentum_rank benched" in flat
    assert "KiB" in flat  # the state column, in human units
    assert "timing certainty (rounds, IQR/median):" in flat and "re-measured; load" in flat  # how sure, how busy


def test_cli_default_out_is_next_to_the_spectra(
    spectra_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from muonprof.bench import run as run_module

    rates = DeviceRates(peak_tflops={"bf16": 0.4, "fp32": 0.2})
    monkeypatch.setattr(run_module, "probe_rates", lambda device: (rates, []))
    copy = tmp_path / "tiny.spectra.pt"
    copy.write_bytes(spectra_file.read_bytes())
    result = runner.invoke(cli(), ["bench", str(copy), "--methods", "svd", "--all-layers", "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny.bench.json").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "cuda"], "--device cuda"),
        (["--methods", "magic"], "unknown method magic"),
        (["--methods", "rsvd", "--ranks", "999", "--all-layers"], "--ranks: 999 not below min"),
        (["--ranks", "0"], "must be positive"),
        (["--out", "/proc/nope/x.json"], "/proc/nope"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(spectra_file: Path, extra: list[str], message: str) -> None:
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(cli(), ["bench", str(spectra_file), "--methods", "svd", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_cli_bad_spectra_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "x.spectra.pt"
    corrupt.write_bytes(b"not a zip")
    result = runner.invoke(cli(), ["bench", str(corrupt)])
    assert result.exit_code == 2 and "not a muonprof spectra file" in result.stderr
    other = tmp_path / "old.spectra.pt"
    torch.save({"format": "muonprof.spectra/0"}, other)
    result = runner.invoke(cli(), ["bench", str(other)])
    assert result.exit_code == 2 and "re-run `muonprof spectrum`" in result.stderr
    assert not (tmp_path / "x.bench.json").exists() and not (tmp_path / "old.bench.json").exists()


def test_no_nan_in_the_artifact() -> None:
    from muonprof.bench.artifact import _finite

    assert _finite({"a": [math.nan, 1.0, math.inf]}) == {"a": [None, 1.0, None]}


def test_cli_captures_a_model_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from muonprof.bench import run as run_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_module, "probe_rates", lambda device: (DeviceRates(peak_tflops={"fp32": 0.2}), []))
    result = runner.invoke(cli(), ["bench", "mlp", "--capture-steps", "2", "--methods", "svd", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["meta"]["spectra"]["path"] == "mlp.spectra.pt"
    assert (tmp_path / "mlp.spectra.pt").is_file() and (tmp_path / "mlp.bench.json").is_file()
    bad = runner.invoke(cli(), ["bench", "no-such-model"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_interrupt_leaves_no_file(spectra_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import muonprof.bench

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(muonprof.bench, "run_bench", interrupted)
    out = tmp_path / "x.bench.json"
    result = runner.invoke(cli(), ["bench", str(spectra_file), "--out", str(out)])
    assert result.exit_code != 0 and not out.exists() and not list(tmp_path.iterdir())
