"""The plain training loop every command that trains for a verdict shares (validate; tune's lr trials).

``train(workload, optimizer, steps=...)`` runs zero_grad / loss / backward / step and measures, per step:

- the training loss (read before ``optimizer.step()``, so a NaN/Inf loss stops the run *before* the bad
  gradient is applied; the run is marked ``diverged_at = step`` and returned, not raised);
- the step's wall time (batch, forward, backward and optimizer step) and, separately, the time of
  ``optimizer.step()`` alone. On CUDA the device is synchronized before each clock read, so the times are
  the device's; on CPU the work is synchronous already.

Wall times are *training* time only: evaluation runs between steps and its time is left out of the
cumulative ``wall_s``, so an equal-wall-clock comparison compares optimizers, not evaluation schedules.
Validation loss (the mean over ``workload.val_batches()``, under ``no_grad`` and ``model.eval()``) is taken
before the first step (step 0: every contender starts from the same point), every ``eval_every`` steps and
after the last step. ``on_eval(step, val_loss)`` may raise to stop the run (Optuna's ``TrialPruned``):
the exception propagates to the caller unchanged.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset at the start of the run). On CPU the
process's peak resident set size: on Linux the high-water mark ``VmHWM`` is reset at the start of the run
(``/proc/self/clear_refs``), so it is this run's peak, but of the *whole process* (Python, torch, the data)
not only the model and optimizer; elsewhere ``resource.getrusage().ru_maxrss``, the process-wide peak since
it started, which never goes down (later runs in one process report at least the earlier runs' peak).
``TrainResult.peak_memory_kind`` says which one a number is.

Optimizers that need a closure (``getattr(optimizer, "needs_closure", False)``, e.g. ProfiledMuon with a
``momentum: "storm"`` layer, which takes two gradients per step) are stepped with ``optimizer.step(closure)``:
the closure zeroes the grads, recomputes the loss on the step's batch (fetched once), calls ``backward()`` and
returns the loss, with the CPU (and CUDA) RNG state restored to the same point on every call, so dropout
draws the same masks. The recorded training loss is what ``step(closure)`` returns (torch's convention: the
loss at the parameters before the update), or the last call's if it returns None; a NaN/Inf loss in any call
stops the step before the update. ``grad_evals`` counts the forward/backward passes actually made (closure
calls; one per step otherwise), cumulative per step like ``wall_s``, so losses can be compared per gradient
evaluation as well as per step; ``optimizer_step_s`` then excludes the time spent inside the closure.

Distributed data parallel: with ``sync=RankSync(...)`` every rank of the process group runs the same loop
on its shard of each batch; the recorded training loss is the mean over the ranks (so every rank takes the
same divergence decision), evaluation is split over the ranks (rank r takes val batches r, r+N, ...) and
summed, and the time budget is judged on the slowest rank's clock. Times and memory are this rank's.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .interrupts import raise_if_interrupted
from .workload import Workload

StopReason = str  # "steps" | "time_budget" | "diverged"


@dataclass
class EvalPoint:
    """Validation loss after ``step`` optimizer steps, at ``wall_s`` seconds of cumulative training time."""

    step: int
    wall_s: float
    val_loss: float | None


@dataclass
class TrainResult:
    """What one training run measured. Lists are per step: index ``i`` is step ``i + 1``."""

    steps_planned: int
    train_losses: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)  # cumulative training time after each step
    step_s: list[float] = field(default_factory=list)
    optimizer_step_s: list[float] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    eval_s: float = 0.0  # total time spent evaluating (not in wall_s)
    peak_memory_bytes: int | None = None
    peak_memory_kind: str = "none"
    state_bytes: int = 0
    diverged_at: int | None = None
    stop_reason: StopReason = "steps"
    grad_evals: list[int] = field(default_factory=list)  # cumulative forward/backward passes after each step

    @property
    def steps_done(self) -> int:
        """Optimizer steps actually applied (a diverged step's update is not applied)."""
        return len(self.optimizer_step_s)

    @property
    def total_wall_s(self) -> float:
        return self.wall_s[-1] if self.wall_s else 0.0

    @property
    def total_grad_evals(self) -> int:
        """Forward/backward passes of the applied steps (2 per step after the first for a storm optimizer)."""
        return self.grad_evals[-1] if self.grad_evals else 0

    @property
    def median_step_s(self) -> float | None:
        return statistics.median(self.step_s) if self.step_s else None

    @property
    def median_optimizer_step_s(self) -> float | None:
        return statistics.median(self.optimizer_step_s) if self.optimizer_step_s else None

    @property
    def final_val_loss(self) -> float | None:
        """The last evaluation's loss (None when the run diverged or has no validation data)."""
        if self.diverged_at is not None or not self.evals:
            return None
        return self.evals[-1].val_loss

    def final_train_loss(self, fraction: float = 0.1) -> float | None:
        """Mean training loss over the last ``fraction`` of the steps run (at least one); None if diverged."""
        if self.diverged_at is not None or not self.train_losses:
            return None
        k = max(1, round(len(self.train_losses) * fraction))
        return sum(self.train_losses[-k:]) / k

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite losses become None)."""
        data = asdict(self)
        data["train_losses"] = [_finite_or_none(v) for v in self.train_losses]
        data["evals"] = [{**asdict(e), "val_loss": _finite_or_none(e.val_loss)} for e in self.evals]
        data.update(
            steps_done=self.steps_done,
            median_step_s=self.median_step_s,
            median_optimizer_step_s=self.median_optimizer_step_s,
            total_grad_evals=self.total_grad_evals,
        )
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainResult:
        known = {
            "steps_planned", "wall_s", "step_s", "optimizer_step_s", "eval_s", "peak_memory_bytes",
            "peak_memory_kind", "state_bytes", "diverged_at", "stop_reason",
        }  # fmt: skip
        result = cls(**{k: v for k, v in data.items() if k in known})
        result.train_losses = [math.nan if v is None else float(v) for v in data.get("train_losses", [])]
        result.evals = [EvalPoint(int(e["step"]), float(e["wall_s"]), e["val_loss"]) for e in data.get("evals", [])]
        # Files written before grad_evals existed: one forward/backward per step was the only way to step.
        result.grad_evals = [int(v) for v in data.get("grad_evals", range(1, len(result.optimizer_step_s) + 1))]
        return result


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (momentum buffers, Adam moments, step counters)."""
    total = 0
    seen: set[int] = set()

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, Tensor):
            if id(value) not in seen:
                seen.add(id(value))
                total += value.nbytes
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(dict(getattr(optimizer, "state", {})))
    return total


