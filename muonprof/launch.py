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

Supervision, so that a failed or interrupted run never leaves processes behind or hangs:

- a worker that raises sends a one-line message (``WorkerExit`` carries the message and exit code the
  target chose; anything else becomes ``rank R: Type: message`` with the traceback kept in the worker's
  log) and exits; a worker that dies without a word (killed, segfault, ``os._exit``) is noticed by its
  exit code. Either way the parent terminates the other workers at once (they may be blocked in a
  collective waiting for the dead one) and raises ``LaunchError`` with that one line and the exit code;
- workers start with SIGINT ignored: Ctrl-C reaches the parent (KeyboardInterrupt), which terminates them
  (SIGTERM, then SIGKILL after a grace period) and re-raises; on Linux every worker also asks the kernel
  to SIGKILL it should the parent die (PR_SET_PDEATHSIG);
- a worker's stdout and stderr go to a log file (C++ warnings from gloo/NCCL included), not the console;
  the log directory is removed unless a worker failed unexpectedly, in which case the error names it.
"""

from __future__ import annotations

import contextlib
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
ERROR_WAIT_S = 1.0  # how long a dead worker's error message may lag behind its exit code
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

    device = torch.device(device)
    backend = check_nproc(nproc, device)
    if not dist.is_available():
        raise LaunchError("this torch build has no torch.distributed", 2)
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
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
    spec = _Spec(target, args, nproc, backend, device.type, threads_per_rank(nproc), env, log_dir, messages)
    procs = [ctx.Process(target=_worker_main, args=(rank, spec), name=f"muonprof-rank{rank}", daemon=True)
             for rank in range(nproc)]  # fmt: skip
    keep_logs = False
    try:
        with _sigint_ignored():  # inherited across exec: the workers never see Ctrl-C
            for p in procs:
                p.start()
        return _supervise(procs, messages, on_message, log_dir, timeout_s)
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


def _supervise(
    procs: list[Any], messages: Any, on_message: Callable[[Any], None] | None, log_dir: str, timeout_s: float | None
) -> Any:
    """Relay messages until every worker has finished (-> rank 0's result) or one failed (-> LaunchError)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    finished: dict[int, Any] = {}
    dead_since: dict[int, float] = {}
    while True:
        try:
            kind, rank, *payload = messages.get(timeout=0.05)
        except queue.Empty:
            kind = None
        if kind == "message":
            if on_message is not None:
                on_message(payload[0])
        elif kind == "done":
            finished[rank] = payload[0]
        elif kind == "error":
            message, code, unexpected = payload
            # A peer that died without a word (killed, os._exit, segfault) is the cause, and this rank's
            # error (typically "connection reset by peer" from gloo) the consequence: its socket closed
            # only when it exited, so its exit status is already there to be seen.
            for other, p in enumerate(procs):
                if other != rank and other not in finished and p.exitcode not in (None, 0):
                    raise _Failed(_death(other, p.exitcode, log_dir), 1, keep_logs=True)
            if unexpected:
                message += f" (worker log: {os.path.join(log_dir, f'rank{rank}.log')})"
            raise _Failed(message, code, keep_logs=unexpected)
        if kind is not None:
            continue  # drain everything queued before looking at exit codes
        if len(finished) == len(procs):
            return finished[0]
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if p.exitcode is None or rank in finished:
                continue
            # Exited without its "done" (or before its error message arrived): give the queue a moment.
            if now - dead_since.setdefault(rank, now) > ERROR_WAIT_S:
                raise _Failed(_death(rank, p.exitcode, log_dir), 1, keep_logs=True)
        if deadline is not None and now > deadline:
            raise LaunchError(f"the {len(procs)} workers did not finish within {timeout_s:g} s (stopped them)")


def _death(rank: int, exitcode: int, log_dir: str) -> str:
    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    return f"worker rank {rank} {how} (worker log: {os.path.join(log_dir, f'rank{rank}.log')})"


class _Failed(LaunchError):
    def __init__(self, message: str, code: int, *, keep_logs: bool) -> None:
        super().__init__(message, code)
        self.keep_logs = keep_logs


def _stop(procs: list[Any]) -> None:
    """Terminate every live worker (SIGTERM, then SIGKILL after GRACE_S) and reap them all."""
    for p in procs:
        if p.pid is not None and p.exitcode is None:
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        if p.pid is None:
            continue
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


# ----------------------------------------------------------------------------------------------- worker


def _worker_main(rank: int, spec: _Spec) -> None:
    """A worker's whole life: environment, logs, process group, the target, one report to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
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


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _redirect_output(path: str) -> None:
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
