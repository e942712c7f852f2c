"""Tune: exactness of the stage-1 solvers, the Optuna study (resume, two workers, reproducibility,
refusals), stage 2 on a tiny model, the written profile, and the command's bad inputs."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

from muonprof import ProfiledMuon
from muonprof.bench import GridSpec, run_bench, save_bench
from muonprof.capture import capture_spectra, save_spectra
from muonprof.cli import app
from muonprof.ortho import OrthoConfig
from muonprof.profile import load_profile
from muonprof.tune import TuneError, build_menus, momentum_weights, open_study, tune_stage1
from muonprof.tune import stage1 as s1
from muonprof.tune.space import BASELINE_LABEL, LayerMenu, Option
from muonprof.workload import build_workload

runner = CliRunner()
GRID = GridSpec(
    methods=("newton_schulz", "svd", "lowrank"),
    steps=(1, 3, 5),
    schedules=("jordan", "polar_express"),
    dtypes=("bfloat16", "float32"),
    ranks=(8, 16),
    power_iters=(1,),
    explicit=frozenset({"dtypes"}),
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real spectra file and bench file for gpt2-tiny (a small grid, so the module stays fast)."""
    root = tmp_path_factory.mktemp("tune")
    workload = build_workload("gpt2-tiny", batch_size=2, seq_len=16, seed=0)
    spectra = capture_spectra(workload, steps=2, every=1)
    bench = run_bench(spectra, device=torch.device("cpu"), grid=GRID, seeds=1, probe=False,
                      timing={"min_repeats": 1, "max_repeats": 2, "target_s": 0.0})  # fmt: skip
    paths = {"spectra": root / "tiny.spectra.pt", "bench": root / "tiny.bench.json", "root": root}
    save_spectra(spectra, paths["spectra"])
    save_bench(bench, paths["bench"])
    return paths


def toy_menus() -> list[LayerMenu]:
    cfg = OrthoConfig()
    rows = {
        "a": [(BASELINE_LABEL, 5.0, 0.80), ("fast", 1.0, 0.60), ("mid", 2.0, 0.90), ("slow", 4.0, 0.99)],
        "b": [(BASELINE_LABEL, 5.0, 0.80), ("fast", 0.5, 0.70), ("mid", 1.5, 0.95), ("slow", 6.0, 1.00)],
        "c": [(BASELINE_LABEL, 5.0, 0.80), ("fast", 0.2, 0.50), ("mid", 3.0, 0.97)],
    }
    weights = {"a": 1.0, "b": 3.0, "c": 0.5}
    return [
        LayerMenu(name, (8, 8), "linear", weights[name], [Option(label, cfg, t, a) for label, t, a in options])
        for name, options in rows.items()
    ]


def all_assignments(menus: list[LayerMenu]) -> list[s1.Assignment]:
    combos = itertools.product(*[m.labels for m in menus])
    return [s1.evaluate(menus, dict(zip([m.name for m in menus], combo))) for combo in combos]


def test_evaluate_weights_and_worst() -> None:
    menus = toy_menus()
    a = s1.evaluate(menus, {"a": "fast", "b": "mid", "c": "mid"})
    assert a.time_s == pytest.approx(1.0 + 1.5 + 3.0)
    assert a.quality == pytest.approx((0.6 * 1 + 0.95 * 3 + 0.97 * 0.5) / 4.5)
    assert a.worst == pytest.approx(0.6)


def test_hull_points_are_pareto_optimal_and_per_layer_target_is_exact() -> None:
    menus = toy_menus()
    brute = all_assignments(menus)
    for hull_point in s1.lagrangian_hull(menus):
        dominated = [
            b for b in brute
            if b.time_s <= hull_point.time_s - 1e-12 and b.quality >= hull_point.quality + 1e-12
        ]  # fmt: skip
        assert not dominated, hull_point
    for target in (0.5, 0.9, 0.95, 0.99):
        got = s1.fastest_per_layer(menus, target)
        feasible = [b for b in brute if b.worst >= target]
        if feasible:
            assert got.time_s == pytest.approx(min(b.time_s for b in feasible))
    # The Pareto set of everything equals the brute-force front.
    front = s1.pareto_set(brute)
    for p in front:
        assert not any(b.time_s < p.time_s and b.quality > p.quality for b in brute)


