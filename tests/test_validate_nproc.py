"""``muonprof validate --nproc N``: data-parallel ranks on CPU/gloo give the one-process numbers, bad values
are refused in one line, and a failing, crashing or interrupted worker ends the whole run cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import typer
from conftest import default_sigint
from typer.testing import CliRunner

from muonprof.launch import LaunchError, WorkerContext, launch
from muonprof.validate import load_results, validate
from muonprof.validate.distributed import shard_batch

runner = CliRunner()
MLP = ["mlp", "--batch-size", "4", "--steps", "4", "--eval-every", "2"]
REPO = Path(__file__).resolve().parents[1]


pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch without torch.distributed"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    from muonprof.cli import app as main_app

    return main_app


def cli(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["validate", *args])
    return result.exit_code, result.stdout, result.stderr


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------- same numbers


def test_nproc_2_matches_nproc_1(app: typer.Typer, tmp_path: Path) -> None:
    """2 gloo ranks x 2 rows give the one-process run on 4 rows, up to float rounding.

    Tolerances: the loss of the first step (before any update) differs only by summation order (mean of
    two half-batch means vs one mean): <= 1e-6. After updates, AdamW reproduces the gradient rounding
    difference (~1e-7 relative) about as is: 1e-5. Muon's Newton-Schulz runs in bf16 (8-bit mantissa),
    so a 1-ulp gradient difference can round a bf16 product the other way: measured up to ~4e-5 after 6
    steps on gpt2-tiny, bound 2e-3 (still far below the differences between contenders, ~0.1).
    """
    out = tmp_path / "r2.json"
    code, _, err = cli(app, *MLP, "--against", "default,adamw", "--nproc", "2", "--out", str(out), "--json")
    assert code == 0, err
    two = load_results(out)
    one = validate("mlp", contenders="default,adamw", steps=4, eval_every=2, batch_size=4)
    assert two.meta["distributed"]["world_size"] == 2 and two.meta["distributed"]["backend"] == "gloo"
    assert two.meta["distributed"]["per_rank_batch_size"] == 2 and one.meta["distributed"]["nproc"] == 1
    assert json.loads(out.read_text())["meta"]["distributed"]["nproc"] == 2
    for name, tol in (("adamw", 1e-5), ("default", 2e-3)):
        a, b = one.contenders[name].runs[0], two.contenders[name].runs[0]
        assert b.steps_done == 4 and b.grad_evals == [1, 2, 3, 4]
        assert abs(a.train_losses[0] - b.train_losses[0]) <= 1e-6
        assert b.train_losses == pytest.approx(a.train_losses, rel=tol)
        assert [e.step for e in b.evals] == [e.step for e in a.evals] == [0, 2, 4]
        assert [e.val_loss for e in b.evals] == pytest.approx([e.val_loss for e in a.evals], rel=tol)


def test_shard_batch_splits_rows_and_refuses_uneven_batches() -> None:
    x, y = torch.arange(12).reshape(6, 2), torch.arange(6)
    parts = [shard_batch((x, {"y": y}, "tag"), r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(parts[1][1]["y"], y[2:4])
    assert parts[2][2] == "tag"
    with pytest.raises(ValueError, match="does not split over 4 ranks"):
        shard_batch((x, y), 0, 4)


# ---------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nproc", "0"], "--nproc must be at least 1"),
        (["--nproc", "-2"], "--nproc must be at least 1"),
        (["--nproc", "4096"], "more CPU ranks than this machine has cores for"),
        (["--nproc", "2", "--batch-size", "3"], "--batch-size 3 does not split over --nproc 2"),
    ],
)
def test_bad_nproc_is_one_line_before_any_worker(app: typer.Typer, tmp_path: Path, args: list[str], message: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import muonprof.validate.distributed as distributed

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched workers"))
    out = tmp_path / "r.json"
    code, _, err = cli(app, "mlp", "--steps", "2", "--device", "cpu", *args, "--out", str(out))
    assert code == 2 and message in one_error_line(err) and not out.exists()


def test_worker_error_is_one_line(app: typer.Typer, tmp_path: Path) -> None:
    """A bad model spec fails in every worker: its one-line message, exit 2, nothing written."""
    out = tmp_path / "r.json"
    start = time.monotonic()
    code, _, err = cli(app, "no-such-model", "--nproc", "2", "--steps", "2", "--batch-size", "2", "--out", str(out))
    line = one_error_line(err)
    assert code == 2 and "no-such-model" in line and "no results file written" in line and not out.exists()
    assert "rank" not in line and time.monotonic() - start < 60


# --------------------------------------------------------------------- crashes, Ctrl-C, no leftovers


def _crash_on_rank_1(ctx: WorkerContext) -> None:
    ctx.send(os.getpid())
    if ctx.rank == 1:
        time.sleep(0.5)  # let the queue's feeder thread deliver the pid first
        os._exit(3)
    dist.barrier()  # rank 0 waits here for a peer that is gone


def _wait_forever(ctx: WorkerContext) -> None:
    ctx.send(os.getpid())
    time.sleep(600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_crash_stops_the_others_without_hanging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the kept worker logs land here, not in /tmp
    pids: list[int] = []
    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"worker rank 1 exited with code 3 \(worker log: ") as info:
        launch(_crash_on_rank_1, nproc=2, on_message=pids.append, timeout_s=60)
    assert info.value.code == 1 and time.monotonic() - start < 60
    assert len(pids) == 2 and not any(_alive(p) for p in pids)
    log = Path(info.value.message.split("worker log: ")[1].rstrip(")"))
    assert log.parent.parent == tmp_path and log.name == "rank1.log"


def _raise_on_rank_1(ctx: WorkerContext) -> None:
    if ctx.rank == 1:
        raise RuntimeError("boom\nsecond line")
    dist.barrier()


def _sigkill_rank_1(ctx: WorkerContext) -> None:
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def _exit_while_rank_0_raises(ctx: WorkerContext) -> None:
    dist.barrier()
    if ctx.rank == 1:
        os._exit(3)
    raise ValueError("lost my peer")  # at about the same moment: both exits are seen in one poll


@pytest.mark.parametrize(
    ("target", "line", "logged"),
    [
        (_raise_on_rank_1, "rank 1: RuntimeError: boom; second line (worker log: ", "RuntimeError: boom"),
        (_sigkill_rank_1, "worker rank 1 was killed by SIGKILL (worker log: ", ""),
        (_exit_while_rank_0_raises, "worker rank 1 exited with code 3 (worker log: ", ""),
    ],
    ids=["raises", "sigkill", "silent-death-beats-peer-error"],
)
def test_worker_failure_is_one_line_naming_rank_and_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           target: Any, line: str, logged: str) -> None:  # fmt: skip
    """The line names the rank that caused the failure and why; a raising worker's traceback is in its log."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(LaunchError) as info:
        launch(target, nproc=2, timeout_s=60)
    assert info.value.message.startswith(line) and "\n" not in info.value.message and info.value.code == 1
    log = Path(info.value.message.split("worker log: ")[1].rstrip(")"))
    assert log.is_file() and logged in log.read_text()
    if logged:
        assert "Traceback (most recent call last)" in log.read_text()


