"""Stage 3, the race: successive-halving order, the verdict and the fallback on planted losses, resume after
Ctrl-C with no finished run lost, matched update size, bad options, and a real race through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

from muonprof.cli import app
from muonprof.ortho import OrthoConfig
from muonprof.profile import load_profile
from muonprof.train import EvalPoint
from muonprof.tune import TuneError
from muonprof.tune import stage1 as s1
from muonprof.tune.race import (
    Contender,
    JobResult,
    RaceOptions,
    build_contenders,
    pick_candidates,
    run_race,
    update_size_factors,
)
from muonprof.tune.space import BASELINE_LABEL, LayerMenu, Option
from muonprof.tune.stage2 import LrChoice

runner = CliRunner()
JORDAN5 = OrthoConfig()
POLAR5 = OrthoConfig(coefficients="polar_express")
JORDAN3 = OrthoConfig(ns_steps=3)
LOWRANK = OrthoConfig(method="lowrank", rank=2)


def menus() -> list[LayerMenu]:
    options = [
        Option(BASELINE_LABEL, JORDAN5, 5.0, 0.80),
        Option("pe5", POLAR5, 4.0, 0.90),
        Option("j3", JORDAN3, 3.0, 0.70),
        Option("lr2", LOWRANK, 1.0, 0.50),
    ]
    return [LayerMenu(name, (8, 8), "linear", 1.0, list(options)) for name in ("a", "b")]


def contenders(planted: dict[str, float]) -> list[Contender]:
    """The default plus one candidate per label in ``planted`` (every layer on that label)."""
    ms = menus()
    base = s1.baseline(ms)
    cands = [s1.evaluate(ms, {m.name: label for m in ms}, label) for label in planted]
    return build_contenders(ms, base, cands, LrChoice(), None)


class Planted:
    """A fake trainer: val loss = 3 - step/1000 + offset(contender) + noise(contender, seed); records calls."""

    def __init__(self, offsets: dict[str, float], noise: dict[str, list[float]], every: int) -> None:
        self.offsets, self.noise, self.every = offsets, noise, every
        self.calls: list[tuple[str, int, int]] = []
        self.interrupt_at: int | None = None

    def __call__(self, contender: Contender, seed: int, horizon: int) -> JobResult:
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append((contender.name, seed, horizon))
        offset = self.offsets.get(contender.name, 0.0)
        noise = self.noise.get(contender.name, [0.0, 0.0, 0.0])[seed]
        evals = [
            EvalPoint(k, k * 0.01, 3.0 - k / 1000 + (offset + noise) * (k > 0))
            for k in range(0, horizon + 1, self.every)
        ]
        return JobResult(evals, None, 0.001, 0.01, horizon * 0.01)


def timer(ms: dict[str, float]) -> object:
    def time_steps(workload: object, profiles: dict[str, object], **kwargs: object) -> dict[str, object]:
        return {"median_ms": {name: ms[name] for name in profiles}, "amdahl_bound": 2.0}

    return time_steps


def race(tmp_path: Path, cs: list[Contender], trainer: Planted, options: RaceOptions, ms: dict[str, float]) -> object:
    return run_race(  # type: ignore[return-value]
        lambda seed: None,  # type: ignore[arg-type,return-value]
        cs, options=options, menus=menus(), storage=f"sqlite:///{tmp_path / 'race.db'}", study_name="t",
        fingerprint="sha256:x", model="toy", train_fn=trainer, time_steps=timer(ms),
    )  # fmt: skip


OPTS = RaceOptions(candidates=3, seeds=3, steps=40, rungs=3, eta=2, eval_every=10, margin=0.01)


def test_successive_halving_order_and_the_fastest_passer_wins(tmp_path: Path) -> None:
    # pe5 ties the default, j3 is a little worse (inconclusive), lr2 is far worse (eliminated at once)
    cs = contenders({"pe5": 0.0, "j3": 0.004, "lr2": 0.2})
    names = {c.assignment.source: c.name for c in cs[1:]}
    trainer = Planted(
        {names["pe5"]: 0.0, names["j3"]: 0.004, names["lr2"]: 0.2},
        {names["pe5"]: [0.001, -0.001, 0.0005], names["j3"]: [0.006, -0.004, 0.01]},
        every=10,
    )
    ms = {"default": 10.0, names["pe5"]: 8.0, names["j3"]: 6.0, names["lr2"]: 2.0}
    result = race(tmp_path, cs, trainer, OPTS, ms)
    assert OPTS.horizons() == [10, 20, 40]
    # The default trains once per seed to the full horizon, first; then every rung in turn.
    assert trainer.calls[:3] == [("default", s, 40) for s in range(3)]
    rung0 = {c for c, _, h in trainer.calls if h == 10}
    rung1 = {c for c, _, h in trainer.calls if h == 20}
    rung2 = {c for c, _, h in trainer.calls if h == 40 and c != "default"}
    assert rung0 == {names["pe5"], names["j3"], names["lr2"]}
    assert rung1 == {names["pe5"], names["j3"]}  # lr2 shown worse at rung 0: dropped; 2 = ceil(3 / 2) survive
    assert rung2 == {names["pe5"]}  # ceil(2 / 2) = 1 goes on: the lower bound wins the place
    assert result.row(names["lr2"]).eliminated_at == 10 and "worse" in result.row(names["lr2"]).verdict
    assert result.row(names["j3"]).eliminated_at == 20
    pe = result.row(names["pe5"])
    assert pe.passes and pe.comparison is not None and pe.comparison.verdict == "non-inferior"
    assert result.winner == names["pe5"] and not result.fell_back
    assert pe.measured_speedup == pytest.approx(10 / 8)
    assert pe.steps_to_target == [None, 40, None]  # only where its seed's loss got at or below the default's
    table = result.to_json()
    assert table["winner"] == names["pe5"] and {r["name"] for r in table["table"]} == {c.name for c in cs}
    json.dumps(table)  # strict JSON-able


def test_fallback_when_no_candidate_is_non_inferior(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.05, "j3": 0.03})
    trainer = Planted({c.name: 0.05 if i == 1 else 0.03 for i, c in enumerate(cs[1:], 1)},
                      {c.name: [0.001, -0.002, 0.003] for c in cs[1:]}, every=10)  # fmt: skip
    result = race(tmp_path, cs, trainer, RaceOptions(candidates=2, seeds=3, steps=20, rungs=1, eval_every=10),
                  {c.name: 1.0 for c in cs})  # fmt: skip
    assert result.fell_back and result.winner == "default"
    assert "no candidate was non-inferior" in result.reason
    assert all(not r.passes for r in result.rows)


def test_a_passer_that_measures_no_faster_does_not_ship(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.0})
    trainer = Planted({}, {}, every=10)
    result = race(tmp_path, cs, trainer, RaceOptions(candidates=1, seeds=3, steps=10, rungs=1, eval_every=10),
                  {"default": 5.0, cs[1].name: 4.9})  # fmt: skip
    # 1.02x is within the interleaved timing's noise: below --min-speedup 1.05 the default ships
    assert result.row(cs[1].name).passes and result.fell_back and "--min-speedup" in result.reason


def test_one_seed_gives_numbers_but_the_default_ships(tmp_path: Path) -> None:
    cs = contenders({"pe5": -0.1})
    trainer = Planted({cs[1].name: -0.1}, {}, every=10)
    result = race(tmp_path, cs, trainer, RaceOptions(candidates=1, seeds=1, steps=10, rungs=1, eval_every=10),
                  {"default": 5.0, cs[1].name: 1.0})  # fmt: skip
    row = result.row(cs[1].name)
    assert row.comparison is not None and row.comparison.verdict == "one seed" and row.comparison.mean_diff < 0
    assert result.fell_back and "one race seed" in result.reason


def test_resume_after_ctrl_c_loses_no_finished_run(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.0, "j3": 0.004, "lr2": 0.2})
    offsets = {c.name: o for c, o in zip(cs[1:], (0.0, 0.004, 0.2))}
    first = Planted(offsets, {}, every=10)
    first.interrupt_at = 5
    ms = {c.name: 1.0 for c in cs} | {"default": 2.0}
    with pytest.raises(KeyboardInterrupt):
        race(tmp_path, cs, first, OPTS, ms)
    assert len(first.calls) == 5
    study_names = optuna.get_all_study_names(f"sqlite:///{tmp_path / 'race.db'}")
    study = optuna.load_study(study_name=next(n for n in study_names if "-race-" in n),
                              storage=f"sqlite:///{tmp_path / 'race.db'}")  # fmt: skip
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 5 and states.count(optuna.trial.TrialState.FAIL) == 1
    second = Planted(offsets, {}, every=10)
    resumed = race(tmp_path, cs, second, OPTS, ms)
    assert not set(first.calls) & set(second.calls)  # nothing finished was run again
    fresh = Planted(offsets, {}, every=10)
    (tmp_path / "again").mkdir()
    whole = race(tmp_path / "again", cs, fresh, OPTS, ms)
    assert sorted(first.calls + second.calls) == sorted(fresh.calls)  # together: exactly one full race
    assert resumed.runs_done_now == len(second.calls)
    assert [r.to_json() for r in resumed.rows] == [r.to_json() for r in whole.rows]


def test_pick_candidates_spreads_the_speedups_and_keeps_the_stage1_pick() -> None:
    ms = menus()
    base = s1.baseline(ms)
    front = [s1.evaluate(ms, {"a": x, "b": y}, f"{x}/{y}") for x, y in
             [("pe5", "pe5"), ("pe5", "j3"), ("j3", "j3"), ("j3", "lr2"), ("lr2", "lr2")]]  # fmt: skip
    picked = pick_candidates(front, base, front[2], 3)
    # spread in log-speedup from the mildest to the stage-1 pick (1.25x, ~1.45x, 1.67x); the 2.5x and 5x
    # profiles beyond the pick are left out; mildest first
    assert picked == [front[0], front[1], front[2]]
    # when the pick is the mildest, the spread runs to the most aggressive
    assert pick_candidates(front, base, front[0], 3) == [front[0], front[3], front[4]]  # 1.25x, 2.5x, 5x
    assert pick_candidates(front, base, front[2], 0) == []
    assert pick_candidates([base], base, base, 3) == []


def test_matched_update_size_scales_lr_by_the_predicted_update_norm() -> None:
    ms = menus()
    s = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.3, 0.1, 0.05], dtype=torch.float64)
    factors = update_size_factors(ms, {"a": "pe5", "b": "lr2"}, {"a": s, "b": s})
    from muonprof.ortho.spectral import model_singular_values

    jordan = float(model_singular_values(s, JORDAN5).norm())
    polar = float(model_singular_values(s, POLAR5).norm())
    assert factors["a"] == pytest.approx(jordan / polar) and factors["a"] < 1  # PE's update is bigger
    assert factors["b"] > 1  # a rank-2 update is smaller than the full one
    assert update_size_factors(ms, {"a": BASELINE_LABEL, "b": BASELINE_LABEL}, {"a": s, "b": s}) == {"a": 1, "b": 1}
    candidate = s1.evaluate(ms, {"a": "pe5", "b": "lr2"})
    cs = build_contenders(ms, s1.baseline(ms), [candidate], LrChoice(), {"a": s, "b": s})
    assert cs[1].profile["layers"]["a"]["lr_scale"] == pytest.approx(factors["a"])
    assert cs[0].profile["layers"]["a"]["lr_scale"] == 1.0
    shared = build_contenders(ms, s1.baseline(ms), [s1.evaluate(ms, {"a": "pe5", "b": "lr2"})], LrChoice(),
                              {"a": s, "b": s}, match_update_size=False)  # fmt: skip
    assert shared[1].profile["layers"]["a"]["lr_scale"] == 1.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (RaceOptions(seeds=0), "--race-seeds"),
        (RaceOptions(margin=-0.01), "--max-loss-increase"),
        (RaceOptions(margin=float("nan")), "--max-loss-increase"),
        (RaceOptions(min_speedup=0.9), "--min-speedup"),
        (RaceOptions(steps=4, rungs=1, eval_every=5), "shorter than one evaluation"),
        (RaceOptions(steps=8, rungs=3, eval_every=4), "shorter than one evaluation"),
    ],
)
def test_bad_race_options(options: RaceOptions, message: str) -> None:
    with pytest.raises(TuneError, match=message):
        options.check()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real gpt2-tiny spectra and a small bench (few candidates, quick timing)."""
    from muonprof.bench import GridSpec, run_bench, save_bench
    from muonprof.capture import capture_spectra, save_spectra
    from muonprof.workload import build_workload

    root = tmp_path_factory.mktemp("race")
    workload = build_workload("gpt2-tiny", batch_size=2, seq_len=16, seed=0)
    spectra = capture_spectra(workload, steps=2, every=1)
    grid = GridSpec(methods=("newton_schulz", "lowrank"), steps=(2, 5), schedules=("jordan",), dtypes=("bfloat16",),
                    ranks=(4,), power_iters=(1,), explicit=frozenset({"dtypes"}))  # fmt: skip
    bench = run_bench(spectra, device=torch.device("cpu"), grid=grid, seeds=1, probe=False,
                      timing={"min_repeats": 1, "max_repeats": 2, "target_s": 0.0})  # fmt: skip
    paths = {"spectra": root / "tiny.spectra.pt", "bench": root / "tiny.bench.json"}
    save_spectra(spectra, paths["spectra"])
    save_bench(bench, paths["bench"])
    return paths


