"""Tune under --state-memory-budget: the knapsack helpers, stage 1 with a budget on a real tiny model, the
written profile (momentum_rank entries, predicted state vs the budget), and the flag's bad values."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from muonprof import ProfiledMuon
from muonprof.bench import GridSpec, load_bench, run_bench, save_bench
from muonprof.bench.candidates import MomentumRank
from muonprof.capture import capture_spectra, load_spectra, save_spectra
from muonprof.cli import app
from muonprof.optim.routing import route_module
from muonprof.optim.state_memory import muon_state_bytes, plans_state_bytes
from muonprof.ortho import OrthoConfig
from muonprof.profile import load_profile, resolve_layers
from muonprof.train import optimizer_state_bytes
from muonprof.tune import TuneError, build_menus, momentum_weights, settings_of, tune_stage1
from muonprof.tune import stage1 as s1
from muonprof.tune.space import BASELINE_LABEL, LayerMenu, Option
from muonprof.workload import build_workload

runner = CliRunner()
GRID = GridSpec(
    methods=("newton_schulz", "momentum_rank"),
    steps=(1, 5),
    schedules=("jordan",),
    dtypes=("bfloat16", "float32"),
    ranks=(8, 16),
    explicit=frozenset({"dtypes"}),
)
MODEL = ("gpt2-tiny", {"batch_size": 2, "seq_len": 16, "seed": 0})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory")
    workload = build_workload(MODEL[0], **MODEL[1])
    spectra = capture_spectra(workload, steps=2, every=1)
    bench = run_bench(spectra, device=torch.device("cpu"), grid=GRID, seeds=1, probe=False,
                      timing={"min_repeats": 1, "max_repeats": 1, "target_s": 0.0})  # fmt: skip
    paths = {"spectra": root / "tiny.spectra.pt", "bench": root / "tiny.bench.json"}
    save_spectra(spectra, paths["spectra"])
    save_bench(bench, paths["bench"])
    return paths


def default_muon_state() -> int:
    """The default profile's Muon state of gpt2-tiny, from the optimizer's own plans."""
    model = build_workload(MODEL[0], **MODEL[1]).model
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return plans_state_bytes(resolve_layers(None, shapes, route_module(model)).values())["muon"]


# ---------------------------------------------------------------------------------------- the knapsack


def toy_menus() -> list[LayerMenu]:
    ns, low = OrthoConfig(), MomentumRank(2)
    rows = {  # (label, time, alignment, state bytes)
        "a": [(BASELINE_LABEL, 5.0, 0.80, 100), ("fast", 1.0, 0.60, 100), ("r2", 2.0, 0.75, 30), ("r1", 1.5, 0.5, 15)],
        "b": [(BASELINE_LABEL, 5.0, 0.80, 400), ("slow", 6.0, 1.00, 400), ("r4", 3.0, 0.9, 90), ("r1", 2.0, 0.4, 25)],
        "c": [(BASELINE_LABEL, 5.0, 0.80, 50), ("r1", 0.5, 0.70, 10)],
    }
    weights = {"a": 1.0, "b": 3.0, "c": 0.5}
    return [
        LayerMenu(name, (8, 8), "linear", weights[name],
                  [Option(lbl, ns if lbl[0] != "r" else low, t, a, state_bytes=b) for lbl, t, a, b in options])
        for name, options in rows.items()
    ]  # fmt: skip


def brute(menus: list[LayerMenu]) -> list[s1.Assignment]:
    names = [m.name for m in menus]
    return [s1.evaluate(menus, dict(zip(names, combo))) for combo in itertools.product(*[m.labels for m in menus])]


def test_fit_state_meets_the_budget_with_the_least_quality_lost() -> None:
    menus = toy_menus()
    everything = brute(menus)
    assert s1.min_state_bytes(menus) == 15 + 25 + 10
    q = s1.quality_multiplier(menus)
    for budget in (50, 80, 150, 200, 300, 500, 550):
        fitted = s1.fit_state(menus, s1.lagrangian_picks(menus, q), budget, lam=q)
        assert fitted is not None and fitted.state_bytes <= budget
        best = max(a.quality for a in everything if a.state_bytes <= budget)
        assert fitted.quality == pytest.approx(best, abs=1e-12), budget
    assert s1.fit_state(menus, s1.lagrangian_picks(menus, q), 49, lam=q) is None
    near = s1.fit_state(menus, {m.name: BASELINE_LABEL for m in menus}, 500, lam=q)  # from the default
    assert near is not None and near.state_bytes <= 500 and near.quality > s1.baseline(menus).quality
    # Every memory seed fits, and with the target at the default's quality the fastest such seed is optimal.
    base = s1.baseline(menus)
    seeds = s1.memory_seeds(menus, 200, [base])
    assert seeds and all(a.state_bytes <= 200 for a in seeds)
    reaching = [a for a in everything if a.state_bytes <= 200 and a.quality >= base.quality]
    pick = s1.select(s1.pareto_set(seeds), target_alignment=base.quality, state_budget=200)
    assert pick.time_s == pytest.approx(min(a.time_s for a in reaching))
    with pytest.raises(TuneError, match="no profile fits --state-memory-budget"):
        s1.select(seeds, state_budget=10)


# ----------------------------------------------------------------------------------- stage 1 and bench


def test_bench_state_bytes_and_menus(files: dict[str, Path]) -> None:
    bench = load_bench(files["bench"])
    assert bench.summary["default_state_bytes"] == default_muon_state()
    for cost in bench.costs:
        rank = cost.config.rank if isinstance(cost.config, MomentumRank) else None
        assert cost.state_bytes == muon_state_bytes(cost.shape, momentum_rank=rank)
    spectra = load_spectra(files["spectra"])
    plain = build_menus(bench, momentum_weights(spectra), floor=0.0)
    assert not any(isinstance(o.config, MomentumRank) for m in plain for o in m.options)  # no budget: left out
    memory = build_menus(bench, momentum_weights(spectra), floor=0.0, memory=True)
    assert all(any(isinstance(o.config, MomentumRank) for o in m.options) for m in memory)
    assert {o.state_bytes for m in memory for o in m.options if o.label == "momentum_rank-r8"} == {
        (64 + 64 + 1) * 8 * 4 + 4,
        (256 + 64 + 1) * 8 * 4 + 4,
    }


def test_stage1_within_budget_and_impossible_budget(files: dict[str, Path], tmp_path: Path) -> None:
    bench, spectra = load_bench(files["bench"]), load_spectra(files["spectra"])
    kwargs = dict(spectra=spectra, study_name="m", fingerprint=spectra.meta["fingerprint"], model="gpt2-tiny",
                  trials=8, seed=0, target_alignment=None, time_budget_s=None, floor=0.0)  # fmt: skip
    default = default_muon_state()
    budget = int(default * 0.6)
    got = tune_stage1(bench, storage=f"sqlite:///{tmp_path / 'a.db'}", state_budget=budget, **kwargs)
    assert got.baseline.state_bytes == default
    assert got.choice.state_bytes <= budget and all(a.state_bytes <= budget for a in got.front)
    assert any(isinstance(m.option(got.choice.picks[m.name]).config, MomentumRank) for m in got.menus)
    # A budget the default already meets is no constraint: the same pick as without one.
    free = tune_stage1(bench, storage=f"sqlite:///{tmp_path / 'b.db'}", state_budget=default, **kwargs)
    none = tune_stage1(bench, storage=f"sqlite:///{tmp_path / 'c.db'}", **kwargs)
    assert free.choice.picks == none.choice.picks and any("no constraint" in n for n in free.notes)
    least = bench.summary["min_state_bytes"]
    with pytest.raises(TuneError, match=rf"below the minimum Muon state .*\({least} bytes\)") as info:
        tune_stage1(bench, storage=f"sqlite:///{tmp_path / 'd.db'}", state_budget=least - 1, **kwargs)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_budget_to_a_profile_within_it(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tiny.profile.json"
    default = default_muon_state()
    budget = int(default * 0.6)
    args = ["tune", str(files["spectra"]), "--bench", str(files["bench"]), "--trials", "8", "--lr-trials", "2",
            "--race-candidates", "0", "--lr-steps", "2", "--batch-size", "2", "--out", str(out),
            "--state-memory-budget", f"{budget}B"]  # fmt: skip
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    state = summary["state_memory"]
    assert state["budget"] == budget and state["muon"] <= budget and state["muon_default"] == default
    assert state["adamw"] > 0 and state["total"] == state["muon"] + state["adamw"]
    assert summary["choice"]["state_bytes"] == state["muon"]

    profile = load_profile(out)
    assert profile.provenance.study["state_memory_budget"] == budget
    assert profile.provenance.study["state_memory"]["muon"] == state["muon"]
    ranked = {n: e for n, e in profile.layers.items() if e.momentum_rank is not None}
    assert ranked
    for entry in ranked.values():
        assert entry.method is None and entry.ns_steps is None and entry.dtype is None and entry.rank is None
        assert entry.measured.state_bytes == muon_state_bytes(entry.shape, momentum_rank=entry.momentum_rank)
        assert entry.lr_scale > 0
    # The optimizer's own plans predict the same Muon state, within the budget and below the default.
    workload = build_workload(MODEL[0], **MODEL[1])
    shapes = {n: tuple(p.shape) for n, p in workload.model.named_parameters()}
    plans = resolve_layers(profile, shapes, route_module(workload.model))
    predicted = plans_state_bytes(plans.values())
    assert predicted["muon"] == state["muon"] <= budget < default and predicted["adamw"] == state["adamw"]
    optimizer = ProfiledMuon(workload.model, profile=str(out))
    assert {n for n, p in optimizer.plans.items() if p.momentum_rank is not None} == set(ranked)
    workload.loss(workload.train_batch(0)).backward()
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == predicted["total"]  # the live state is what was predicted

    table = runner.invoke(app, args)  # the same study again: its trials are reused
    assert table.exit_code == 0, table.stderr
    assert "optimizer state (fp32): Muon" in table.stdout and "budget" in table.stdout


def test_settings_of_a_momentum_rank_is_that_key_alone() -> None:
    assert settings_of(MomentumRank(16)) == {"momentum_rank": 16}


@pytest.mark.parametrize(
    ("value", "message"),
    [("12 parsecs", "--state-memory-budget"), ("-5MB", "positive"), ("1kB", "below the minimum Muon state")],
)
def test_cli_bad_budgets_are_one_line_errors(files: dict[str, Path], tmp_path: Path, value: str, message: str) -> None:
    out = tmp_path / "p.json"
    args = ["tune", str(files["spectra"]), "--bench", str(files["bench"]), "--trials", "2", "--lr-trials", "0",
            "--out", str(out), "--state-memory-budget", value]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output and not out.exists()
