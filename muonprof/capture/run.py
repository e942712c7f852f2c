"""Train a model for real and record, at chosen steps, the spectra of every weight matrix's G and M.

M is what Muon orthogonalizes: the Nesterov combination ``lerp(G, B, mu)`` of the gradient and the
updated momentum buffer ``B <- lerp(B, G, 1 - mu)``. For layers that ProfiledMuon updates with Muon it is
computed from the optimizer's own buffer; for the others (embeddings, the head, or everything under
``optimizer="adamw"``) a shadow buffer with the same recurrence is kept, so the spectra say what Muon would
see on that layer in this very run.

``capture_spectra`` owns the training loop (built-in data, the optimizer, the burn-in, the metadata); the
recording itself is a ``SpectrumRecorder`` called once per step, the same one a user attaches to their own
loop, so both give the same artifact. Capture stays off the training step except at the capture steps: the
shadow buffers are one fused lerp per step; the singular values are computed only at capture steps, batched
over same-shape matrices (``torch.linalg.svdvals`` on a stack: one LAPACK/cuSOLVER call per shape).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from .._version import __version__
from ..interrupts import raise_if_interrupted
from ..lr_rules import matrix_shape
from ..optim import ProfiledMuon
from ..optim.routing import route_module
from ..profile import fingerprint
from ..workload import Workload
from .artifact import Spectra
from .recorder import SpectrumRecorder, _device_meta, _sync
from .recorder import batched_svdvals as batched_svdvals  # its home before the recorder took the capture
from .window import MAX_WINDOW, WINDOW_BYTES

MUON_LR = 0.02
ADAMW_LR = 1e-3
# Burn-in before the first capture: measured with tests/benchmarks/bench_spectra_drift.py (RESULTS.md: past
# the early low-rank transient, ~20-40 steps, on gpt2-tiny, llama-20m and vit-tiny; the strict 10% rule says ~120).
DEFAULT_WARMUP_STEPS = 50


class CaptureError(RuntimeError):
    """Training could not go on (a non-finite loss), or the model has nothing to capture."""


@dataclass
class CaptureTimings:
    train_s: float = 0.0
    capture_s: float = 0.0

    def to_dict(self, steps: int, captures: int) -> dict[str, float]:
        return {
            "train_s": round(self.train_s, 4),
            "capture_s": round(self.capture_s, 4),
            "train_per_step_s": round(self.train_s / max(steps, 1), 4),
            "capture_per_capture_s": round(self.capture_s / max(captures, 1), 4),
        }


def capture_steps(steps: int, every: int) -> list[int]:
    """The 1-based steps to capture: the first, every ``every``-th and the last."""
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if every < 1:
        raise ValueError(f"--every must be at least 1, got {every}")
    return sorted({1, steps, *range(every, steps + 1, every)})


def spread_steps(steps: int, count: int) -> list[int]:
    """``count`` 1-based steps spread evenly over 1..``steps``, first and last included (1: the last)."""
    if count < 1:
        raise ValueError(f"--captures must be at least 1, got {count}")
    if count > steps:
        raise ValueError(f"--captures {count} is more than the {steps} capture steps (--steps)")
    if count == 1:
        return [steps]
    return sorted({1 + round(i * (steps - 1) / (count - 1)) for i in range(count)})


def plan_captures(steps: int, every: int, *, warmup_steps: int = 0, captures: int | None = None) -> list[int]:
    """Absolute training steps to capture at: after ``warmup_steps`` of burn-in, ``capture_steps`` (or,
    with ``captures`` K, K steps spread evenly) over the next ``steps`` steps. Raises ValueError."""
    if warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be at least 0, got {warmup_steps}")
    relative = capture_steps(steps, every) if captures is None else spread_steps(steps, captures)
    return [warmup_steps + s for s in relative]


def check_window(window: int, steps: int, byte_cap: int = WINDOW_BYTES) -> None:
    """A window of ``window`` consecutive gradients must fit in the ``steps`` post-burn-in steps."""
    if window < 0:
        raise ValueError(f"--window must be at least 0, got {window}")
    if window > steps:
        raise ValueError(f"--window {window} is longer than the capture run (--steps {steps}, after the burn-in)")
    if window > MAX_WINDOW:
        raise ValueError(f"--window {window} is more than {MAX_WINDOW} gradients (the window is kept in memory)")
    if byte_cap < 0:
        raise ValueError(f"the window byte cap must be at least 0, got {byte_cap}")


def matrix_parameters(workload: Workload) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters with a matrix view of at least 2 x 2 (1-D gains and (1, n) tokens have no spectrum)."""
    return [
        (name, p)
        for name, p in workload.model.named_parameters()
        if p.requires_grad and p.ndim >= 2 and min(matrix_shape(tuple(p.shape))) >= 2
    ]


