"""``muonprof tune`` workers on real storages: two at once on one study, and a tune killed mid stage 2.

Each case runs the real CLI in subprocesses on gpt2-tiny with the cheapest settings that still run capture,
bench, stage 1 and stage 2 (``--race-candidates 0``: the race has its own resume tests in test_race.py;
``--methods svd``: the quickest bench beside the always-timed default), then reads the studies back: every
trial is counted by number and state. The PostgreSQL case needs a server
(``MUONPROF_TEST_POSTGRES_URL``, which ``.ci/run`` sets from ``.ci/start-postgres``) and skips without one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import default_sigint
from optuna.trial import TrialState

from muonprof.tune.study import open_storage

ROOT = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("MUONPROF_TEST_POSTGRES_URL")
TRIALS, LR_TRIALS = 16, 3
TINY = ["gpt2-tiny", "--trials", str(TRIALS), "--lr-trials", str(LR_TRIALS), "--lr-steps", "6",
        "--race-candidates", "0", "--capture-steps", "2", "--warmup-steps", "0", "--captures", "1", "--window", "0",
        "--batch-size", "2", "--seq-len", "16", "--methods", "svd", "--device", "cpu", "--json"]  # fmt: skip
VOLATILE = ("created", "command", "host")  # provenance fields that name the run, not the result


def tune(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "muonprof", "tune", *TINY, "--out", str(out), *extra]


def env() -> dict[str, str]:
    """This checkout's package, unbuffered output, one thread each (two workers share 2 cores)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a tune running for the rest of the suite
        proc.communicate()
        raise
    return proc.returncode, out, err


_STORAGES: dict[str, optuna.storages.BaseStorage] = {}


def load(storage: str, name: str) -> optuna.Study:
    """The study, through one storage object per URL (polling must not build an engine each time)."""
    if storage not in _STORAGES:
        _STORAGES[storage] = open_storage(storage)
    return optuna.load_study(study_name=name, storage=_STORAGES[storage])


