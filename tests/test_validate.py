"""``muonprof validate``: fair races (same init, same batches), the equal-steps / equal-wall-clock accounting,
seeds and ties, divergence, the results file, and the command line with every bad input the brief lists."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

import muonprof.validate.run as run_module
from muonprof.profile import ProfileError
from muonprof.train import EvalPoint, TrainResult, train
from muonprof.validate import (
    CONTENDERS,
    ContenderError,
    ContenderRuns,
    ContenderSkipped,
    ProgressEvent,
    ValidationError,
    adamw_lr_for,
    build_contender,
    equal_wall_clock,
    load_results,
    parse_contenders,
    save_results,
    summarize,
    validate,
    verdict_line,
)
from muonprof.workload import build_workload

PROFILE = {"format": "muonprof.profile/1", "defaults": {"dtype": "float32", "ns_steps": 3}}
TINY = {"batch_size": 2, "seq_len": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_profile(tmp_path: Path, data: dict[str, Any] = PROFILE, name: str = "p.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------- contenders


def test_contenders_share_init_and_batches_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every (seed, contender) run gets a fresh workload: same initial weights and batch sequence per seed."""
    built: list[dict[str, Any]] = []
    real = run_module.build_workload

    def recording(spec: str, **kwargs: Any) -> Any:
        w = real(spec, **kwargs)
        record = {
            "seed": kwargs["seed"],
            "init": {k: v.clone() for k, v in w.model.state_dict().items()},
            "batches": [],
        }
        inner = w.train_batch

        def train_batch(step: int) -> Any:
            batch = inner(step)
            record["batches"].append((step, [t.clone() for t in batch]))
            return batch

        w.train_batch = train_batch
        built.append(record)
        return w

    monkeypatch.setattr(run_module, "build_workload", recording)
    result = validate("gpt2-tiny", contenders="default,torch,adamw", steps=4, eval_every=2, seeds=2, **TINY)
    runs = built[1:]  # the first is the preflight workload (warm-up steps on a throwaway model)
    assert [r["seed"] for r in runs] == [0, 0, 0, 1, 1, 1]
    for seed in (0, 1):
        same = [r for r in runs if r["seed"] == seed]
        ref = same[0]
        assert [step for step, _ in ref["batches"]] == [0, 1, 2, 3]
        for other in same[1:]:
            assert ref["init"].keys() == other["init"].keys()
            assert all(torch.equal(ref["init"][k], other["init"][k]) for k in ref["init"])
            assert len(other["batches"]) == len(ref["batches"])
            for (s1, b1), (s2, b2) in zip(ref["batches"], other["batches"]):
                assert s1 == s2 and all(torch.equal(x, y) for x, y in zip(b1, b2))
    seed0, seed1 = runs[0], runs[3]
    assert not torch.equal(seed0["init"]["blocks.0.attn.q_proj.weight"], seed1["init"]["blocks.0.attn.q_proj.weight"])
    assert not torch.equal(seed0["batches"][0][1][0], seed1["batches"][0][1][0])
    # ...and the first training loss, taken before any update, is therefore the same for every contender.
    first = {n: [c.runs[s].train_losses[0] for s in (0, 1)] for n, c in result.contenders.items()}
    assert first["default"] == first["torch"] == first["adamw"]


