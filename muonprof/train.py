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
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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

    @property
    def steps_done(self) -> int:
        """Optimizer steps actually applied (a diverged step's update is not applied)."""
        return len(self.optimizer_step_s)

    @property
    def total_wall_s(self) -> float:
        return self.wall_s[-1] if self.wall_s else 0.0

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


def evaluate(workload: Workload, batches: list[Any] | None = None) -> float | None:
    """Mean validation loss over ``batches`` (default ``workload.val_batches()``); None when there are none.

    Runs under ``no_grad`` with the model in eval mode and puts the model back in the mode it was in.
    """
    batches = workload.val_batches() if batches is None else batches
    if not batches:
        return None
    model = workload.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [workload.loss(b).detach().float() for b in batches]
        return float(torch.stack(losses).mean())
    finally:
        model.train(was_training)


def train(
    workload: Workload,
    optimizer: Any,
    *,
    steps: int,
    eval_every: int,
    time_budget_s: float | None = None,
    on_eval: Callable[[int, float | None], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainResult:
    """Train ``workload.model`` with ``optimizer`` (anything with ``zero_grad()``, ``step()`` and ``state``).

    Stops after ``steps`` steps, or after the step at which cumulative training time reaches
    ``time_budget_s`` (so a budgeted run overshoots by at most one step), or at a NaN/Inf loss
    (``diverged_at``). Evaluates at step 0, every ``eval_every`` steps and after the last step.
    ``on_step(step, loss)`` is called after every step; ``on_eval(step, val_loss)`` after every evaluation
    and may raise to stop the run (the exception propagates). ``clock`` is for tests.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be at least 1, got {eval_every}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ValueError(f"time budget must be > 0 seconds, got {time_budget_s}")
    model = workload.model
    device = _device_of(model)
    sync = _synchronizer(device)
    result = TrainResult(steps_planned=steps)
    result.peak_memory_kind = _reset_peak_memory(device)
    val_batches = workload.val_batches()

    def run_eval(step: int) -> None:
        t0 = time.perf_counter()  # eval time is bookkeeping only: the injected clock is for training time
        loss = evaluate(workload, val_batches)
        result.eval_s += time.perf_counter() - t0
        if loss is not None and not math.isfinite(loss):
            result.diverged_at = step
            result.stop_reason = "diverged"
        result.evals.append(EvalPoint(step, result.total_wall_s, loss))
        if on_eval is not None:
            on_eval(step, loss)

    model.train()
    try:
        run_eval(0)
        step = 0
        while step < steps and result.diverged_at is None:
            step += 1
            sync()
            t0 = clock()
            optimizer.zero_grad(set_to_none=True)
            loss = workload.loss(workload.train_batch(step - 1))
            loss.backward()
            value = float(loss.detach())  # the sync CUDA needs anyway before reading the clock
            if not math.isfinite(value):
                result.train_losses.append(value)
                result.diverged_at = step
                result.stop_reason = "diverged"
                optimizer.zero_grad(set_to_none=True)
                break
            sync()
            t1 = clock()
            optimizer.step()
            sync()
            t2 = clock()
            result.train_losses.append(value)
            result.step_s.append(t2 - t0)
            result.optimizer_step_s.append(t2 - t1)
            result.wall_s.append(result.total_wall_s + (t2 - t0))
            if on_step is not None:
                on_step(step, value)
            out_of_time = time_budget_s is not None and result.total_wall_s >= time_budget_s
            if out_of_time and step < steps:
                result.stop_reason = "time_budget"
            if step % eval_every == 0 or step == steps or out_of_time:
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


__all__ = ["EvalPoint", "TrainResult", "evaluate", "optimizer_state_bytes", "train"]