class RankSync:
    """Keeps ``train()`` in lockstep over the ranks of a ``torch.distributed`` process group.

    ``group`` None is the default group. The reductions run on a float64 tensor on CUDA for NCCL and on
    the CPU otherwise.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("RankSync needs an initialized torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        nccl = self.backend == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """``values`` summed (``op="sum"``) or maxed (``"max"``) elementwise over the ranks."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)
        return [float(v) for v in t.tolist()]

    def mean(self, value: float) -> float:
        return self.reduce([value])[0] / self.world_size


def evaluate(workload: Workload, batches: list[Any] | None = None, sync: RankSync | None = None) -> float | None:
    """Mean validation loss over ``batches`` (default ``workload.val_batches()``); None when there are none.

    Runs under ``no_grad`` with the model in eval mode and puts the model back in the mode it was in.
    With ``sync`` every rank evaluates its share (batches rank, rank + N, ...) and the per-batch losses
    are summed over the ranks: every rank gets the same mean, the mean over all batches.
    """
    batches = workload.val_batches() if batches is None else batches
    if not batches:
        return None
    if sync is not None:
        batches = batches[sync.rank :: sync.world_size]
    model = workload.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [workload.loss(b).detach().float() for b in batches]
    finally:
        model.train(was_training)
    if sync is None:
        return float(torch.stack(losses).mean())
    total, count = sync.reduce([float(torch.stack(losses).sum()) if losses else 0.0, float(len(losses))])
    return total / count if count else None


class _NonFiniteLoss(Exception):
    """Raised out of a closure to abandon the step before the optimizer applies a NaN/Inf gradient."""

    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