def race_cli(files: dict[str, Path], out: Path, *, candidates: int, steps: int, every: int) -> list[str]:
    """A quick real race through the CLI on the tiny spectra and bench (2 seeds, 2 rungs, no LR trials)."""
    return ["tune", str(files["spectra"]), "--bench", str(files["bench"]), "--trials", "10", "--lr-trials", "0",
            "--batch-size", "2", "--race-candidates", str(candidates), "--race-seeds", "2", "--race-steps",
            str(steps), "--race-rungs", "2", "--race-eval-every", str(every), "--out", str(out),
            "--json"]  # fmt: skip


def test_cli_race_writes_the_verdict_into_the_profile_and_resumes(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    args = race_cli(tiny_files, out, candidates=2, steps=4, every=2)
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    summary = json.loads(first.stdout)
    race_json = summary["race"]
    assert race_json["options"]["horizons"] == [2, 4] and race_json["seeds"] == [0, 1]
    assert race_json["options"]["confirm_steps"] == 8  # the CLI's defaults: twice the race horizon,
    assert race_json["options"]["confirm_seeds"] == 4  # and twice the race's seeds for an inconclusive one
    assert race_json["options"]["same_math"] is True
    names = {row["name"] for row in race_json["table"]}
    assert "default" in names and len(names) >= 2
    assert summary["shipped"] == race_json["winner"]
    profile = load_profile(out)
    recorded = profile.provenance.model_dump()["race"]
    assert recorded["winner"] == race_json["winner"] and recorded["table"] == race_json["table"]
    assert profile.provenance.study["race"] == race_json["study"]
    if race_json["fallback"]:  # the default recipe everywhere
        assert all(entry.method == "newton_schulz" and entry.ns_steps == 5 for entry in profile.layers.values())
    # the same command again: every race run is found in the storage, none is re-run
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.stderr
    rerun = json.loads(again.stdout)["race"]
    assert rerun["table"] == race_json["table"] and rerun["timing"] == race_json["timing"]
    assert race_json["runs_done_now"] > 0 and rerun["runs_done_now"] == 0
    assert profile.provenance.study["race"] == rerun["study"]
    # validate judges the shipped profile against the race's reference: the default recipe with the same LRs
    from muonprof.validate import validate

    checked = validate("gpt2-tiny", profile=out, contenders="default-lr,default", steps=2, seeds=1,
                       batch_size=2, seq_len=16)  # fmt: skip
    assert checked.summary["reference"] == "default-lr"
    assert checked.contenders["default-lr"].config["profile"] == "race reference"
    reference = recorded["reference_profile"]
    assert all(entry["method"] == "newton_schulz" and entry["ns_steps"] == 5 for entry in reference["layers"].values())
    table = runner.invoke(app, args[:-1])
    assert table.exit_code == 0 and "stage 3 race" in table.stdout and "shipped:" in table.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--race-seeds", "0"], "--race-seeds must be at least 1"),
        (["--max-loss-increase", "-0.1"], "--max-loss-increase"),
        (["--race-steps", "3", "--race-eval-every", "5"], "shorter than one evaluation"),
        (["--race-steps", "4", "--race-eval-every", "2", "--confirm-steps", "4"], "--confirm-steps must be longer"),
        (["--race-seeds", "2", "--confirm-seeds", "2"], "--confirm-seeds must be more than --race-seeds"),
    ],
)
def test_cli_bad_race_options_are_one_line_errors(
    tiny_files: dict[str, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    out = tmp_path / "p.json"
    args = ["tune", str(tiny_files["spectra"]), "--bench", str(tiny_files["bench"]), "--out", str(out), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output and not out.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ confirmation


class Drifting(Planted):
    """``Planted``, plus an extra offset per contender on evaluations after step ``after``: a recipe that holds
    the default's loss over the race horizon and falls behind later."""

    def __init__(self, offsets: dict[str, float], late: dict[str, float], after: int, every: int) -> None:
        super().__init__(offsets, {}, every)
        self.late, self.after = late, after

    def __call__(self, contender: Contender, seed: int, horizon: int) -> JobResult:
        result = super().__call__(contender, seed, horizon)
        extra = self.late.get(contender.name, 0.0)
        noise = [0.001, -0.001, 0.0005][seed]
        result.evals = [
            EvalPoint(p.step, p.wall_s, p.val_loss + (extra + noise) * (p.step > self.after))  # type: ignore[operator]
            for p in result.evals
        ]
        return result


CONFIRM = RaceOptions(candidates=2, seeds=3, steps=20, rungs=1, eval_every=10, margin=0.01, confirm_steps=40)


def test_a_passer_is_confirmed_at_the_longer_horizon_before_it_ships(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.0, "j3": 0.0})
    trainer = Drifting({}, {}, after=20, every=10)
    result = race(tmp_path, cs, trainer, CONFIRM, {"default": 10.0, cs[1].name: 8.0, cs[2].name: 5.0})
    # the default trains once per seed to the confirmation horizon; the fastest passer (c2) alone is confirmed
    assert [c for c in trainer.calls if c[0] == "default"] == [("default", s, 40) for s in range(3)]
    assert [c for c in trainer.calls if c[2] == 40 and c[0] != "default"] == [(cs[2].name, s, 40) for s in range(3)]
    row = result.row(cs[2].name)
    assert result.winner == cs[2].name and row.confirmed and row.confirm_horizon == 40
    assert "at 40" in result.reason and "non-inferior" in result.reason
    assert result.row(cs[1].name).confirm_horizon is None  # not needed: the faster one shipped
    table = result.to_json()
    assert table["options"]["confirm_steps"] == 40
    assert next(r for r in table["table"] if r["name"] == cs[2].name)["confirm_verdict"] == "non-inferior"
    json.dumps(table)


def test_a_passer_that_falls_behind_later_is_not_shipped_and_the_next_one_is_tried(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.0, "j3": 0.0})
    trainer = Drifting({}, {cs[2].name: 0.05}, after=20, every=10)  # c2 (the faster) loses 0.05 after step 20
    result = race(tmp_path, cs, trainer, CONFIRM, {"default": 10.0, cs[1].name: 8.0, cs[2].name: 5.0})
    fast, slow = result.row(cs[2].name), result.row(cs[1].name)
    assert fast.passes and not fast.confirmed and fast.verdict == "not confirmed at 40 (worse)"
    assert slow.confirmed and result.winner == cs[1].name


def test_none_confirmed_the_default_ships_saying_why(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.0})
    trainer = Drifting({}, {cs[1].name: 0.05}, after=20, every=10)
    result = race(tmp_path, cs, trainer, CONFIRM, {"default": 10.0, cs[1].name: 5.0})
    assert result.fell_back and "not confirmed at 40" in result.reason and cs[1].name in result.reason
    # without a confirmation horizon the same race ships it: the check is what refused it
    (tmp_path / "off").mkdir()
    unconfirmed = race(tmp_path / "off", cs, Drifting({}, {cs[1].name: 0.05}, after=20, every=10),
                       RaceOptions(candidates=1, seeds=3, steps=20, rungs=1, eval_every=10), {"default": 10.0,
                       cs[1].name: 5.0})  # fmt: skip
    assert unconfirmed.winner == cs[1].name