def test_each_contender_builds_and_steps(tmp_path: Path) -> None:
    w = build_workload("llama-tiny", seed=0, **TINY)
    for name in CONTENDERS:
        w = build_workload("llama-tiny", seed=0, **TINY)
        if name == "default-lr":  # a hand-written profile records no race reference
            with pytest.raises(ContenderSkipped, match="no race reference"):
                build_contender(name, w.model, profile=write_profile(tmp_path))
            continue
        if name == "static":  # nor ladders to remove (tests/test_ladders.py builds it from one that has)
            with pytest.raises(ContenderSkipped, match="no ladders"):
                build_contender(name, w.model, profile=write_profile(tmp_path))
            continue
        built = build_contender(name, w.model, profile=write_profile(tmp_path))
        before = {k: v.clone() for k, v in w.model.state_dict().items()}
        r = train(w, built.optimizer, steps=2, eval_every=2)
        assert r.steps_done == 2 and r.state_bytes > 0 and r.diverged_at is None, name
        after = w.model.state_dict()
        assert all(not torch.equal(before[k], v) for k, v in after.items() if v.is_floating_point()), name
    assert build_contender("adamw", w.model).config["lr"] == 3e-3  # 0.13M parameters
    assert (adamw_lr_for(9_999_999), adamw_lr_for(10_000_000), adamw_lr_for(100_000_001)) == (3e-3, 1e-3, 6e-4)
    torch_opt = build_contender("torch", w.model).optimizer
    assert set(torch_opt.optimizers) == {"muon", "adamw"}
    assert isinstance(torch_opt.optimizers["muon"], torch.optim.Muon)
    muon_group = torch_opt.optimizers["muon"].param_groups[0]
    assert (muon_group["lr"], muon_group["weight_decay"], muon_group["momentum"]) == (0.02, 0.0, 0.95)
    assert set(torch_opt.state_dict()) == {"muon", "adamw"} and len(torch_opt.param_groups) == 2


def test_torch_contender_matches_default() -> None:
    """ProfiledMuon's default Muon path is bit-identical to torch.optim.Muon on CPU; the AdamW parts are the
    same algorithm written differently (lerp vs addcmul), so they agree to rounding only."""
    finals = {}
    for adamw_lr in (0.0, None):
        for name in ("default", "torch"):
            w = build_workload("gpt2-tiny", seed=3, **TINY)
            r = train(w, build_contender(name, w.model, adamw_lr=adamw_lr).optimizer, steps=5, eval_every=5)
            finals[(adamw_lr, name)] = (r.train_losses, w.model.state_dict())
    # AdamW parts frozen (lr 0): the whole model is bit-identical after 5 steps.
    (la, sa), (lb, sb) = finals[(0.0, "default")], finals[(0.0, "torch")]
    assert la == lb and all(torch.equal(sa[k], sb[k]) for k in sa)
    # Default AdamW lr: losses agree to ~1e-4 (Adam amplifies rounding where gradients are ~0).
    (la, _), (lb, _) = finals[(None, "default")], finals[(None, "torch")]
    assert la[:2] == lb[:2] and max(abs(a - b) for a, b in zip(la, lb)) < 1e-3


def test_parse_contenders() -> None:
    assert parse_contenders(None, with_profile=True) == ["profile", "default-lr", "default", "torch", "adamw"]
    assert parse_contenders(None, with_profile=False) == ["default", "torch", "adamw"]
    assert parse_contenders(None, with_profile=True, adaptive=True)[:3] == ["profile", "static", "default-lr"]
    assert parse_contenders("adamw,default,adamw", with_profile=False) == ["adamw", "default"]
    assert parse_contenders("profile,default", with_profile=True) == ["profile", "default"]
    valid = "valid: profile, static, default-lr, default, torch, adamw"
    with pytest.raises(ContenderError, match=f"unknown contender 'sgd'; {valid}"):
        parse_contenders("default,sgd", with_profile=False)
    with pytest.raises(ContenderError, match="needs --profile"):
        parse_contenders("profile", with_profile=False)
    with pytest.raises(ContenderError, match="'default-lr' needs --profile"):
        parse_contenders("default-lr", with_profile=False)
    with pytest.raises(ContenderError, match="nothing to run"):
        parse_contenders("", with_profile=False)


# ----------------------------------------------------------------------------------------- accounting


def fake_run(walls: list[float], evals: list[tuple[int, float, float]], diverged_at: int | None = None) -> TrainResult:
    r = TrainResult(steps_planned=len(walls), wall_s=walls, step_s=[1.0] * len(walls))
    r.optimizer_step_s = [0.5] * len(walls)
    r.train_losses = [1.0] * len(walls)
    r.evals = [EvalPoint(s, w, v) for s, w, v in evals]
    r.diverged_at = diverged_at
    return r


