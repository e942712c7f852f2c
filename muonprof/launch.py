"""Run a function as N ranks of a torch.distributed job on this machine, torchrun-style, and supervise them.

``launch(target, args, nproc=N, device=...)`` starts N worker processes (multiprocessing's ``spawn`` start
method: fresh interpreters, no fork of a process that holds threads or a CUDA context) with the environment
torchrun gives its workers (MASTER_ADDR=127.0.0.1, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE), initializes the default process group in each (gloo on CPU; nccl on CUDA with rank r on
cuda:r) and calls ``target(ctx, *args)``. It returns rank 0's return value.

Why processes started here rather than ``torchrun`` or ``python -m`` subprocesses: the parent must drive
the progress bar and get rank 0's result object back, which multiprocessing's queue gives for free; and
the parent stays in charge of the workers' lifetime. As torchrun's agent does, the parent hosts the
rendezvous TCPStore itself (``TORCHELASTIC_USE_AGENT_STORE``) on a port the OS picks, so there is no race
for a "free" port between choosing it and binding it.

Supervision, so that a failed or interrupted run never leaves processes behind or hangs. The workers are
``torch.multiprocessing.start_processes(..., join=False)``; its ``ProcessContext.join`` notices the first
worker to exit non-zero and stops the others (a grace period, SIGTERM, SIGKILL). What is added here:

- one line per failure: a worker that raises sends a one-line message (``WorkerExit`` carries the message
  and exit code the target chose; anything else becomes ``rank R: Type: message`` with the traceback kept in
  the worker's log) before it exits; a worker that dies without a word (killed, segfault, ``os._exit``) is
  named by its exit status, and it, not the peers that lost their connection to it, is the cause. The
  parent raises ``LaunchError`` with that line and the exit code;
- Ctrl-C: workers start with SIGINT ignored, so Ctrl-C reaches the parent only (KeyboardInterrupt), which
  terminates them (SIGTERM, then SIGKILL after a grace period) and re-raises; on Linux every worker also asks
  the kernel to SIGKILL it should the parent die (PR_SET_PDEATHSIG; torch's own request is SIGINT, which
  these workers ignore);
- rank 0's return value and ``ctx.send`` messages reach the parent over a queue (the library returns none);
- a worker's stdout and stderr go to one log file (C++ warnings from gloo/NCCL included), not the console;
  the log directory is removed unless a worker failed unexpectedly, in which case the error names it.

Not ``torch.distributed.elastic.multiprocessing``: its context installs process-wide SIGINT/SIGTERM handlers
that raise its own ``SignalException`` instead of KeyboardInterrupt, logs each failure on the console, and
writes stdout and stderr to two truncated files per rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

MASTER_ADDR = "127.0.0.1"
CPU_LIMIT_FLOOR = 2  # CPU ranks allowed even on a one-core machine (slow, but it works)
GRACE_S = 3.0  # after SIGTERM, before SIGKILL
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class LaunchError(RuntimeError):
    """A worker failed (one-line ``message``) or the launch cannot start; ``code`` is the exit status to use."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class WorkerExit(Exception):
    """Raised by a target to end its worker with this one-line ``message`` and exit ``code`` (no traceback)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class WorkerContext:
    """What a target learns about its place in the job (the process group is initialized already)."""

    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device
    threads: int
    _queue: Any = field(default=None, repr=False)

    def send(self, payload: Any) -> None:
        """Hand ``payload`` (picklable) to the parent's ``on_message`` callback."""
        if self._queue is not None:
            self._queue.put(("message", self.rank, payload))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_rank_limit() -> int:
    return max(CPU_LIMIT_FLOOR, usable_cores())