def train(
    workload: Workload,
    optimizer: Any,
    *,
    steps: int,
    eval_every: int,
    eval_at: Collection[int] = (),
    time_budget_s: float | None = None,
    on_eval: Callable[[int, float | None], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sync: RankSync | None = None,
) -> TrainResult:
    """Train ``workload.model`` with ``optimizer`` (anything with ``zero_grad()``, ``step()`` and ``state``).

    Stops after ``steps`` steps, or after the step at which cumulative training time reaches
    ``time_budget_s`` (so a budgeted run overshoots by at most one step), or at a NaN/Inf loss
    (``diverged_at``). Evaluates at step 0, every ``eval_every`` steps, at the steps in ``eval_at`` and after
    the last step.
    ``on_step(step, loss)`` is called after every step; ``on_eval(step, val_loss)`` after every evaluation
    and may raise to stop the run (the exception propagates). ``clock`` is for tests. An optimizer whose
    ``needs_closure`` is true is stepped with a closure (see the module docstring). ``sync``: run as one
    rank of a distributed data-parallel job (every rank must call ``train`` with the same arguments).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be at least 1, got {eval_every}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time budget must be > 0 seconds, got {time_budget_s}")
    model = workload.model
    device = _device_of(model)
    sync_device = _synchronizer(device)
    result = TrainResult(steps_planned=steps)
    result.peak_memory_kind = _reset_peak_memory(device)
    val_batches = workload.val_batches()
    use_closure = bool(getattr(optimizer, "needs_closure", False))

    def run_eval(step: int) -> None:
        t0 = time.perf_counter()  # eval time is bookkeeping only: the injected clock is for training time
        loss = evaluate(workload, val_batches, sync)
        result.eval_s += time.perf_counter() - t0
        if loss is not None and not math.isfinite(loss):
            result.diverged_at = step
            result.stop_reason = "diverged"
        result.evals.append(EvalPoint(step, result.total_wall_s, loss))
        if on_eval is not None:
            on_eval(step, loss)

    def loss_value(loss: Tensor) -> float:
        value = float(loss.detach())  # the sync CUDA needs anyway before reading the clock
        return value if sync is None else sync.mean(value)

    def closure_step(batch: Any) -> tuple[float, float, int]:
        """``optimizer.step(closure)``: (the step's loss, seconds inside the closure, closure calls)."""
        rng = _rng_state(device)
        calls = 0
        inside = 0.0
        last: float | None = None
        last_loss: Tensor | None = None

        def closure() -> Tensor:
            nonlocal calls, inside, last, last_loss
            sync_device()
            c0 = clock()
            _set_rng_state(device, rng)  # the same dropout masks on every call
            with torch.enable_grad():
                optimizer.zero_grad(set_to_none=True)
                loss = workload.loss(batch)
                loss.backward()
            calls += 1
            last, last_loss = loss_value(loss), loss
            sync_device()
            inside += clock() - c0
            if not math.isfinite(last):
                raise _NonFiniteLoss(last)
            return loss

        returned = optimizer.step(closure)
        if returned is not None and returned is last_loss and last is not None:
            value = last  # the last call's loss, read (and averaged over the ranks) already
        elif isinstance(returned, Tensor) and returned.numel() == 1:
            value = loss_value(returned)
        elif isinstance(returned, (int, float)):
            value = float(returned) if sync is None else sync.mean(float(returned))
        elif last is not None:
            value = last
        else:
            raise RuntimeError(f"{type(optimizer).__name__}.step(closure) never called the closure")
        return value, inside, calls

    model.train()
    try:
        run_eval(0)
        step = 0
        while step < steps and result.diverged_at is None:
            raise_if_interrupted()  # a Ctrl-C swallowed in a GC callback still stops the run
            step += 1
            sync_device()
            t0 = clock()
            try:
                if use_closure:
                    batch = workload.train_batch(step - 1)
                    t1 = clock()
                    value, inside, calls = closure_step(batch)
                    sync_device()
                    t2 = clock()
                    optimizer_s = (t2 - t1) - inside
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = workload.loss(workload.train_batch(step - 1))
                    loss.backward()
                    value = loss_value(loss)
                    calls = 1
                    if not math.isfinite(value):
                        raise _NonFiniteLoss(value)
                    sync_device()
                    t1 = clock()
                    optimizer.step()
                    sync_device()
                    t2 = clock()
                    optimizer_s = t2 - t1
            except _NonFiniteLoss as bad:  # stop before the update: the weights stay finite
                result.train_losses.append(bad.value)
                result.diverged_at = step
                result.stop_reason = "diverged"
                optimizer.zero_grad(set_to_none=True)
                break
            result.train_losses.append(value)
            result.step_s.append(t2 - t0)
            result.optimizer_step_s.append(optimizer_s)
            result.wall_s.append(result.total_wall_s + (t2 - t0))
            result.grad_evals.append(result.total_grad_evals + calls)
            if on_step is not None:
                on_step(step, value)
            spent = result.total_wall_s
            if time_budget_s is not None and sync is not None:
                spent = sync.reduce([spent], "max")[0]  # the slowest rank decides, so all stop together
            out_of_time = time_budget_s is not None and spent >= time_budget_s
            if out_of_time and step < steps:
                result.stop_reason = "time_budget"
            if step % eval_every == 0 or step == steps or step in eval_at or out_of_time:
                run_eval(step)
            if out_of_time:
                break
    finally:
        result.peak_memory_bytes = _peak_memory(device, result.peak_memory_kind)
        result.state_bytes = optimizer_state_bytes(optimizer)
    return result


# ---------------------------------------------------------------------------------------------- helpers


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_memory(device: torch.device) -> str:
    """Reset what can be reset and say which peak-memory measure this run reports."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    if sys.platform.startswith("linux"):
        try:
            _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            if _vm_hwm() is not None:
                return "process_peak_rss_this_run"
        except OSError:
            pass
    try:
        import resource  # noqa: F401  (not on Windows)
    except ImportError:
        return "none"
    return "process_peak_rss_since_start"


def _vm_hwm() -> int | None:
    try:
        match = re.search(r"^VmHWM:\s+(\d+)\s*kB", _PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _peak_memory(device: torch.device, kind: str) -> int | None:
    if kind == "cuda_max_allocated":
        return int(torch.cuda.max_memory_allocated(device))
    if kind == "process_peak_rss_this_run":
        return _vm_hwm()
    if kind == "process_peak_rss_since_start":
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux
    return None


__all__ = ["EvalPoint", "RankSync", "TrainResult", "evaluate", "optimizer_state_bytes", "train"]