@pytest.mark.parametrize("steps", [10, 20])
def test_a_confirmation_no_longer_than_the_race_is_refused(steps: int) -> None:
    with pytest.raises(TuneError, match="--confirm-steps must be longer than --race-steps"):
        RaceOptions(steps=20, rungs=1, eval_every=10, confirm_steps=steps).check()


def test_an_interrupted_confirmation_resumes_without_rerunning_a_finished_run(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.0, "j3": 0.0})
    ms = {"default": 10.0, cs[1].name: 8.0, cs[2].name: 5.0}
    first = Drifting({}, {}, after=20, every=10)
    first.interrupt_at = 10  # default x3, c1 x3, c2 x3, then inside c2's confirmation
    with pytest.raises(KeyboardInterrupt):
        race(tmp_path, cs, first, CONFIRM, ms)
    assert first.calls[-1] == (cs[2].name, 0, 40)
    second = Drifting({}, {}, after=20, every=10)
    resumed = race(tmp_path, cs, second, CONFIRM, ms)
    assert not set(first.calls) & set(second.calls) and second.calls == [(cs[2].name, s, 40) for s in (1, 2)]
    assert resumed.winner == cs[2].name and resumed.row(cs[2].name).confirmed


class LateSeeds(Planted):
    """``Planted`` with per-seed extra offsets (any number of seeds) on evaluations after step ``after``."""

    def __init__(self, late: dict[str, list[float]], after: int, every: int) -> None:
        super().__init__({}, {}, every)
        self.late, self.after = late, after

    def __call__(self, contender: Contender, seed: int, horizon: int) -> JobResult:
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append((contender.name, seed, horizon))
        extra = self.late.get(contender.name, [0.0] * 8)[seed]
        evals = [EvalPoint(k, k * 0.01, 3.0 - k / 1000 + extra * (k > self.after)) for k in range(0, horizon + 1, 10)]
        return JobResult(evals, None, 0.001, 0.01, horizon * 0.01)