def test_keyboard_interrupt_in_the_parent_stops_every_worker() -> None:
    pids: list[int] = []

    def on_message(pid: int) -> None:
        pids.append(pid)
        if len(pids) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch(_wait_forever, nproc=2, on_message=on_message, timeout_s=60)
    assert not any(_alive(p) for p in pids)


def _tagged_processes(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _muonprof(args: list[str], tag: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, MUONPROF_TEST_TAG=tag, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "muonprof", "validate", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint,
                            **kwargs)  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_unreadable_profile_fails_cleanly_on_the_console(tmp_path: Path) -> None:
    """As a user sees it: one line on stderr, no traceback, exit 2, and no process left behind."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    tag = uuid.uuid4().hex
    proc = _muonprof([*MLP, "--nproc", "2", "--profile", str(bad), "--out", str(tmp_path / "r.json")], tag)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 2 and "bad.json" in one_error_line(err)
    assert not (tmp_path / "r.json").exists() and _tagged_processes(tag) == []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_all_workers(tmp_path: Path) -> None:
    """SIGINT to the terminal's process group (what Ctrl-C does): exit 130, one line, no worker left."""
    tag = uuid.uuid4().hex
    out = tmp_path / "r.json"
    args = ["mlp", "--batch-size", "4", "--steps", "100000", "--nproc", "2", "--out", str(out)]
    proc = _muonprof(args, tag, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(_tagged_processes(tag)) < 3 and time.monotonic() < deadline:  # the parent and two workers
        time.sleep(0.2)
    time.sleep(1.0)  # let them reach training
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:  # a failed run must not leave its workers training for the rest of the suite
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in one_error_line(err)
    assert not out.exists() and _tagged_processes(tag) == []