def threads_per_rank(nproc: int) -> int:
    """torch threads per rank: the usable cores shared out, at least one."""
    return max(1, usable_cores() // nproc)


def check_nproc(nproc: int, device: torch.device) -> str:
    """Refuse an ``nproc`` this machine cannot run (LaunchError, one line); return the backend to use."""
    if nproc < 1:
        raise LaunchError(f"--nproc must be at least 1, got {nproc}", 2)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index not in (None, 0) and nproc > 1:
            raise LaunchError(
                f"--device {device} picks one GPU; with --nproc {nproc} use --device cuda (rank r runs on cuda:r)", 2
            )
        if nproc > count:
            raise LaunchError(
                f"--nproc {nproc} needs {nproc} GPUs (one per rank); {count} visible (--device cpu runs the ranks "
                "on the CPU with gloo)",
                2,
            )
        return "nccl"
    if device.type == "cpu":
        limit = cpu_rank_limit()
        if nproc > limit:
            raise LaunchError(
                f"--nproc {nproc} is more CPU ranks than this machine has cores for (at most {limit} here)", 2
            )
        return "gloo"
    raise LaunchError(f"--nproc {nproc}: multi-process runs need --device cpu or cuda, not {device.type}", 2)


@dataclass
class _Spec:
    target: Callable[..., Any]
    args: tuple[Any, ...]
    nproc: int
    backend: str
    device_type: str
    threads: int
    env: dict[str, str]
    log_dir: str
    queue: Any
    parent_pid: int


def launch(
    target: Callable[..., Any],
    args: tuple[Any, ...] = (),
    *,
    nproc: int,
    device: torch.device | str = "cpu",
    on_message: Callable[[Any], None] | None = None,
    timeout_s: float | None = None,
) -> Any:
    """Run ``target(ctx, *args)`` on ``nproc`` ranks; return rank 0's return value.

    ``target`` must be importable by name (a module-level function) and ``args`` picklable. Messages a
    worker sends with ``ctx.send`` reach ``on_message`` in this process, in order. Raises LaunchError
    (one line, with an exit code) when the launch is refused or a worker fails, and re-raises
    KeyboardInterrupt after stopping the workers; ``timeout_s`` (for tests) turns a run longer than that
    into a LaunchError. No worker outlives this call.
    """
    import multiprocessing as mp

    import torch.distributed as dist
    import torch.multiprocessing as torch_mp

    device = torch.device(device)
    backend = check_nproc(nproc, device)
    if not dist.is_available():
        raise LaunchError("this torch build has no torch.distributed", 2)
    messages = mp.get_context("spawn").Queue()  # the context start_processes uses: the queue travels to the workers
    store = dist.TCPStore(MASTER_ADDR, 0, is_master=True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
    log_dir = tempfile.mkdtemp(prefix="muonprof-launch-")
    env = {
        "MASTER_ADDR": MASTER_ADDR,
        "MASTER_PORT": str(store.port),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": "0",
        "TORCHELASTIC_USE_AGENT_STORE": "True",  # connect to the store hosted here, as under torchrun
    }
    spec = _Spec(target, args, nproc, backend, device.type, threads_per_rank(nproc), env, log_dir, messages,
                 os.getpid())  # fmt: skip
    procs: list[Any] = []
    keep_logs = False
    try:
        with _sigint_ignored():  # inherited across exec: the workers never see Ctrl-C
            context = torch_mp.start_processes(_worker_main, (spec,), nprocs=nproc, join=False, daemon=True,
                                               start_method="spawn")  # fmt: skip
        procs = context.processes
        return _supervise(context, messages, on_message, log_dir, timeout_s)
    except _Failed as failed:
        keep_logs = failed.keep_logs
        raise LaunchError(failed.message, failed.code) from None
    finally:
        _stop(procs)
        messages.close()
        messages.cancel_join_thread()
        del store
        if not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)


@dataclass
class _Reports:
    """What the workers said: rank 0's result, each rank's one-line error in order of arrival."""

    on_message: Callable[[Any], None] | None
    finished: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, tuple[str, int, bool]] = field(default_factory=dict)  # rank -> (line, code, unexpected)

    def relay(self, messages: Any, wait_s: float) -> None:
        """Take everything queued, waiting up to ``wait_s`` for the first item (the loop's only sleep)."""
        block = wait_s > 0
        while True:
            try:
                kind, rank, *payload = messages.get(block, wait_s if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "message":
                if self.on_message is not None:
                    self.on_message(payload[0])
            elif kind == "done":
                self.finished[rank] = payload[0]
            else:
                self.errors.setdefault(rank, tuple(payload))  # type: ignore[arg-type]


def _supervise(
    context: Any, messages: Any, on_message: Callable[[Any], None] | None, log_dir: str, timeout_s: float | None
) -> Any:
    """Relay messages until every worker has exited (-> rank 0's result) or one failed (-> _Failed).

    ``ProcessContext.join`` notices the first worker to exit non-zero, lets the others end on their own for
    GRACE_S (a peer blocked in a collective with the dead one usually errors out), then SIGTERMs and at last
    SIGKILLs them; a worker's report reaches the queue before its exit does, so after the join the reports
    are complete and the cause can be chosen from them.
    """
    from torch.multiprocessing.spawn import ProcessException

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    reports = _Reports(on_message)
    while True:
        reports.relay(messages, wait_s=0.05)
        try:
            with _quiet("torch.multiprocessing.spawn"):  # its "Terminating process ..." warnings: the cause says it
                all_exited = context.join(timeout=0, grace_period=GRACE_S)
        except ProcessException as failure:
            reports.relay(messages, wait_s=0)
            raise _cause(failure.error_index, context.processes, reports.errors, log_dir) from None
        if all_exited:
            reports.relay(messages, wait_s=0)
            if 0 not in reports.finished:  # a target that ended its process itself, with status 0
                raise _Failed(f"worker rank 0 exited without a result{_log_note(0, log_dir)}", 1, keep_logs=True)
            return reports.finished[0]
        if deadline is not None and time.monotonic() > deadline:
            raise LaunchError(
                f"the {len(context.processes)} workers did not finish within {timeout_s:g} s (stopped them)"
            )


def _cause(first: int, procs: list[Any], errors: dict[int, tuple[str, int, bool]], log_dir: str) -> _Failed:
    """The one line for a failed run: a worker that died without a word, else the first one that reported.

    A rank that died silently (killed, ``os._exit``, segfault) is the cause, and its peers' errors (typically
    "connection reset by peer" from gloo) the consequence, even when both exits are seen in the same poll.
    SIGTERM exits are the ones ``ProcessContext.join`` sent while stopping the others, so they are not causes.
    """
    silent = [r for r, p in enumerate(procs) if r not in errors and p.exitcode not in (None, 0, -signal.SIGTERM)]
    if silent:
        rank = first if first in silent else silent[0]
        return _Failed(_death(rank, procs[rank].exitcode, log_dir), 1, keep_logs=True)
    if errors:
        rank = next(iter(errors))  # the first to report (queue order)
        message, code, unexpected = errors[rank]
        return _Failed(message + (_log_note(rank, log_dir) if unexpected else ""), code, keep_logs=unexpected)
    return _Failed(_death(first, procs[first].exitcode, log_dir), 1, keep_logs=True)


def _death(rank: int, exitcode: int, log_dir: str) -> str:
    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"worker rank {rank} {how}{_log_note(rank, log_dir)}"


def _log_note(rank: int, log_dir: str) -> str:
    return f" (worker log: {os.path.join(log_dir, f'rank{rank}.log')})"


class _Failed(LaunchError):
    def __init__(self, message: str, code: int, *, keep_logs: bool) -> None:
        super().__init__(message, code)
        self.keep_logs = keep_logs


def _stop(procs: list[Any]) -> None:
    """Terminate every live worker (SIGTERM, then SIGKILL after GRACE_S) and reap them all.

    For Ctrl-C, a timeout or a failing ``on_message``: ``ProcessContext`` stops the others only when a worker
    fails, and has no call for stopping them otherwise.
    """
    for p in procs:
        if p.exitcode is None:
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            with contextlib.suppress(OSError):
                p.kill()
            p.join(5.0)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Drop a library logger's warnings for the block (the console gets one line per failure, ours)."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


# ----------------------------------------------------------------------------------------------- worker


def _worker_main(rank: int, spec: _Spec) -> None:
    """A worker's whole life: environment, logs, process group, the target, one report to the parent.

    Called by ``torch.multiprocessing``'s wrapper as ``fn(rank, *args)``. It reports every outcome itself
    (the wrapper's error file carries only a traceback, not the one line and exit code a target chose) and
    ends with ``os._exit``, so the wrapper's own handling never runs.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(spec.parent_pid)
    _redirect_output(os.path.join(spec.log_dir, f"rank{rank}.log"))
    os.environ.update(spec.env, RANK=str(rank), LOCAL_RANK=str(rank))
    code = 0
    try:
        import torch.distributed as dist

        torch.set_num_threads(spec.threads)
        if spec.device_type == "cuda":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(spec.backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
        ctx = WorkerContext(rank, rank, spec.nproc, spec.backend, device, spec.threads, spec.queue)
        value = spec.target(ctx, *spec.args)
        spec.queue.put(("done", rank, value if rank == 0 else None))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    except WorkerExit as stop:
        code = stop.code or 1
        spec.queue.put(("error", rank, stop.message, code, False))
    except BaseException as err:  # anything else: one line to the parent, the traceback to the log
        traceback.print_exc()
        code = 1
        text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        spec.queue.put(("error", rank, f"rank {rank}: {type(err).__name__}: {text}".rstrip(": "), code, True))
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        spec.queue.close()
        spec.queue.join_thread()  # the message is in the pipe before this process is seen to exit
    os._exit(code)  # no interpreter teardown: nothing left to run, and it must not block on a dead peer


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this worker when the parent dies (Linux; a no-op elsewhere).

    torch's wrapper asks for SIGINT, which these workers ignore, so ask again for SIGKILL.
    """
    from torch.multiprocessing import _prctl_pr_set_pdeathsig

    _prctl_pr_set_pdeathsig(int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _redirect_output(path: str) -> None:
    """Both streams, Python's and C++'s (gloo, NCCL), into one per-rank log.

    Not ``torch.distributed.elastic.multiprocessing.redirects``: it opens a file per stream with truncation,
    so stdout and stderr could not share the one file whose name the error line gives.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


__all__ = [
    "LaunchError",
    "WorkerContext",
    "WorkerExit",
    "check_nproc",
    "cpu_rank_limit",
    "launch",
    "threads_per_rank",
]