EXTEND = RaceOptions(candidates=1, seeds=3, steps=20, rungs=1, eval_every=10, margin=0.01, confirm_steps=40,
                     confirm_seeds=6)  # fmt: skip


def test_an_inconclusive_confirmation_gets_more_seeds_each_look_at_the_stricter_bound(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.0})
    # after the race horizon: +0.009 / -0.001 / +0.004 on the first three seeds (inconclusive at 3), the same
    # spread again on three more (non-inferior over six at the 97.5% bound)
    late = [0.009, -0.001, 0.004, 0.008, 0.0, 0.003]
    trainer = LateSeeds({cs[1].name: late}, after=20, every=10)
    result = race(tmp_path, cs, trainer, EXTEND, {"default": 10.0, cs[1].name: 5.0})
    row = result.row(cs[1].name)
    assert row.confirmation is not None and row.confirmation.n == 6 and row.confirmation.confidence == 0.975
    assert row.confirmed and result.winner == cs[1].name and "97.5% bound" in result.reason
    extra = sorted(c for c in trainer.calls if c[1] >= 3)
    assert extra == sorted([("default", s, 40) for s in (3, 4, 5)] + [(cs[1].name, s, 40) for s in (3, 4, 5)])
    from muonprof.stats import paired_comparison

    # the first look, over the race's three seeds at 97.5%, could not tell
    assert paired_comparison(late[:3], [0.0] * 3, 0.01, 0.975).verdict == "inconclusive"
    assert result.to_json()["options"]["confirm_seeds"] == 6