def test_equal_wall_clock_takes_latest_eval_within_the_fastest_runs_time() -> None:
    fast = fake_run([1, 2, 3, 4], [(0, 0, 5.0), (2, 2, 4.0), (4, 4, 3.0)])
    slow = fake_run([3, 6, 9, 12], [(0, 0, 5.0), (2, 6, 3.5), (4, 12, 2.0)])
    dead = fake_run([0.5], [(0, 0, 5.0)], diverged_at=2)
    T, points = equal_wall_clock({"fast": fast, "slow": slow, "dead": dead})
    assert T == 4  # the diverged run does not define T
    assert points["fast"] == EvalPoint(4, 4, 3.0)
    assert points["slow"] == EvalPoint(0, 0, 5.0)  # its eval at 6 s is past T
    assert points["dead"] is None


def test_equal_wall_clock_through_validate_with_a_fake_clock() -> None:
    """default costs 2 s a step, adamw 1 s (fake clock): T = 8 s; default is read at its step-4 eval."""
    rates = {"default": 1.0, "adamw": 0.5}
    state = {"now": 0.0, "rate": 1.0}

    def clock() -> float:
        state["now"] += state["rate"]
        return state["now"]

    def progress(event: ProgressEvent) -> None:
        if event.kind == "start":
            state["rate"] = rates[event.contender]

    result = validate("mlp", contenders="default,adamw", steps=8, eval_every=2, batch_size=4, progress=progress,
                      clock=clock)  # fmt: skip
    default, adamw = result.contenders["default"].runs[0], result.contenders["adamw"].runs[0]
    assert default.wall_s == [2.0 * k for k in range(1, 9)] and adamw.wall_s == [float(k) for k in range(1, 9)]
    assert [(e.step, e.wall_s) for e in default.evals] == [(0, 0), (2, 4), (4, 8), (6, 12), (8, 16)]
    accounting = result.summary["equal_wall"]["0"]
    assert accounting["T_s"] == 8.0
    assert accounting["points"]["default"]["step"] == 4 and accounting["points"]["adamw"]["step"] == 8
    rows = result.summary["rows"]
    assert rows["default"]["equal_wall_val_loss"]["mean"] == default.evals[2].val_loss
    assert rows["adamw"]["equal_wall_val_loss"]["mean"] == adamw.evals[-1].val_loss
    assert rows["default"]["final_val_loss"]["mean"] == default.evals[-1].val_loss
    assert rows["default"]["median_step_s"] == 2.0 and rows["default"]["median_optimizer_step_s"] == 1.0
    assert rows["adamw"]["total_train_s"] == 8.0


def contender(name: str, finals: list[float], diverged: bool = False) -> ContenderRuns:
    runs = {}
    for seed, v in enumerate(finals):
        runs[seed] = fake_run([1, 2], [(0, 0, 9.0), (2, 2, v)], diverged_at=2 if diverged else None)
    return ContenderRuns(name, {}, runs)


def test_seed_spread_is_kept_and_the_verdict_is_paired() -> None:
    """The spread numbers stay in the rows; the verdict is the paired rule against the reference (the old
    unpaired tie rule is gone: see tests/test_validate_verdict.py for every verdict)."""
    seeds = [0, 1, 2]
    clear = summarize({"a": contender("a", [1.0, 1.1, 1.2]), "b": contender("b", [2.0, 2.1, 2.2])}, seeds)
    v = clear["verdicts"]["final_val_loss"]
    assert clear["reference"] == "a" and v["reference"] == "a" and list(v["pairs"]) == ["b"]
    assert v["pairs"]["b"]["verdict"] == "worse" and v["pairs"]["b"]["mean_diff"] == pytest.approx(1.0)
    assert clear["rows"]["a"]["final_val_loss"]["std"] == pytest.approx(0.1)
    assert "b worse" in verdict_line(v)
    one = summarize({"a": contender("a", [1.0]), "b": contender("b", [1.01])}, [0])
    v = one["verdicts"]["equal_wall_val_loss"]
    assert v["pairs"]["b"]["verdict"] == "one seed" and "no verdict" in verdict_line(v)
    dead = summarize({"a": contender("a", [5.0]), "b": contender("b", [1.0], diverged=True)}, [0])
    assert dead["verdicts"]["final_val_loss"]["pairs"]["b"]["verdict"] == "diverged"
    assert dead["rows"]["b"]["final_val_loss"] is None