def states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def searched(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The budgeted trials: neither stage 1's exact seeds nor trials given back unrun as surplus."""
    return [t for t in study.trials if "seed" not in t.user_attrs and "surplus" not in t.user_attrs]


def comparable(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    for key in VOLATILE:
        document["provenance"].pop(key, None)
    return document


def check_budgets(storage: str, study: str) -> None:
    """Exactly the requested trials per stage, all finished, numbered once, the default settings' trial once."""
    ortho, lr = load(storage, f"{study}-ortho"), load(storage, f"{study}-lr")
    for s in (ortho, lr):
        assert sorted(t.number for t in s.trials) == list(range(len(s.trials)))
        assert not [t for t in s.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], states(s)
    done = [t for t in searched(ortho) if t.state.is_finished() and t.state != TrialState.FAIL]
    assert len(done) == TRIALS, states(ortho)
    lr_done = [t for t in searched(lr) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(lr_done) == LR_TRIALS, states(lr)
    defaults = [t for t in lr_done if t.user_attrs.get("default")]
    assert len(defaults) == 1 and defaults[0].state == TrialState.COMPLETE
    assert defaults[0].params["lr_mult"] == 1.0 and defaults[0].params["lr_rule"] == "original"


def two_workers(tmp_path: Path, storage: str) -> None:
    study = f"w{uuid.uuid4().hex[:8]}"
    outs = [tmp_path / "a" / "p.json", tmp_path / "b" / "p.json"]
    procs = [start(tune(out, "--storage", storage, "--study-name", study)) for out in outs]
    results = [finish(p) for p in procs]
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    check_budgets(storage, study)
    summaries = [json.loads(out) for _, out, _ in results]
    assert sum(s["stage1_trials_run"] for s in summaries) == TRIALS  # between them, each trial once
    assert comparable(outs[0]) == comparable(outs[1])  # one study, one profile


def test_two_workers_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    two_workers(tmp_path, f"sqlite:///{tmp_path / 'fresh.db'}")


def test_two_workers_on_a_journal_file(tmp_path: Path) -> None:
    two_workers(tmp_path, f"journal:{tmp_path / 'shared.journal'}")


@pytest.mark.skipif(POSTGRES is None, reason="MUONPROF_TEST_POSTGRES_URL not set (.ci/start-postgres starts a server)")
def test_two_workers_on_postgresql(tmp_path: Path) -> None:
    assert POSTGRES is not None
    two_workers(tmp_path, POSTGRES)


def wait_for(storage: str, name: str, ready: Any, proc: subprocess.Popen[str], timeout: float = 180) -> None:
    """Poll the study until ``ready(trials)``; fail with the worker's output if it ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tune ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        try:
            if ready(load(storage, name).trials):
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"{name} never reached the state waited for")


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_stage2_resumes_and_keeps_its_default_trial(tmp_path: Path, how: str) -> None:
    """SIGINT during the default settings' trial (it ends FAIL), SIGKILL during a later one (it stays RUNNING):
    the same command again reuses the spectra and bench, keeps every finished trial, and runs the default."""
    out = tmp_path / "p.json"
    storage = f"sqlite:///{tmp_path / 'p.optuna.db'}"
    args = tune(out, "--study-name", "k", "--lr-steps", "16")  # (the last --lr-steps counts)
    proc = start(args)

    def running_default(trials: list[optuna.trial.FrozenTrial]) -> bool:
        return any(t.state == TrialState.RUNNING and t.user_attrs.get("default") for t in trials)

    def after_default(trials: list[optuna.trial.FrozenTrial]) -> bool:
        return any(t.state == TrialState.COMPLETE for t in trials) and any(
            t.state == TrialState.RUNNING and "pid" in t.user_attrs for t in trials
        )

    wait_for(storage, "k-lr", running_default if how == "sigint" else after_default, proc)
    proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
    rc, _, err = finish(proc)
    lost = load(storage, "k-lr").trials
    if how == "sigint":
        assert rc == 130 and "run the same command again" in err, err[-2000:]
        assert [t.state for t in lost if t.user_attrs.get("default")] == [TrialState.FAIL]
    else:
        assert rc == -signal.SIGKILL
        assert any(t.state == TrialState.RUNNING for t in lost)
    kept = {t.number: t.value for t in lost if t.state == TrialState.COMPLETE}
    ortho_before = len(load(storage, "k-ortho").trials)
    assert not out.exists()

    rc, stdout, err = finish(start(args))
    assert rc == 0, err[-2000:]
    assert "capture: reusing" in err and "bench: reusing" in err
    summary = json.loads(stdout)
    assert summary["stage1_trials_run"] == 0 and len(load(storage, "k-ortho").trials) == ortho_before
    assert summary["lr_default_val_loss"] is not None  # not "default settings n/a"
    check_budgets(storage, "k")
    resumed = {t.number: t for t in load(storage, "k-lr").trials}
    assert all(resumed[n].state == TrialState.COMPLETE and resumed[n].value == v for n, v in kept.items())
    assert all(resumed[t.number].state == TrialState.FAIL for t in lost if t.state == TrialState.RUNNING)
    assert out.is_file()
    if how == "sigint":  # the same study with another search option: refused, naming the option
        rc, _, err = finish(start([*args, "--min-layer-alignment", "0.4"]))
        assert rc == 2 and "--min-layer-alignment 0.5 (now 0.4)" in err and "Traceback" not in err, err[-2000:]


def test_a_changed_option_is_named_when_the_study_is_refused(tmp_path: Path) -> None:
    from muonprof.tune import TuneError
    from muonprof.tune.study import open_study

    storage = f"sqlite:///{tmp_path / 's.db'}"
    key = {"--batch-size": 2, "--data": None, "--seed": 0}
    open_study(storage, "s", fingerprint="f", model="m", stage="lr", key=key, direction="minimize")
    open_study(storage, "s", fingerprint="f", model="m", stage="lr", key=key, direction="minimize")  # resumes
    with pytest.raises(TuneError) as err:
        open_study(storage, "s", fingerprint="f", model="m", stage="lr", key={**key, "--batch-size": 4},
                   direction="minimize")  # fmt: skip
    message = str(err.value)
    assert "--batch-size 2 (now 4)" in message and "--seed" not in message and "\n" not in message
    with pytest.raises(TuneError, match=r"fingerprint f \(now g\)"):
        open_study(storage, "s", fingerprint="g", model="m", stage="lr", key=key, direction="minimize")


@pytest.fixture(scope="module")
def tiny_inputs() -> tuple[Any, Any]:
    """gpt2-tiny spectra and a small bench of them (the quick grid the CLI cases use)."""
    import torch

    from muonprof.bench import parse_grid, run_bench
    from muonprof.capture import capture_spectra
    from muonprof.workload import build_workload

    spectra = capture_spectra(build_workload("gpt2-tiny", batch_size=2, seq_len=16, seed=0), steps=2, every=1)
    bench = run_bench(spectra, device=torch.device("cpu"), grid=parse_grid(methods="svd"), seeds=1, probe=False,
                      timing={"min_repeats": 1, "max_repeats": 2, "target_s": 0.0})  # fmt: skip
    return spectra, bench


def slower(bench: Any, factor: float) -> Any:
    """The same bench measured again on a busier machine: every time scaled, nothing else changed."""
    from muonprof.bench import BenchResult

    data = bench.to_json()
    for cost in data["costs"]:
        for field in ("per_layer_s", "bucket_s"):
            if cost.get(field) is not None:
                cost[field] *= factor
        cost["time_s"] = {k: v * factor if k.endswith("_s") else v for k, v in cost["time_s"].items()}
    return BenchResult.from_json(data)


def test_a_second_bench_joins_the_study_with_the_first_ones_menus(tmp_path: Path, tiny_inputs: Any) -> None:
    """Timings are noise: a worker (or a re-run) with its own bench uses the one the study was made with; a
    bench of another grid defines another search and is refused, saying so."""
    from muonprof.bench import BenchResult
    from muonprof.tune import TuneError, tune_stage1
    from muonprof.tune.space import BASELINE_LABEL

    spectra, bench = tiny_inputs
    kwargs = {"storage": f"sqlite:///{tmp_path / 's.db'}", "study_name": "b", "model": "gpt2-tiny", "trials": 6,
              "fingerprint": spectra.meta["fingerprint"], "seed": 0, "target_alignment": None,
              "time_budget_s": None}  # fmt: skip
    first = tune_stage1(bench, spectra, **kwargs)
    second = tune_stage1(slower(bench, 1.7), spectra, **kwargs)
    assert not first.adopted_bench and second.adopted_bench
    assert second.baseline.time_s == pytest.approx(first.baseline.time_s)
    assert second.choice.picks == first.choice.picks and second.trials_run == 0
    data = bench.to_json()
    dropped = next(c["label"] for c in data["costs"] if c["label"] != BASELINE_LABEL)
    data["costs"] = [c for c in data["costs"] if c["label"] != dropped]  # a bench of a smaller grid
    with pytest.raises(TuneError, match=f"bench candidates: {dropped} removed"):
        tune_stage1(BenchResult.from_json(data), spectra, **kwargs)


# ------------------------------------------------------------------------------------------ other hosts


def claimed_elsewhere(study: optuna.Study, host: str, pid: int) -> optuna.trial.Trial:
    """A RUNNING trial owned by a worker on another machine (as ``claim()`` there writes it)."""
    trial = study.ask()
    trial.set_user_attr("host", host)
    trial.set_user_attr("pid", pid)
    return trial


def test_another_hosts_trial_is_stale_only_once_its_heartbeat_is_silent(tmp_path: Path) -> None:
    """A pid cannot be checked across machines: another host's RUNNING trial counts as live while its worker
    keeps its heartbeat (or keeps none: nothing to judge by), and as dead once the heartbeat has been silent for
    ``HEARTBEAT_GRACE_S``; then ``fail_stale`` gives it back and its work is done again."""
    from muonprof.tune.study import HEARTBEAT_GRACE_S, WORKER_ATTR, fail_stale, run_until, stale_trials

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"), study_name="h")
    trial = claimed_elsewhere(study, "elsewhere.example", 4242)
    key = f"{WORKER_ATTR}elsewhere.example:4242"
    assert stale_trials(study) == []  # no heartbeat at all (an older worker, a file storage): live
    study.set_user_attr(key, True)
    assert stale_trials(study) == []
    study.set_user_attr(key, time.time() - HEARTBEAT_GRACE_S / 2)  # beat recently
    assert stale_trials(study) == []
    study.set_user_attr(key, time.time() - 2 * HEARTBEAT_GRACE_S)  # silent: that machine died or lost the server
    assert [t.number for t in stale_trials(study)] == [trial.number]
    assert fail_stale(study) == 1 and study.trials[0].state == TrialState.FAIL
    # an ownerless RUNNING trial while only a silent remote worker is registered: no live owner, run at once
    orphan = study.ask()
    assert [t.number for t in stale_trials(study)] == [orphan.number]
    assert run_until(study, lambda t: t.suggest_float("x", 0, 1), 2) == 2


def test_a_server_storage_worker_keeps_a_heartbeat_and_a_file_storage_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from muonprof.tune import study as study_mod

    monkeypatch.setattr(study_mod, "HEARTBEAT_S", 0.05)
    key = f"{study_mod.WORKER_ATTR}{socket.gethostname()}:{os.getpid()}"
    local = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"), study_name="f")
    assert not study_mod.uses_heartbeat(local)
    study_mod.register_worker(local)
    assert local.user_attrs[key] is True  # one host: the pid check is exact, no thread
    try:
        study_mod.register_worker(local, heartbeat=True)  # as on a server
        first = local.user_attrs[key]
        assert isinstance(first, float)
        deadline = time.time() + 30
        while local.user_attrs[key] == first and time.time() < deadline:
            time.sleep(0.05)
        assert local.user_attrs[key] > first, "the heartbeat thread rewrites the time"
    finally:
        study_mod.stop_heartbeats()
    if POSTGRES is not None:
        name = f"hb-{uuid.uuid4().hex[:8]}"
        server = optuna.create_study(storage=open_storage(POSTGRES), study_name=name)
        try:
            assert study_mod.uses_heartbeat(server)
        finally:
            optuna.delete_study(study_name=name, storage=open_storage(POSTGRES))


def test_a_bench_with_a_non_finite_figure_resumes_its_study(tmp_path: Path, tiny_inputs: Any) -> None:
    """A candidate with no finite singular-value bound (bench writes null to its file) was stored in the study as
    NaN/inf, which the strict loader then refused on the next run: resuming failed ("corrupt bench file")."""
    import copy

    from muonprof.tune import tune_stage1

    spectra, bench = tiny_inputs
    odd = copy.deepcopy(bench)
    layer = next(iter(odd.accuracy))
    label = next(iter(odd.accuracy[layer]))
    odd.accuracy[layer][label]["sv_min"] = float("inf")
    kwargs = {"storage": f"sqlite:///{tmp_path / 's.db'}", "study_name": "n", "model": "gpt2-tiny", "trials": 4,
              "fingerprint": spectra.meta["fingerprint"], "seed": 0, "target_alignment": None,
              "time_budget_s": None}  # fmt: skip
    from muonprof.bench import BenchResult

    first = tune_stage1(odd, spectra, **kwargs)
    on_disk = BenchResult.from_json(json.loads(odd.dumps()))  # what the bench file beside the profile holds
    again = tune_stage1(on_disk, spectra, **kwargs)  # the next run reuses it: resumes, adopts and refuses nothing
    assert not first.adopted_bench and not again.adopted_bench and again.trials_run == 0
