"""Optuna studies in the user's storage: SQLite next to the output by default, any RDB URL, or a journal file.

A study is bound to what defines its search: on creation its *key* (model, fingerprint, stage, and the options
and inputs that shape the search, never a measured number) is stored as a study attribute, and every later
open compares it, so ``--study-name`` resumes a study and several ``muonprof tune`` processes pointed at one
storage share its trials, but a study made for another model or other settings is refused, naming what changed.

Several workers at once: the storage is created once (a file lock for SQLite, retries on the creation race of
a server), the study is created by exactly one of them (Optuna's unique study name decides) and that one writes
its attributes (and, through ``on_create``, its first trials) before marking it ready; the others wait for that.
The trial budget (``--trials N``) counts the study's trials, whoever runs them: finished, running, and queued
ones, so two workers never overshoot it, and a trial that died with its process (a RUNNING trial of this host
whose pid is gone) is marked FAIL and run again by whoever comes next.

Workers on other hosts (a shared PostgreSQL or MySQL server): a pid cannot be checked across machines, so on a
server storage every worker keeps a heartbeat (its ``worker:HOST:PID`` study attribute rewritten with the time
every ``HEARTBEAT_S`` by a daemon thread), and another host's RUNNING trial counts as dead once its worker has
been silent for ``HEARTBEAT_GRACE_S`` (generous against clock skew between hosts and a busy machine). SQLite
and journal files live on one machine, where the pid check is exact; they get no heartbeat thread.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .space import TuneError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)  # count in the budget
READY_ATTR = "fingerprint"  # written last by the creating worker: the study is ready for the others
OWNERLESS_GRACE_S = 60.0  # a RUNNING trial without host/pid older than this is a dead worker's
WORKER_ATTR = "worker:"  # study attribute "worker:HOST:PID" of every process that asks trials (register_worker)
READY_WAIT_S = 120.0
HEARTBEAT_S = 20.0  # how often a worker on a server storage rewrites its worker attribute with the time
HEARTBEAT_GRACE_S = 180.0  # another host's worker silent this long is dead: its RUNNING trials are run again
BLOB_CHUNK = 48_000  # characters per user attribute (MySQL's TEXT holds 64 KiB)

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


def default_storage(out: str | os.PathLike[str]) -> str:
    """``sqlite:///<out without suffix>.optuna.db``: the study lives next to the profile it produced."""
    path = Path(out)
    return f"sqlite:///{path.with_name(path.stem + '.optuna.db').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """``journal:PATH`` or a ``.log``/``.journal`` path as a journal file; else an RDB URL, its tables created
    once however many workers start together (TuneError for anything that is neither)."""
    if url.startswith("journal:") or url.endswith((".log", ".journal", ".jsonl")):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise TuneError(
            f"--storage {url!r}: use an RDB URL (sqlite:///file.db, postgresql://..., mysql://...) or journal:PATH"
        )
    url = _with_driver(url)
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        # Two processes creating one fresh file race on Optuna's schema (`UNIQUE constraint failed:
        # alembic_version.version_num`): create it under a lock; a long timeout rides out busy writers.
        with _file_lock(db.with_name(db.name + ".lock")):
            return _rdb(url, {"connect_args": {"timeout": 60}})
    return _rdb(url, {"pool_pre_ping": True})


def _with_driver(url: str) -> str:
    """``postgresql://`` picks SQLAlchemy's default driver (psycopg 3 from SQLAlchemy 2.1 on): name psycopg2 when
    only that one is installed (the ``dev`` extra's), so a plain URL works."""
    if not url.startswith(("postgresql://", "postgres://")):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def _rdb(url: str, engine_kwargs: dict[str, Any], attempts: int = 6) -> optuna.storages.RDBStorage:
    """RDBStorage, retried when another worker is creating the same schema at the same moment (a server's
    unique-constraint or duplicate-table error); other errors propagate at once."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as e:
            racing = isinstance(e, sqlalchemy.exc.IntegrityError) or any(
                word in str(e).lower() for word in ("already exists", "duplicate", "locked")
            )
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX flock); elsewhere none (the retries still apply)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_study(
    storage: str,
    name: str,
    *,
    fingerprint: str,
    model: str,
    stage: str,
    key: Mapping[str, Any] | None = None,
    directions: Sequence[str] | None = None,
    direction: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    on_create: Callable[[optuna.Study], None] | None = None,
) -> optuna.Study:
    """Create or load ``name`` in ``storage``; refuse it if it was made for another model, stage or key.

    ``key``: the options and inputs that define this study's search, by the name a user knows them by
    (``{"--seed": 0, ...}``); a mismatch names each one that changed. ``on_create`` runs once, in the worker
    that created the study, before the study is marked ready (its first trials, stored inputs)."""
    optuna.logging.set_verbosity(logging.WARNING)
    wanted = [d.lower() for d in (directions or [direction or "minimize"])]
    full_key = {"model": model, "fingerprint": fingerprint, "stage": stage, **(key or {})}
    full_key = json.loads(json.dumps(full_key, default=str))  # as it reads back from the storage
    try:
        store = open_storage(storage)
        try:
            store.create_new_study([optuna.study.StudyDirection[d.upper()] for d in wanted], name)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            created = False
        study = optuna.load_study(study_name=name, storage=store, sampler=sampler, pruner=pruner)
    except TuneError:
        raise
    except KeyError as err:
        raise TuneError(f"study {name!r}: unknown direction {err}") from None
    except Exception as err:  # sqlalchemy / driver errors: unreachable host, missing driver, bad path
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise TuneError(f"cannot open Optuna storage {storage}: {reason}") from None
    stored_directions = [d.name.lower() for d in study.directions]
    if stored_directions != wanted:
        raise TuneError(
            f"study {name!r} in {storage} optimizes {stored_directions}, not {wanted}: pick another --study-name"
        )
    if created:
        study.set_user_attr("key", full_key)
        study.set_user_attr("model", model)
        study.set_user_attr("stage", stage)
        if on_create is not None:
            on_create(study)
        study.set_user_attr(READY_ATTR, fingerprint)
        return study
    attrs = _wait_ready(study, name, storage)
    stored = attrs.get("key")
    if stored is None:  # made by an older muonprof: only the fingerprint and stage were stored
        stored = {"model": attrs.get("model"), "fingerprint": attrs[READY_ATTR], "stage": attrs.get("stage", stage)}
        mine = {k: full_key[k] for k in stored}
    else:
        mine = full_key
    changed = key_changes(stored, mine)
    if changed:
        raise TuneError(
            f"study {name!r} in {storage} was made for other settings: {'; '.join(changed)}. Run with those "
            "again to resume it, or pick another --study-name"
        )
    return study


def _wait_ready(study: optuna.Study, name: str, storage: str) -> dict[str, Any]:
    """The study's attributes once its creating worker has written them (it may be a moment behind us)."""
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        attrs = study.user_attrs
        if READY_ATTR in attrs:
            return attrs
        if time.monotonic() > deadline:
            raise TuneError(
                f"study {name!r} in {storage} was created but never set up (its worker died at once?): "
                "delete it (optuna delete-study) or pick another --study-name"
            )
        time.sleep(0.2)


def key_changes(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``"--seed 0 (now 1)"`` for each component of a study key that differs, in the key's order."""
    names = list(stored) + [k for k in wanted if k not in stored]
    return [_change(name, stored.get(name), wanted.get(name)) for name in names if stored.get(name) != wanted.get(name)]


def _change(name: str, was: Any, now: Any) -> str:
    """One changed key component; for two lists (a grid's candidates, layers) what was added and removed."""
    if isinstance(was, list) and isinstance(now, list):
        added = [str(v) for v in now if v not in was]
        removed = [str(v) for v in was if v not in now]
        pairs = ((added, "added"), (removed, "removed"))
        parts = [f"{_short(', '.join(items))} {what}" for items, what in pairs if items]
        return f"{name}: {'; '.join(parts) or 'reordered'}"
    return f"{name} {_short(was)} (now {_short(now)})"


def _short(value: Any, limit: int = 60) -> str:
    if value is None:
        return "unset"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def put_blob(study: optuna.Study, name: str, data: Any) -> None:
    """Store JSON-able ``data`` as compressed chunks of user attributes (a whole bench artifact fits)."""
    text = base64.b64encode(zlib.compress(json.dumps(data, sort_keys=True).encode(), 6)).decode()
    chunks = [text[i : i + BLOB_CHUNK] for i in range(0, len(text), BLOB_CHUNK)] or [""]
    for i, chunk in enumerate(chunks):
        study.set_user_attr(f"{name}:{i}", chunk)
    study.set_user_attr(f"{name}:chunks", len(chunks))


def get_blob(study: optuna.Study, name: str) -> Any | None:
    """What ``put_blob`` stored under ``name``, or None."""
    attrs = study.user_attrs
    count = attrs.get(f"{name}:chunks")
    if count is None:
        return None
    text = "".join(str(attrs[f"{name}:{i}"]) for i in range(int(count)))
    return json.loads(zlib.decompress(base64.b64decode(text)))


def finished_trials(study: optuna.Study, *, searched_only: bool = False) -> list[optuna.trial.FrozenTrial]:
    """Finished trials; ``searched_only`` leaves out the exact profiles added as seeds (see stage 1)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return [t for t in trials if "seed" not in t.user_attrs] if searched_only else trials


def claim(trial: optuna.Trial) -> None:
    """Mark a trial as this process's, so that another worker can tell a live one from a dead one's."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())


def register_worker(study: optuna.Study, *, heartbeat: bool | None = None) -> None:
    """Record, before this process asks its first trial of ``study``, that it works on it.

    ``ask()`` and ``claim()`` are separate writes, so a worker killed between them (SIGKILL lands there
    often: a stage-1 trial is mostly those storage calls) leaves a RUNNING trial without an owner. With
    every asking process registered, the next worker sees at once that no live process can own it (all
    registered ones are dead processes of this host) instead of waiting ``OWNERLESS_GRACE_S``.

    With ``heartbeat`` (default: on server storages, see ``uses_heartbeat``) the attribute holds the time and a
    daemon thread rewrites it every ``HEARTBEAT_S``, so that workers on other hosts can tell this one alive."""
    key = f"{WORKER_ATTR}{socket.gethostname()}:{os.getpid()}"
    if uses_heartbeat(study) if heartbeat is None else heartbeat:
        study.set_user_attr(key, time.time())
        _start_heartbeat(study, key)
    elif key not in study.user_attrs:
        study.set_user_attr(key, True)


def uses_heartbeat(study: optuna.Study) -> bool:
    """Whether ``study`` lives on a server (an RDB URL other than SQLite): where workers on several hosts meet."""
    storage = getattr(study, "_storage", None)
    url = getattr(getattr(storage, "_backend", storage), "url", None)
    return isinstance(url, str) and not url.startswith("sqlite")


_HEARTBEATS: dict[tuple[str, str], threading.Event] = {}  # (study name, worker key) -> its thread's stop event
_HEARTBEATS_LOCK = threading.Lock()


def _start_heartbeat(study: optuna.Study, key: str) -> None:
    with _HEARTBEATS_LOCK:
        if (study.study_name, key) in _HEARTBEATS:
            return
        stop = _HEARTBEATS[(study.study_name, key)] = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a lost connection: the next beat tries again (pool_pre_ping)
                study.set_user_attr(key, time.time())

    threading.Thread(target=beat, name=f"muonprof-heartbeat:{study.study_name}", daemon=True).start()


def stop_heartbeats() -> None:
    """Stop this process's heartbeat threads (they are daemons and end with the process anyway)."""
    with _HEARTBEATS_LOCK:
        for stop in _HEARTBEATS.values():
            stop.set()
        _HEARTBEATS.clear()


def worker_heartbeats(study: optuna.Study) -> dict[str, float]:
    """``HOST:PID`` -> the last time that worker said it was alive, for the workers that keep a heartbeat."""
    out: dict[str, float] = {}
    for key, value in study.user_attrs.items():
        if key.startswith(WORKER_ATTR) and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key[len(WORKER_ATTR) :]] = float(value)
    return out


def _silent(heartbeats: Mapping[str, float] | None, host: str, pid: int | str) -> bool:
    """Another host's worker known to be dead: it keeps a heartbeat and missed it for ``HEARTBEAT_GRACE_S``. A
    worker without one (an older muonprof, or a file storage) cannot be checked and counts as live."""
    last = None if heartbeats is None else heartbeats.get(f"{host}:{pid}")
    return last is not None and time.time() - last > HEARTBEAT_GRACE_S


def _no_other_live_worker(study: optuna.Study) -> bool:
    """Every process registered with ``study`` but this one is dead: a dead pid of this host, or another host's
    worker whose heartbeat has gone silent (one without a heartbeat cannot be checked: it counts as live)."""
    host = socket.gethostname()
    beats = worker_heartbeats(study)
    for key in study.user_attrs:
        if key.startswith(WORKER_ATTR):
            their_host, _, pid = key[len(WORKER_ATTR) :].rpartition(":")
            if their_host != host:
                if not _silent(beats, their_host, pid):
                    return False
            elif int(pid) != os.getpid() and _alive(int(pid)):
                return False
    return True


def _ownerless(trial: optuna.trial.FrozenTrial) -> bool:
    return "host" not in trial.user_attrs or "pid" not in trial.user_attrs  # (claim() writes one after the other)


def is_stale(
    trial: optuna.trial.FrozenTrial, *, owners_gone: bool = False, heartbeats: Mapping[str, float] | None = None
) -> bool:
    """A RUNNING trial whose process is gone: on this host with a dead pid (or our own pid: this process runs
    trials one at a time, so a RUNNING trial of ours is a leftover of an earlier, interrupted call), or without an
    owner when ``owners_gone`` (no other registered worker is alive, see ``register_worker``) or long after
    it started. Another host's trial is stale only when its worker's heartbeat (``heartbeats``, see
    ``worker_heartbeats``) has been silent for ``HEARTBEAT_GRACE_S``; without one it counts as live."""
    attrs = trial.user_attrs
    if _ownerless(trial):
        start = trial.datetime_start
        return owners_gone or (start is not None and datetime.now() - start > timedelta(seconds=OWNERLESS_GRACE_S))
    if attrs["host"] != socket.gethostname():
        return _silent(heartbeats, attrs["host"], attrs["pid"])
    pid = int(attrs["pid"])
    return pid == os.getpid() or not _alive(pid)


def stale_trials(
    study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial] | None = None
) -> list[optuna.trial.FrozenTrial]:
    """The stale RUNNING trials among ``trials`` (default: the study's), see ``is_stale``."""
    pool = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if trials is None else trials
    running = [t for t in pool if t.state == TrialState.RUNNING]
    gone = any(_ownerless(t) for t in running) and _no_other_live_worker(study)
    host = socket.gethostname()
    elsewhere = any(not _ownerless(t) and t.user_attrs["host"] != host for t in running)
    beats = worker_heartbeats(study) if elsewhere else None  # (one more read only when another host runs trials)
    return [t for t in running if is_stale(t, owners_gone=gone, heartbeats=beats)]