def test_select_by_target_and_budget_and_unreachable() -> None:
    pool = s1.pareto_set(all_assignments(toy_menus()))
    fastest = s1.select(pool, target_alignment=0.9)
    assert fastest.quality >= 0.9
    assert all(a.time_s >= fastest.time_s for a in pool if a.quality >= 0.9)
    within = s1.select(pool, time_budget_s=5.0)
    assert within.time_s <= 5.0
    assert all(a.quality <= within.quality for a in pool if a.time_s <= 5.0)
    with pytest.raises(TuneError, match=r"best reachable is 0\.99"):
        s1.select(pool, target_alignment=0.9999)
    with pytest.raises(TuneError, match="fastest takes 1700 ms"):
        s1.select(pool, time_budget_s=0.0001)


def stage1_kwargs(files: dict[str, Path], storage: str, **extra: object) -> dict[str, object]:
    from muonprof.bench import load_bench
    from muonprof.capture import load_spectra

    spectra = load_spectra(files["spectra"])
    base = dict(
        bench=load_bench(files["bench"]),
        spectra=spectra,
        storage=storage,
        study_name="t",
        fingerprint=spectra.meta["fingerprint"],
        model="gpt2-tiny",
        trials=12,
        seed=3,
        target_alignment=0.9,
        time_budget_s=None,
    )
    base.update(extra)
    return base


def test_stage1_beats_or_matches_baseline_resumes_and_reproduces(files: dict[str, Path], tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'a.db'}"
    first = tune_stage1(**stage1_kwargs(files, storage))
    assert first.choice.quality >= 0.9
    assert first.choice.time_s <= first.baseline.time_s or first.choice.quality > first.baseline.quality
    study = optuna.load_study(study_name="t-ortho", storage=storage)
    seeds = [t for t in study.trials if "seed" in t.user_attrs]
    assert len(study.trials) - len(seeds) == 12 and study.user_attrs["model"] == "gpt2-tiny"
    assert {t.user_attrs["seed"] for t in seeds} >= {"baseline", "hull"}
    # Resuming with a larger budget runs only the difference, and the seeds are not added twice.
    again = tune_stage1(**stage1_kwargs(files, storage, trials=20))
    assert again.trials_run == 8
    assert len(optuna.load_study(study_name="t-ortho", storage=storage).trials) == len(seeds) + 20
    # Same inputs and seed in a fresh storage: the same profile.
    other = tune_stage1(**stage1_kwargs(files, f"sqlite:///{tmp_path / 'b.db'}"))
    assert other.choice.picks == first.choice.picks
    # A study holding another model's trials is refused.
    with pytest.raises(TuneError, match="another --study-name"):
        tune_stage1(**stage1_kwargs(files, storage, fingerprint="sha256:0000000000000000"))


def test_weights_are_rule_factor_times_nuclear_norm(files: dict[str, Path]) -> None:
    from muonprof.bench import load_bench
    from muonprof.capture import load_spectra

    spectra = load_spectra(files["spectra"])
    weights = momentum_weights(spectra)
    name = "blocks.0.mlp.up_proj.weight"  # 256 x 64: sqrt(256 / 64) = 2
    assert weights[name] == pytest.approx(2 * float(spectra.captures[-1].momentum[name].sum()), rel=1e-6)
    menus = build_menus(load_bench(files["bench"]), weights, floor=0.0)
    for menu in menus:
        assert BASELINE_LABEL in menu.labels
        times = [o.time_s for o in menu.options if o.label != BASELINE_LABEL]
        assert times == sorted(times)