def test_a_confirmation_shown_worse_gets_no_more_seeds(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.0})
    trainer = LateSeeds({cs[1].name: [0.05, 0.06, 0.055, 0.0, 0.0, 0.0]}, after=20, every=10)
    result = race(tmp_path, cs, trainer, EXTEND, {"default": 10.0, cs[1].name: 5.0})
    row = result.row(cs[1].name)
    assert row.confirmation is not None and row.confirmation.verdict == "worse" and row.confirmation.n == 3
    assert result.fell_back and not [c for c in trainer.calls if c[1] >= 3]


def test_more_confirmation_seeds_than_the_race_or_none() -> None:
    with pytest.raises(TuneError, match="--confirm-seeds must be more than --race-seeds"):
        RaceOptions(seeds=3, steps=20, rungs=1, eval_every=10, confirm_steps=40, confirm_seeds=3).check()
    one_look = RaceOptions(seeds=3, steps=20, rungs=1, eval_every=10, confirm_steps=40)
    assert not one_look.extends_seeds and one_look.confirm_confidence == 0.95
    assert EXTEND.extends_seeds and EXTEND.confirm_confidence == 0.975


# ------------------------------------------------------------------------------------------ same math


JORDAN5_FP32 = OrthoConfig(dtype="float32")
GRAM5 = OrthoConfig(gram=True)