# ------------------------------------------------------------------------------------ divergence, file


def test_divergence_is_marked_and_others_finish(tmp_path: Path) -> None:
    # An orthogonalizer that multiplies by 1000 per step (20 steps) overflows to inf: the profile diverges.
    # (A huge lr_scale no longer can: profiles refuse lr_scale > 1e6.)
    blowup = {"coefficients": [[1000.0, 0.0, 0.0]], "ns_steps": 20, "dtype": "float32"}
    absurd = write_profile(tmp_path, {"format": "muonprof.profile/1", "defaults": blowup})
    result = validate("mlp", profile=absurd, contenders="default,adamw", steps=6, eval_every=2, batch_size=4,
                      baseline_lr=1e30)  # fmt: skip
    statuses = {n: c.status for n, c in result.contenders.items()}
    assert statuses["profile"].startswith("diverged at") and statuses["adamw"].startswith("diverged at")
    assert statuses["default"] == "ok" and result.contenders["default"].runs[0].steps_done == 6
    rows = result.summary["rows"]
    assert rows["profile"]["final_val_loss"] is None and rows["profile"]["equal_wall_val_loss"] is None
    assert result.summary["reference"] == "default"
    pairs = result.summary["verdicts"]["final_val_loss"]["pairs"]
    assert pairs["profile"]["verdict"] == pairs["adamw"]["verdict"] == "diverged"
    to_target = result.summary["to_target"]["contenders"]
    assert to_target["profile"]["reached"] == 0 and to_target["profile"]["per_seed"]["0"]["note"].startswith("diverged")
    path = save_results(result, tmp_path / "r.json")
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = load_results(path)
    assert back.contenders["profile"].status == statuses["profile"]
    assert math.isnan(back.contenders["profile"].runs[0].train_losses[-1])


def test_results_file_round_trip(tmp_path: Path) -> None:
    profile = write_profile(tmp_path)
    result = validate("mlp", profile=profile, contenders="default", steps=4, eval_every=2, batch_size=4, seeds=2)
    path = save_results(result, tmp_path / "out" / "r.json")
    data = json.loads(path.read_text())
    assert data["format"] == "muonprof.validate/1"
    meta = data["meta"]
    assert meta["model"]["spec"] == "mlp" and meta["fingerprint"].startswith("sha256:")
    assert meta["profile"]["path"] == str(profile) and meta["seeds"] == [0, 1] and meta["steps"] == 4
    assert set(meta["versions"]) >= {"muonprof", "torch", "python"} and meta["device"] == "cpu"
    run0 = data["contenders"]["profile"]["runs"][0]
    assert run0["seed"] == 0 and len(run0["train_losses"]) == 4 and [e["step"] for e in run0["evals"]] == [0, 2, 4]
    row = data["summary"]["rows"]["profile"]
    assert row["final_val_loss"]["n"] == 2 and row["final_val_loss"]["std"] is not None
    back = load_results(path)
    assert json.loads(json.dumps(back.to_dict())) == data
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temp file left behind


def test_validate_refuses_bad_input_before_training(tmp_path: Path) -> None:
    other = {"format": "muonprof.profile/1", "model": {"name": "gpt2-small", "fingerprint": "sha256:0123456789abcdef"}}
    with pytest.raises(ProfileError, match="gpt2-small"):
        validate("mlp", profile=write_profile(tmp_path, other), contenders="default", steps=2, batch_size=4)
    with pytest.raises(ValidationError, match="--steps"):
        validate("mlp", steps=0)
    with pytest.raises(ValidationError, match="shorter than one training step"):
        validate("mlp", contenders="default", steps=5, time_budget_s=1e-7, batch_size=4)


# ---------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def cli(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["validate", *args])
    return result.exit_code, result.stdout, result.stderr


BASE = ["--batch-size", "2", "--seq-len", "16", "--steps", "4", "--eval-every", "2"]


