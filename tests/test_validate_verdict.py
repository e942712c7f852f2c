"""``muonprof validate``'s verdict: paired differences against the reference with their one-sided bound, the
verdict at the margin δ, steps-/time-to-target and the speedup, on hand-built runs with known numbers; the
command line's table, --json keys, --reference / --max-loss-increase refusals, and an old results file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import muonprof.validate.run as run_module
from muonprof.stats import DEFAULT_MARGIN, t_quantile
from muonprof.train import EvalPoint, TrainResult
from muonprof.validate import (
    ContenderRuns,
    ResultsFormatError,
    ValidationError,
    load_results,
    save_results,
    summarize,
    validate,
    verdict_line,
)
from muonprof.validate.results import ValidationResult, choose_reference, equal_steps_values

OLD_FILE = Path(__file__).parent / "data" / "validate_v1.json"

Curve = list[tuple[int, float, float]]  # (step, cumulative training seconds, val loss)


def make_run(curve: Curve, diverged_at: int | None = None, opt_s: float = 0.5) -> TrainResult:
    """A run whose evals are ``curve``; one step per unit of ``step`` up to the last eval, 1 s a step."""
    steps = curve[-1][0]
    r = TrainResult(steps_planned=steps, wall_s=[float(k) for k in range(1, steps + 1)], step_s=[1.0] * steps)
    r.optimizer_step_s = [opt_s] * steps
    r.train_losses = [1.0] * steps
    r.evals = [EvalPoint(s, float(w), v) for s, w, v in curve]
    r.diverged_at = diverged_at
    return r


def finals(name: str, values: list[float], **kwargs: Any) -> ContenderRuns:
    """One run per seed ending at ``values[seed]`` (step 0 at 9.0, step 2 at 2 s)."""
    return ContenderRuns(name, {}, {s: make_run([(0, 0, 9.0), (2, 2, v)], **kwargs) for s, v in enumerate(values)})


REF = [2.50, 2.60, 2.55]


def judged(diffs: list[float], margin: float = DEFAULT_MARGIN) -> dict[str, Any]:
    ref = REF[: len(diffs)]
    cand = [r + d for r, d in zip(ref, diffs)]
    summary = summarize({"default": finals("default", ref), "p": finals("p", cand)}, list(range(len(diffs))),
                        margin=margin)  # fmt: skip
    return summary["verdicts"]["final_val_loss"]["pairs"]["p"]


# ------------------------------------------------------------------------------------ paired verdict


def test_paired_difference_and_bound_match_the_hand_computation() -> None:
    pair = judged([0.001, 0.002, 0.0015])
    assert pair["seeds"] == [0, 1, 2] and pair["reference"] == REF
    assert pair["diffs"] == pytest.approx([0.001, 0.002, 0.0015])
    assert pair["mean_diff"] == pytest.approx(0.0015) and pair["std_diff"] == pytest.approx(0.0005)
    bound = 0.0015 + t_quantile(0.95, 2) * 0.0005 / math.sqrt(3)
    assert pair["upper_bound"] == pytest.approx(bound) and pair["lower_bound"] == pytest.approx(0.003 - bound)
    assert pair["verdict"] == "non-inferior" and pair["margin"] == DEFAULT_MARGIN == 0.01
    assert [p["step"] for p in pair["points"]] == [2, 2, 2]


@pytest.mark.parametrize(
    ("diffs", "verdict"),
    [
        ([-0.05, -0.051, -0.049], "better"),
        ([0.001, 0.002, 0.0015], "non-inferior"),
        ([0.1, 0.105, 0.096], "worse"),
        ([-0.03, 0.04, 0.0], "inconclusive"),  # small mean, noisy per-seed differences
    ],
)
def test_each_verdict(diffs: list[float], verdict: str) -> None:
    assert judged(diffs)["verdict"] == verdict


def test_the_margin_decides_non_inferiority() -> None:
    diffs = [0.004, 0.006, 0.005]  # bound ~0.0067
    assert judged(diffs, margin=0.01)["verdict"] == "non-inferior"
    assert judged(diffs, margin=0.005)["verdict"] == "inconclusive"
    assert judged(diffs, margin=0.0)["verdict"] == "worse"  # lower bound ~0.0033 > 0


def test_one_seed_gives_the_difference_but_no_verdict() -> None:
    pair = judged([0.02])
    assert pair["verdict"] == "one seed" and pair["mean_diff"] == pytest.approx(0.02)
    assert pair["upper_bound"] is None and pair["std_diff"] is None
    summary = summarize({"default": finals("default", [2.5]), "p": finals("p", [2.52])}, [0])
    line = verdict_line(summary["verdicts"]["final_val_loss"])
    assert "one seed" in line and "no verdict" in line and "p Δ +0.0200" in line


def test_divergence_in_either_side_gives_no_value() -> None:
    ok, dead = finals("default", REF), finals("p", REF, diverged_at=2)
    summary = summarize({"default": ok, "p": dead}, [0, 1, 2])
    assert summary["verdicts"]["final_val_loss"]["pairs"]["p"]["verdict"] == "diverged"
    assert summary["verdicts"]["equal_wall_val_loss"]["pairs"]["p"]["verdict"] == "diverged"
    flipped = summarize({"default": finals("default", REF, diverged_at=2), "p": finals("p", REF)}, [0, 1, 2])
    verdict = flipped["verdicts"]["final_val_loss"]
    assert verdict["pairs"]["p"]["verdict"] == "no reference" and "diverged" in verdict["note"]


def test_equal_wall_clock_is_paired_at_the_seeds_T() -> None:
    # p is twice as fast per step: T = its whole run (4 s); default is read at its 4 s eval (step 4).
    ref = ContenderRuns("default", {}, {0: make_run([(0, 0, 9.0), (4, 4, 3.0), (8, 8, 2.0)])})
    fast = ContenderRuns("p", {}, {0: make_run([(0, 0, 9.0), (4, 2, 2.9), (8, 4, 2.4)])})
    fast.runs[0].wall_s = [0.5 * k for k in range(1, 9)]
    summary = summarize({"default": ref, "p": fast}, [0])
    pair = summary["verdicts"]["equal_wall_val_loss"]["pairs"]["p"]
    assert summary["equal_wall"]["0"]["T_s"] == 4.0
    assert pair["candidate"] == [2.4] and pair["reference"] == [3.0] and pair["points"] == [{"T_s": 4.0}]
    steps = summary["verdicts"]["final_val_loss"]["pairs"]["p"]
    assert steps["mean_diff"] == pytest.approx(0.4)  # equal steps: 2.4 vs 2.0


def test_equal_steps_pairs_at_the_last_eval_step_both_runs_have() -> None:
    """A time budget stopped the candidate at step 5: it is compared with the reference at step 4."""
    cand = make_run([(0, 0, 9.0), (2, 2, 4.0), (4, 4, 3.0), (5, 5, 2.9)])
    ref = make_run([(0, 0, 9.0), (2, 2, 4.5), (4, 4, 3.5), (6, 6, 2.5), (8, 8, 2.0)])
    assert equal_steps_values(cand, ref) == (4, 3.0, 3.5)
    assert equal_steps_values(make_run([(0, 0, 9.0), (2, 2, 1.0)], diverged_at=2), ref) is None


def test_reference_choice_and_bad_judging_options() -> None:
    assert choose_reference(["profile", "default", "adamw"]) == "default"
    assert choose_reference(["profile", "adamw"]) == "profile"
    assert choose_reference(["profile", "adamw"], "adamw") == "adamw"
    with pytest.raises(ValueError, match="--reference 'torch' is not a contender of this run"):
        choose_reference(["profile", "adamw"], "torch")
    runs = {"a": finals("a", REF), "b": finals("b", REF)}
    assert summarize(runs, [0, 1, 2], reference="b")["verdicts"]["final_val_loss"]["pairs"].keys() == {"a"}
    for bad in (-0.01, math.nan, math.inf):
        with pytest.raises(ValueError, match="--max-loss-increase must be a finite number >= 0"):
            summarize(runs, [0, 1, 2], margin=bad)
    with pytest.raises(ValidationError, match="--max-loss-increase"):
        validate("mlp", contenders="default", steps=2, margin=-1.0)
    with pytest.raises(ValidationError, match="--reference 'adamw' is not a contender"):
        validate("mlp", contenders="default,torch", steps=2, reference="adamw")


def test_optimizer_step_ratio_is_against_the_reference() -> None:
    summary = summarize({"default": finals("default", REF, opt_s=0.5), "p": finals("p", REF, opt_s=0.2)}, [0, 1, 2])
    assert summary["rows"]["p"]["optimizer_step_ratio"] == pytest.approx(0.4)
    assert summary["rows"]["default"]["optimizer_step_ratio"] == 1.0


# ------------------------------------------------------------------------------------- to target


def test_steps_and_time_to_target_with_the_references_own_time() -> None:
    # The reference ends at 2.6 but was at 2.5 at step 4 (4 s): its own time-to-target is 4 s, not 6 s.
    ref = make_run([(0, 0, 5.0), (2, 2, 3.0), (4, 4, 2.5), (6, 6, 2.6)])
    fast = make_run([(0, 0, 5.0), (2, 1, 2.55), (4, 2, 2.4), (6, 3, 2.3)])
    never = make_run([(0, 0, 5.0), (2, 2, 3.0), (6, 6, 2.7)])
    contenders = {n: ContenderRuns(n, {}, {0: r}) for n, r in (("default", ref), ("fast", fast), ("never", never))}
    to_target = summarize(contenders, [0])["to_target"]
    assert to_target["reference"] == "default" and to_target["targets"] == {"0": 2.6}
    mine = to_target["contenders"]
    assert mine["default"]["per_seed"]["0"] | {"note": None} == {
        "target": 2.6, "reached": True, "step": 4, "time_s": 4.0, "speedup": 1.0, "note": None,
    }  # fmt: skip
    assert mine["fast"]["per_seed"]["0"]["step"] == 2 and mine["fast"]["per_seed"]["0"]["time_s"] == 1.0
    assert mine["fast"]["speedup"] == {"geomean": 4.0, "min": 4.0, "max": 4.0, "n": 1} and mine["fast"]["reached"] == 1
    assert mine["never"]["reached"] == 0 and mine["never"]["speedup"] is None
    assert mine["never"]["per_seed"]["0"] == {
        "target": 2.6, "reached": False, "step": None, "time_s": None, "speedup": None, "note": "not reached",
    }  # fmt: skip


def test_reached_at_step_zero_has_no_speedup() -> None:
    """A reference that ended above the initial loss sets a target every run meets before training."""
    ref = make_run([(0, 0, 2.0), (2, 2, 2.5)])
    cand = make_run([(0, 0, 2.0), (2, 1, 2.2)])
    to_target = summarize({"default": ContenderRuns("default", {}, {0: ref}), "p": ContenderRuns("p", {}, {0: cand})},
                          [0])["to_target"]  # fmt: skip
    seed = to_target["contenders"]["p"]["per_seed"]["0"]
    assert seed["reached"] and seed["step"] == 0 and seed["time_s"] == 0.0 and seed["speedup"] is None
    assert "step 0" in seed["note"] and to_target["contenders"]["p"]["speedup"] is None


def test_speedup_over_seeds_is_a_geometric_mean_of_the_seeds_that_reached() -> None:
    seeds = [0, 1, 2]
    ref = {s: make_run([(0, 0, 5.0), (8, 8, 2.0)]) for s in seeds}
    cand = {
        0: make_run([(0, 0, 5.0), (4, 4, 1.9), (8, 8, 1.8)]),  # 8 s / 4 s = 2
        1: make_run([(0, 0, 5.0), (1, 1, 2.0), (8, 8, 1.8)]),  # 8 s / 1 s = 8
        2: make_run([(0, 0, 5.0), (8, 8, 2.1)]),  # never
    }
    summary = summarize({"default": ContenderRuns("default", {}, ref), "p": ContenderRuns("p", {}, cand)}, seeds)
    p = summary["to_target"]["contenders"]["p"]
    assert p["reached"] == 2 and p["n"] == 3 and p["steps_median"] == 2.5
    assert p["speedup"]["geomean"] == pytest.approx(4.0) and (p["speedup"]["min"], p["speedup"]["max"]) == (2.0, 8.0)
    assert summary["to_target"]["contenders"]["default"]["speedup"]["geomean"] == 1.0


# ------------------------------------------------------------------------------------- results files


def test_old_results_file_is_rejudged_by_the_paired_rule() -> None:
    stored = json.loads(OLD_FILE.read_text())
    assert stored["format"] == "muonprof.validate/1" and "reference" not in stored["summary"]
    assert stored["summary"]["verdicts"]["final_val_loss"]["call"] == "win"  # written by the tie rule
    result = load_results(OLD_FILE)
    summary = result.summary
    assert summary["reference"] == "default" and summary["margin"] == DEFAULT_MARGIN
    pairs = summary["verdicts"]["final_val_loss"]["pairs"]
    assert set(pairs) == {"torch", "adamw"} and pairs["adamw"]["verdict"] == "better" and pairs["adamw"]["n"] == 2
    assert "call" not in summary["verdicts"]["final_val_loss"] and "tie" not in summary["rules"]
    assert summary["rows"]["adamw"]["final_val_loss"] == stored["summary"]["rows"]["adamw"]["final_val_loss"]
    assert summary["to_target"]["contenders"]["adamw"]["reached"] == 2


def test_reference_and_margin_survive_a_round_trip(tmp_path: Path) -> None:
    result = ValidationResult({}, [0, 1, 2], {"a": finals("a", REF), "b": finals("b", [v + 0.02 for v in REF])})
    result.summarize(reference="b", margin=0.05)
    back = load_results(save_results(result, tmp_path / "r.json"))
    assert back.summary["reference"] == "b" and back.summary["margin"] == 0.05
    assert back.summary["verdicts"]["final_val_loss"]["pairs"]["a"]["verdict"] == "better"
    assert back.to_dict() == json.loads(json.dumps(result.to_dict()))


def test_a_damaged_results_file_is_one_clear_error(tmp_path: Path) -> None:
    data = json.loads(OLD_FILE.read_text())
    data["summary"] = {"reference": "sgd"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ResultsFormatError, match=r"bad\.json: .*--reference 'sgd'"):
        load_results(path)


# ---------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def cli(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["validate", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.usefixtures("one_thread")
def test_cli_two_seeds_table_and_json_keys(app: typer.Typer, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    code, stdout, err = cli(app, "mlp", "--against", "default,torch,adamw", "--batch-size", "4", "--steps", "4",
                            "--eval-every", "2", "--seeds", "2", "--out", str(out))  # fmt: skip
    assert code == 0, err
    text = " ".join(stdout.split())
    assert "2 paired seeds, reference default" in text and "Δ vs default" in stdout
    assert "steps to" in stdout and "time to" in stdout and "× ref" in stdout
    assert "val loss at equal steps vs default (paired Δ over 2 seeds, one-sided 95% bound, margin δ = 0.01)" in text
    assert "adamw better" in text or "adamw worse" in text or "adamw inconclusive" in text
    assert "no verdict is possible" not in text and "wins" not in text and "tie" not in text
    assert max(len(line) for line in stdout.splitlines()) <= 80
    code, stdout, err = cli(app, "--from", str(out), "--json", "--max-loss-increase", "0.05")
    assert code == 0, err
    summary = json.loads(stdout)["summary"]
    assert {"rows", "equal_wall", "verdicts", "rules", "reference", "margin", "to_target"} <= set(summary)
    assert summary["margin"] == 0.05 and summary["reference"] == "default"
    pair = summary["verdicts"]["final_val_loss"]["pairs"]["torch"]
    assert {"verdict", "mean_diff", "upper_bound", "lower_bound", "diffs", "seeds", "n"} <= set(pair) and pair["n"] == 2
    assert set(summary["to_target"]["contenders"]["adamw"]) >= {"per_seed", "reached", "steps_median", "speedup"}
    assert summary["rows"]["torch"]["optimizer_step_ratio"] is not None
    assert load_results(out).summary["margin"] == DEFAULT_MARGIN  # --from without --out wrote nothing


def test_cli_one_seed_says_no_verdict(app: typer.Typer, tmp_path: Path) -> None:
    one = ValidationResult({"model": {"spec": "mlp"}, "steps": 2}, [0],
                           {"default": finals("default", [2.5]), "p": finals("p", [2.4])})  # fmt: skip
    path = save_results(one, tmp_path / "one.json")
    code, stdout, err = cli(app, "--from", str(path))
    assert code == 0, err
    text = " ".join(stdout.split())
    assert "no verdict is possible with one seed (run --seeds 3" in text and "-0.1000" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-loss-increase", "-0.01"], "--max-loss-increase must be a finite number >= 0"),
        (["--max-loss-increase", "nan"], "--max-loss-increase must be a finite number >= 0"),
        (["--max-loss-increase", "inf"], "--max-loss-increase must be a finite number >= 0"),
        (["--reference", "adamw"], "--reference 'adamw' is not a contender of this run"),
    ],
)
def test_cli_bad_judging_options_fail_before_training(
    app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("trained despite a bad option")

    monkeypatch.setattr(run_module, "train", boom)
    monkeypatch.setattr(run_module, "build_workload", boom)
    out = tmp_path / "r.json"
    code, _, err = cli(app, "mlp", "--against", "default,torch", *args, "--out", str(out))
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not out.exists()


def test_cli_from_refuses_bad_input_in_one_line(app: typer.Typer, tmp_path: Path) -> None:
    copy = tmp_path / "old.json"
    shutil.copy(OLD_FILE, copy)
    out = tmp_path / "new.json"
    for args, message in [
        (["--from", str(copy), "--reference", "profile", "--out", str(out)], "--reference 'profile'"),
        (["--from", str(copy), "--max-loss-increase", "-1", "--out", str(out)], "--max-loss-increase"),
        (["--from", str(tmp_path / "missing.json")], "cannot read results"),
        (["mlp", "--from", str(copy)], "not both"),
        ([], "missing MODEL"),
    ]:
        code, _, err = cli(app, *args)
        lines = err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and message in lines[0], (args, err)
    assert not out.exists() and copy.read_text() == OLD_FILE.read_text()
    code, stdout, err = cli(app, "--from", str(copy), "--out", str(out))
    assert code == 0 and "reference default" in " ".join(stdout.split()) and load_results(out).summary["reference"]