def test_the_fastest_same_polynomial_option_is_kept_in_reserve_and_raced_as_same_math() -> None:
    """Jordan x5 in fp32 (rounding only) is dominated by Polar Express here, so stage 1 never sees it: it waits in
    the menu's reserve, and the race gets it as ``same-math``, every layer on its fastest same-polynomial form."""
    from muonprof.tune.space import same_polynomial

    assert same_polynomial(JORDAN5) and same_polynomial(JORDAN5_FP32) and same_polynomial(GRAM5)
    assert not same_polynomial(POLAR5) and not same_polynomial(JORDAN3) and not same_polynomial(LOWRANK)
    options = [
        Option(BASELINE_LABEL, JORDAN5, 5.0, 0.80),
        Option("pe5", POLAR5, 3.0, 0.90),  # faster and more aligned: dominates both Jordan x5 forms
        Option("j5-fp32", JORDAN5_FP32, 3.5, 0.80),
        Option("gram5", GRAM5, 4.0, 0.80),
    ]
    ms = [LayerMenu(n, (8, 8), "linear", 1.0, options[:2], reserve=[options[2]]) for n in ("a", "b")]
    assert ms[0].option("j5-fp32") is options[2] and "j5-fp32" not in ms[0].labels  # reachable, not searched
    same = s1.same_math(ms)
    assert same is not None and same.picks == {"a": "j5-fp32", "b": "j5-fp32"} and same.time_s == 7.0
    cs = build_contenders(ms, s1.baseline(ms), [s1.evaluate(ms, {"a": "pe5", "b": "pe5"})], LrChoice(), None,
                          same_math=same)  # fmt: skip
    assert [c.name for c in cs] == ["default", "same-math", "c1"]
    assert {e["dtype"] for e in cs[1].profile["layers"].values()} == {"float32"}
    # where the baseline is already the fastest same-polynomial form there is nothing to race
    only = [LayerMenu(n, (8, 8), "linear", 1.0, options[:2]) for n in ("a", "b")]
    assert s1.same_math(only) is None