def test_interrupted_study_keeps_its_trials(files: dict[str, Path], tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'i.db'}"

    def stop_after_five(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if "seed" not in trial.user_attrs and trial.number >= 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_stage1(**stage1_kwargs(files, storage, trials=40, on_trial=stop_after_five))
    trials = optuna.load_study(study_name="t-ortho", storage=storage).trials
    kept = len([t for t in trials if "seed" not in t.user_attrs and t.state.is_finished()])
    assert kept >= 1
    resumed = tune_stage1(**stage1_kwargs(files, storage, trials=kept + 3))
    assert resumed.trials_run in (3, 4)  # 4: the trial interrupted mid-way was stored as failed


def test_two_workers_share_one_journal_storage(files: dict[str, Path], tmp_path: Path) -> None:
    journal = tmp_path / "shared.journal"
    script = textwrap.dedent(
        f"""
        from muonprof.bench import load_bench
        from muonprof.capture import load_spectra
        from muonprof.tune import tune_stage1
        spectra = load_spectra({str(files['spectra'])!r})
        r = tune_stage1(load_bench({str(files['bench'])!r}), spectra, storage={f'journal:{journal}'!r},
                        study_name="w", fingerprint=spectra.meta["fingerprint"], model="gpt2-tiny", trials=30,
                        seed=0, target_alignment=0.9, time_budget_s=None)
        print(r.trials_run)
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="w-ortho", storage=JournalStorage(JournalFileBackend(str(journal))))
    finished = [t for t in study.trials if t.state.is_finished() and "seed" not in t.user_attrs]
    assert len(finished) == 30  # the budget counts running trials too: no overshoot
    assert sum(int(o.strip().splitlines()[-1]) for o in outputs) >= 30 - 16  # both contributed to the budget


def test_storage_errors() -> None:
    with pytest.raises(TuneError, match="cannot open Optuna storage"):
        open_study("postgresql://nobody@127.0.0.1:1/none", "x", fingerprint="f", model="m", stage="s",
                   direction="minimize")  # fmt: skip
    with pytest.raises(TuneError, match="RDB URL"):
        open_study("not a url", "x", fingerprint="f", model="m", stage="s", direction="minimize")


def test_cli_from_spectra_and_bench_to_a_loadable_profile(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "profiles" / "tiny.json"
    plot = tmp_path / "front.png"
    args = ["tune", str(files["spectra"]), "--bench", str(files["bench"]), "--trials", "15", "--lr-trials", "3",
            "--race-candidates", "0", "--lr-steps", "4", "--batch-size", "2", "--out", str(out), "--plot", str(plot),
            "--json", "--target-alignment", "0.9"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["choice"]["quality"] >= 0.9 and summary["lr"] is not None
    assert plot.read_bytes()[:4] == b"\x89PNG"
    profile = load_profile(out)
    assert profile.model.name == "gpt2-tiny" and profile.provenance.study["stage1"].endswith("-ortho")
    layer = profile.layers["blocks.0.attn.q_proj.weight"]
    assert layer.measured is not None and layer.measured.baseline_time_ms is not None and layer.lr_scale > 0
    # The new user's next step: train with it.
    workload = build_workload("gpt2-tiny", batch_size=2, seq_len=16)
    opt = ProfiledMuon(workload.model, profile=str(out))
    loss = workload.loss(workload.train_batch(0))
    loss.backward()
    opt.step()
    shown = runner.invoke(app, ["profile", "show", str(out), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["speedup"] > 0
    # Rerunning with the same study finds the trials already there and writes the same recipes.
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["choice"]["picks"] == summary["choice"]["picks"]


def test_cli_ladders_start_at_the_shipped_recipes_with_their_own_lr_scales(
    files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "adaptive.json"
    args = ["tune", str(files["spectra"]), "--bench", str(files["bench"]), "--trials", "15", "--lr-trials", "0",
            "--race-candidates", "0", "--batch-size", "2", "--out", str(out), "--json", "--ladders"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    notes = json.loads(result.stdout)["notes"]
    profile = load_profile(out)
    laddered = {name: layer for name, layer in profile.layers.items() if layer.ladder is not None}
    assert laddered, notes
    assert any("adaptive ladders on" in n and "validate" in n for n in notes), notes
    for name, layer in laddered.items():
        rungs = layer.ladder.rungs
        assert len(rungs) >= 2 and 0.0 <= layer.ladder.floor <= 1.0
        start = rungs[layer.ladder.start]
        assert start.lr_scale == pytest.approx(layer.lr_scale), name  # the shipped recipe, at its raced scale
        assert (start.method or "newton_schulz") == (layer.method or "newton_schulz"), name
        assert all(r.lr_scale is not None and r.lr_scale > 0 for r in rungs), name
    workload = build_workload("gpt2-tiny", batch_size=2, seq_len=16)
    opt = ProfiledMuon(workload.model, profile=str(out))
    assert any(plan.ladder is not None for plan in opt.plans.values())
    workload.loss(workload.train_batch(0)).backward()
    opt.step()
    # Without --ladders the same study writes no ladder.
    plain = tmp_path / "plain.json"
    again = runner.invoke(app, [*args[:-1], "--no-ladders", "--out", str(plain)])
    assert again.exit_code == 0, again.stderr
    assert all(layer.ladder is None for layer in load_profile(plain).layers.values())


def test_cli_bad_inputs(files: dict[str, Path], tmp_path: Path) -> None:
    base = ["tune", str(files["spectra"]), "--bench", str(files["bench"]), "--lr-trials", "0"]
    out = ["--out", str(tmp_path / "p.json")]
    r = runner.invoke(app, [*base, "--trials", "0", *out])
    assert r.exit_code == 2 and "--trials" in r.stderr
    r = runner.invoke(app, [*base, "--trials", "2", "--time-budget-ms", "0.000001", *out])
    assert r.exit_code == 2 and "the fastest takes" in r.stderr and "Traceback" not in r.stderr
    r = runner.invoke(app, [*base, "--storage", "postgresql://nobody@127.0.0.1:1/none", *out])
    assert r.exit_code == 2 and "cannot open Optuna storage" in r.stderr
    # A bench file from another model.
    other = json.loads(files["bench"].read_text())
    other["meta"]["spectra"]["fingerprint"] = "sha256:ffffffffffffffff"
    (tmp_path / "other.bench.json").write_text(json.dumps(other))
    r = runner.invoke(app, ["tune", str(files["spectra"]), "--bench", str(tmp_path / "other.bench.json"), *out])
    assert r.exit_code == 2 and "measured on" in r.stderr
    assert not (tmp_path / "p.json").exists()


def test_stage2_reproduces_and_enqueues_the_defaults_first(files: dict[str, Path], tmp_path: Path) -> None:
    from muonprof.bench import load_bench
    from muonprof.capture import load_spectra
    from muonprof.tune import tune_stage2

    spectra = load_spectra(files["spectra"])
    menus = build_menus(load_bench(files["bench"]), momentum_weights(spectra), floor=0.0)
    picks = {m.name: m.option(BASELINE_LABEL).config for m in menus}

    def run(db: str) -> object:
        return tune_stage2(
            lambda: build_workload("gpt2-tiny", batch_size=2, seq_len=16, seed=0), menus, picks,
            storage=f"sqlite:///{tmp_path / db}", study_name="lr", fingerprint=spectra.meta["fingerprint"],
            model="gpt2-tiny", trials=3, steps=4, eval_every=2, seed=5,
        )  # fmt: skip

    first, second = run("a.db"), run("b.db")
    assert first.choice == second.choice and first.best_value == second.best_value
    assert first.default_value is not None and first.best_value <= first.default_value
    study = optuna.load_study(study_name="lr-lr", storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert study.trials[0].params["lr_mult"] == 1.0 and study.trials[0].params["lr_rule"] == "original"
    assert set(first.scales) == {m.name for m in menus} and all(s > 0 for s in first.scales.values())


def test_tune_passes_the_whole_bench_grid_to_bench(files: dict[str, Path], tmp_path: Path) -> None:
    """--methods/--ranks/--ns-steps/--schedules/--dtype/--bench-seeds reach bench as bench's own flags would."""
    runner = CliRunner()
    out = tmp_path / "g.json"
    grid = ["--methods", "newton_schulz", "--ns-steps", "2,4", "--schedules", "jordan", "--dtype", "fp32"]
    r = runner.invoke(
        app,
        ["tune", str(files["spectra"]), *grid, "--bench-seeds", "1", "--trials", "3", "--lr-trials", "0",
         "--race-candidates", "0", "--out", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    benched = json.loads(out.with_name("g.bench.json").read_text())["meta"]["grid"]
    assert benched["methods"] == ["newton_schulz"] and benched["steps"] == [2, 4]
    assert benched["schedules"] == ["jordan"] and benched["dtypes"] == ["float32"]
    r = runner.invoke(app, ["tune", str(files["spectra"]), "--schedules", "nope", "--out", str(tmp_path / "h.json")])
    assert r.exit_code != 0 and "--schedules" in r.output and "Traceback" not in r.output