def fail_stale(study: optuna.Study) -> int:
    """Mark the stale RUNNING trials (see ``is_stale``) FAIL, so their work is done again; returns how many."""
    failed = 0
    for t in stale_trials(study):
        with contextlib.suppress(RuntimeError, ValueError):  # another worker failed it first
            study.tell(t.number, state=TrialState.FAIL)
            failed += 1
    return failed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _counted(t: optuna.trial.FrozenTrial) -> bool:
    return t.state in TAKEN and "seed" not in t.user_attrs and "surplus" not in t.user_attrs


def run_until(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    total: int,
    *,
    on_trial: TrialCallback | None = None,
    poll_s: float = 0.5,
) -> int:
    """Run trials until the study holds ``total`` of them (finished, running or queued, whoever runs them:
    seeds excluded), wait for the ones other live workers are still running, and return how many this call ran.

    The budget is checked again after each ``ask``: a trial that finds ``total`` trials numbered before it
    (another worker asked in between) is given back at once as FAIL with the ``surplus`` attribute and never
    evaluated, so two workers together run exactly ``total``. An exception in the objective (Ctrl-C included)
    marks its trial FAIL and propagates: the next run does that trial again."""
    ran = 0
    register_worker(study)
    trials = study.get_trials(deepcopy=False)
    if sum(t.state == TrialState.RUNNING for t in trials) > len(stale_trials(study, trials)):
        # Another worker is at it: draw other parameters than its sampler, seeded alike, is drawing.
        study.sampler.reseed_rng()
    while True:
        trials = study.get_trials(deepcopy=False)
        if stale_trials(study, trials):
            fail_stale(study)
            continue
        counted = sum(1 for t in trials if _counted(t))
        if counted >= total and not any(t.state == TrialState.WAITING for t in trials):
            # (a queued trial, e.g. stage 2's default given back by Ctrl-C, still runs.) The others' running
            # trials count until they end; one whose worker died meanwhile is failed there: run its share.
            wait_for_others(study, poll_s=poll_s)
            if sum(1 for t in study.get_trials(deepcopy=False) if _counted(t)) >= total:
                break
            continue
        trial = study.ask()
        claim(trial)
        # Trials numbered before ours: the snapshot's, plus those other workers asked since (each counted,
        # an upper bound); only when that reaches the budget is it worth reading the study again.
        if counted + trial.number - len(trials) >= total and (
            sum(1 for t in study.get_trials(deepcopy=False) if t.number < trial.number and _counted(t)) >= total
        ):
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            continue
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            frozen = study.tell(trial, state=TrialState.PRUNED)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            frozen = study.tell(trial, value)
        ran += 1
        if on_trial is not None:
            on_trial(study, frozen)
    return ran


def wait_for_others(study: optuna.Study, *, poll_s: float = 0.5) -> None:
    """Block while live workers run trials of this study: the result is then read from the same trials by all."""
    while True:
        fail_stale(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        time.sleep(poll_s)


def ensure_enqueued(study: optuna.Study, params: Mapping[str, Any], marker: str) -> bool:
    """Queue a trial of ``params`` (user attribute ``marker``) unless one is queued, running or finished:
    the way a trial that was lost to Ctrl-C (FAIL) or SIGKILL (stale RUNNING) comes back. True when queued."""
    fail_stale(study)
    for t in study.get_trials(deepcopy=False, states=TAKEN):
        if t.user_attrs.get(marker):
            return False
    study.enqueue_trial(dict(params), user_attrs={marker: True}, skip_if_exists=False)
    return True