def test_build_menus_reserves_the_fastest_same_polynomial_form(tiny_files: dict[str, Path]) -> None:
    from muonprof.bench import load_bench
    from muonprof.tune.space import build_menus, same_polynomial

    bench = load_bench(tiny_files["bench"])
    for menu in build_menus(bench):
        forms = [o for o in [*menu.options, *menu.reserve] if same_polynomial(o.config)]
        assert forms and len(menu.reserve) <= 1
        assert all(not same_polynomial(o.config) or o.label not in menu.labels for o in menu.reserve)


def test_the_pipeline_races_same_math_unless_off_duplicate_or_over_the_memory_budget() -> None:
    from types import SimpleNamespace

    from muonprof.tune.pipeline import TuneRequest, _same_math

    options = [Option(BASELINE_LABEL, JORDAN5, 5.0, 0.80), Option("pe5", POLAR5, 3.0, 0.90)]
    ms = [LayerMenu(n, (8, 8), "linear", 1.0, list(options), reserve=[Option("j5-fp32", JORDAN5_FP32, 3.5, 0.8)])
          for n in ("a", "b")]  # fmt: skip
    s1_result = SimpleNamespace(menus=ms, baseline=s1.baseline(ms), state_budget=None)
    request = TuneRequest(source="gpt2-tiny")
    found = _same_math(request, s1_result, [])  # type: ignore[arg-type]
    assert found is not None and set(found.picks.values()) == {"j5-fp32"}
    assert _same_math(request, s1_result, [found]) is None  # already a candidate
    off = TuneRequest(source="gpt2-tiny", race=RaceOptions(same_math=False))
    assert _same_math(off, s1_result, []) is None  # type: ignore[arg-type]
    tight = SimpleNamespace(menus=ms, baseline=s1.baseline(ms), state_budget=s1.baseline(ms).state_bytes - 1)
    assert _same_math(request, tight, []) is None  # type: ignore[arg-type]  # it keeps the default's state