def test_cli_json_plot_and_file(app: typer.Typer, tmp_path: Path) -> None:
    out, plot = tmp_path / "r.json", tmp_path / "curves.png"
    code, stdout, err = cli(app, "gpt2-tiny", "--profile", str(write_profile(tmp_path)), "--against", "default,adamw",
                            *BASE, "--out", str(out), "--plot", str(plot), "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    assert list(doc["contenders"]) == ["profile", "default", "adamw"]
    assert doc["summary"]["verdicts"]["final_val_loss"]["reference"] == doc["summary"]["reference"] == "default"
    assert doc["files"] == {"results": str(out), "plot": str(plot)}
    assert "runs" not in doc["contenders"]["profile"]  # curves live in the file
    assert load_results(out).contenders["adamw"].runs[0].steps_done == 4
    assert plot.read_bytes()[:4] == b"\x89PNG" and plot.stat().st_size > 10_000


def test_cli_table(app: typer.Typer, tmp_path: Path) -> None:
    code, stdout, err = cli(app, "llama-tiny", "--against", "default,torch", *BASE, "--out", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "default" in stdout and "torch" in stdout and "val loss at equal steps" in stdout and "wrote" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--against", "default,sgd"], "unknown contender 'sgd'"),
        (["--against", "profile"], "needs --profile"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--time-budget", "1e-7", "--against", "default"], "shorter than one training step"),
        (["--seq-len", "100000"], "--seq-len"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(
    app: typer.Typer, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "r.json"
    code, _, err = cli(app, "gpt2-tiny", "--batch-size", "2", "--seq-len", "16", *args, "--out", str(out))
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not out.exists()


def test_cli_profile_for_another_model(app: typer.Typer, tmp_path: Path) -> None:
    other = {"format": "muonprof.profile/1", "layers": {"h.0.mlp.c_fc.weight": {"ns_steps": 3}, "h.1.x": {}}}
    out = tmp_path / "r.json"
    code, _, err = cli(app, "gpt2-tiny", "--profile", str(write_profile(tmp_path, other)), *BASE, "--out", str(out))
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "h.0.mlp.c_fc.weight" in lines[0] and "h.1.x" in lines[0]
    assert not out.exists()
    code, _, err = cli(app, "no-such-model", *BASE, "--out", str(out))
    assert code != 0 and len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_unwritable_out_fails_before_training(app: typer.Typer, tmp_path: Path, monkeypatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("trained despite an unwritable --out")

    monkeypatch.setattr(run_module, "train", boom)
    code, _, err = cli(app, "gpt2-tiny", *BASE, "--out", str(tmp_path))  # a directory
    assert code != 0 and "is a directory" in err and len(err.strip().splitlines()) == 1


def test_cli_ctrl_c_leaves_no_results_file(app: typer.Typer, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "r.json"
    out.write_text("old results\n")

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train", interrupted)
    code, _, err = cli(app, "gpt2-tiny", *BASE, "--against", "default", "--out", str(out))
    assert code == 130 and "interrupted" in err
    assert out.read_text() == "old results\n" and list(tmp_path.iterdir()) == [out]


def test_storm_profile_counts_gradient_evaluations(app: typer.Typer, tmp_path: Path) -> None:
    """A storm-momentum profile is stepped with a closure (warm-up too) and its extra gradients are reported."""
    storm = write_profile(tmp_path, {"format": "muonprof.profile/1", "defaults": {"momentum": "storm"}})
    out = tmp_path / "r.json"
    code, stdout, err = cli(app, "mlp", "--profile", str(storm), "--against", "default", "--batch-size", "4",
                            "--steps", "3", "--eval-every", "3", "--out", str(out))  # fmt: skip
    assert code == 0, err
    result = load_results(out)
    assert result.contenders["profile"].runs[0].grad_evals == [1, 3, 5]
    assert result.contenders["default"].runs[0].grad_evals == [1, 2, 3]
    rows = result.summary["rows"]
    assert rows["profile"]["total_grad_evals"] == 5 and rows["default"]["grad_evals_per_step"] == 1.0
    assert "profile made 1.67 gradient evaluations per step" in " ".join(stdout.split())
    assert result.meta["distributed"] == {"nproc": 1, "world_size": 1, "backend": None}