def capture_spectra(
    workload: Workload,
    *,
    steps: int,
    every: int,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    captures: int | None = None,
    window: int = 0,
    window_bytes: int = WINDOW_BYTES,
    optimizer: str = "muon",
    lr: float | None = None,
    momentum: float = 0.95,
    seed: int = 0,
    save_matrices: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    command: str | None = None,
) -> Spectra:
    """Train ``warmup_steps + steps`` steps; capture spectra only in the last ``steps`` (after the burn-in).

    Why a burn-in: the first steps' gradients are far lower-rank than later ones, and a recipe scored on
    them looks better than it is for the run it will be used in. Capture steps are absolute (step 1 is
    the first training step), planned by ``plan_captures`` (``captures`` K spread evenly, else every
    ``every``-th). ``window`` T > 0 also keeps the raw gradients of the last T steps and each Muon layer's
    momentum buffer before them (``Spectra.window``), within ``window_bytes`` (see ``_window_layers``).
    ``on_step(step, loss)`` is called after every step, burn-in included (progress bars: the total is
    ``warmup_steps + steps``); ``command`` goes into the metadata. Raises ValueError on bad arguments and
    CaptureError on a non-finite loss (nothing is returned, so nothing half-done gets written).
    """
    when = plan_captures(steps, every, warmup_steps=warmup_steps, captures=captures)
    check_window(window, steps, window_bytes)
    total = warmup_steps + steps
    model = workload.model
    named = matrix_parameters(workload)
    if not named:
        raise CaptureError(f"model {workload.spec!r} has no matrix parameters to capture (only vectors/scalars)")
    device = next(iter(named))[1].device
    opt, routes, base_lr = _build_optimizer(model, optimizer, lr, momentum, seed)
    # Every matrix (layers="all"), M from this run's momentum; the window over the Muon-routed layers.
    recorder = SpectrumRecorder(
        model,
        opt,
        capture_steps=when,
        momentum=momentum,
        window=window,
        total_steps=total,
        window_bytes=window_bytes,
        layers="all",
        keep_matrices_at=total if save_matrices else None,
    )

    timings = CaptureTimings()
    model.train()
    for step in range(1, total + 1):
        raise_if_interrupted()
        start, capture_before = time.perf_counter(), recorder.capture_s
        opt.zero_grad(set_to_none=True)
        loss = workload.loss(workload.train_batch(step - 1))
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise CaptureError(f"the training loss became {value} at step {step}; try a lower --lr")
        recorder.record(step, value)  # before opt.step(): G and B_{t-1} as the optimizer is about to use them
        opt.step()
        _sync(device)
        timings.train_s += time.perf_counter() - start - (recorder.capture_s - capture_before)
        if on_step is not None:
            on_step(step, value)
    timings.capture_s = recorder.capture_s

    meta = {
        "model": workload.describe(),
        "fingerprint": fingerprint((n, p.shape) for n, p in model.named_parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "warmup_steps": warmup_steps,
        "total_steps": total,
        "every": every,
        "captures": captures,
        "capture_steps": when,
        "seed": seed,
        "optimizer": {"name": optimizer, "lr": base_lr, "momentum": momentum, "nesterov": True},
        "device": _device_meta(device),
        "versions": {"muonprof": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "timings": timings.to_dict(total, len(recorder.records)),
        "routes": {name: reason for name, (_, reason) in route_module(model).items()},
    }
    return Spectra(
        meta=meta,
        # Labelled with this run's optimizer (all "adamw" under optimizer="adamw"), not the routes ProfiledMuon
        # would give them as the recorder labels another optimizer's layers: bench prices the "muon" ones.
        layers=[dataclasses.replace(layer, optimizer=routes.get(layer.name, "adamw")) for layer in recorder.layers],
        captures=recorder.records,
        losses=recorder.losses,
        matrices=recorder.matrices,
        matrices_step=recorder.matrices_step,
        window=recorder.window.result() if recorder.window is not None else None,
    )


def _build_optimizer(
    model: torch.nn.Module, optimizer: str, lr: float | None, momentum: float, seed: int
) -> tuple[torch.optim.Optimizer, dict[str, str], float]:
    """The optimizer the capture run trains with, each parameter's route under it, and the lr used."""
    if optimizer == "muon":
        base_lr = MUON_LR if lr is None else lr
        opt = ProfiledMuon(model, lr=base_lr, momentum=momentum, seed=seed)
        return opt, {name: plan.optimizer for name, plan in opt.plans.items()}, base_lr
    if optimizer == "adamw":
        base_lr = ADAMW_LR if lr is None else lr
        trainable = [p for p in model.parameters() if p.requires_grad]
        adamw = torch.optim.AdamW(trainable, lr=base_lr, betas=(0.9, 0.95), weight_decay=0.0)
        return adamw, {name: "adamw" for name, _ in model.named_parameters()}, base_lr
    raise ValueError(f"--optimizer must be muon or adamw, got {optimizer!r}")