def test_interleaved_step_times_times_each_step_after_its_own_forward_backward() -> None:
    from muonprof.tune.timing import FWD_BWD, interleaved_step_times
    from muonprof.workload import build_workload

    workload = build_workload("gpt2-tiny", batch_size=2, seq_len=16, seed=0)
    before = [p.detach().clone() for p in workload.model.parameters()]
    fp32 = {"format": "muonprof.profile/1", "defaults": {"dtype": "float32"}}
    timing = interleaved_step_times(workload, {"default": None, "fp32": fp32}, rounds=3)
    assert set(timing["median_ms"]) == {"default", "fp32"} and FWD_BWD not in timing["median_ms"]
    assert all(v > 0 for v in timing["median_ms"].values()) and timing["fwd_bwd_ms"] > 0
    assert timing["rounds"] >= 3 and timing["amdahl_bound"] >= 1 and "forward/backward" in timing["method"]
    # the contenders trained copies: the workload's own model is untouched
    assert all(torch.equal(a, b) for a, b in zip(before, workload.model.parameters()))


def test_the_default_diverging_on_an_extra_seed_is_a_one_line_error(tmp_path: Path) -> None:
    cs = contenders({"pe5": 0.0})

    class DefaultDivergesLater(LateSeeds):
        def __call__(self, contender: Contender, seed: int, horizon: int) -> JobResult:
            result = super().__call__(contender, seed, horizon)
            if contender.name == "default" and seed >= 3:
                result.diverged_at = 30
            return result

    trainer = DefaultDivergesLater({cs[1].name: [0.009, -0.001, 0.004, 0.0, 0.0, 0.0]}, after=20, every=10)
    with pytest.raises(TuneError, match="the default recipe diverged within 40 steps") as err:
        race(tmp_path, cs, trainer, EXTEND, {"default": 10.0, cs[1].name: 5.0})
    assert "\n" not in str(err.value)


def test_cli_race_whose_horizon_is_not_a_multiple_of_the_eval_interval_is_judged(
    tiny_files: dict[str, Path], tmp_path: Path
) -> None:
    """The default's run goes to the confirmation horizon (20) through the race horizon (10), which the
    evaluation interval (4) does not divide: it is evaluated there anyway (it was not, and tune failed)."""
    out = tmp_path / "p.json"
    args = race_cli(tiny_files, out, candidates=1, steps=10, every=4)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    race_json = json.loads(result.stdout)["race"]
    assert race_json["options"]["horizons"] == [4, 10] and race_json["options"]["confirm_steps"] == 20
