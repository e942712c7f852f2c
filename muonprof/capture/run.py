"""Train a model for real and record, at chosen steps, the spectra of every weight matrix's G and M.

M is what Muon orthogonalizes: the Nesterov combination ``lerp(G, B, mu)`` of the gradient and the
updated momentum buffer ``B <- lerp(B, G, 1 - mu)``. For layers that ProfiledMuon updates with Muon it is
read from the optimizer's own buffer; for the others (embeddings, the head, or everything under
``optimizer="adamw"``) a shadow buffer with the same recurrence is kept, so the spectra say what Muon would
see on that layer in this very run.

Capture stays off the training step except at the capture steps: the shadow buffers are one fused lerp
per step; the singular values are computed only at capture steps, batched over same-shape matrices
(``torch.linalg.svdvals`` on a stack: one LAPACK/cuSOLVER call per shape instead of one per layer).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch
from torch import Tensor

from .._version import __version__
from ..interrupts import raise_if_interrupted
from ..lr_rules import matrix_shape
from ..optim import ProfiledMuon
from ..optim.routing import route_module
from ..profile import fingerprint
from ..roles import classify_roles
from ..workload import Workload
from .artifact import CaptureRecord, LayerRecord, Spectra
from .window import MAX_WINDOW, WINDOW_BYTES, WindowRecorder

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


def batched_svdvals(matrices: list[Tensor]) -> list[Tensor]:
    """Singular values (descending, float32, on CPU) of each matrix; one batched call per distinct shape."""
    out: list[Tensor | None] = [None] * len(matrices)
    by_shape: dict[tuple[tuple[int, ...], torch.device], list[int]] = defaultdict(list)
    for i, m in enumerate(matrices):
        by_shape[(tuple(m.shape), m.device)].append(i)
    for indices in by_shape.values():
        stack = torch.stack([matrices[i].float() for i in indices])
        if stack.shape[-2] < stack.shape[-1]:
            stack = stack.mT  # LAPACK's tall path (QR first) is the fast one; the values are the same
        values = torch.linalg.svdvals(stack).cpu()
        for row, i in enumerate(indices):
            out[i] = values[row]
    return [v for v in out if v is not None]


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
    roles = classify_roles(model)
    opt, routes, base_lr = _build_optimizer(model, optimizer, lr, momentum, seed)
    layers = [
        LayerRecord(
            name=name,
            shape=tuple(p.shape),
            matrix_shape=matrix_shape(tuple(p.shape)),
            role=roles.get(name, "linear"),
            optimizer=routes.get(name, "adamw"),
        )
        for name, p in named
    ]
    # Shadow momentum for the matrices Muon does not update in this run (see the module docstring).
    shadow = {name: torch.zeros_like(p) for name, p in named if routes.get(name) != "muon"}
    shadow_params = [p for name, p in named if name in shadow]
    shadow_bufs = list(shadow.values())

    def buffer_of(name: str, p: Tensor) -> Tensor:
        """The momentum buffer B Muon keeps for ``p`` (a Muon layer before its first step has none: 0)."""
        buf = shadow[name] if name in shadow else opt.state.get(p, {}).get("momentum_buffer")
        return buf if buf is not None else torch.zeros_like(p)

    recorder = None
    if window:
        muon_named = [(n, p) for n, p in named if _muon_routed(model, routes, optimizer).get(n)]
        recorder = WindowRecorder(
            [layer for layer in layers if any(n == layer.name for n, _ in muon_named)],
            dict(muon_named),
            start_step=total - window + 1,
            length=window,
            byte_cap=window_bytes,
        )

    timings = CaptureTimings()
    records: list[CaptureRecord] = []
    losses: list[float] = []
    matrices: dict[str, dict[str, Tensor]] | None = None
    model.train()
    for step in range(1, total + 1):
        raise_if_interrupted()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = workload.loss(workload.train_batch(step - 1))
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise CaptureError(f"the training loss became {value} at step {step}; try a lower --lr")
        if recorder is not None:
            recorder.record(step, buffer_of)  # before opt.step(): the buffer is still the previous step's
        opt.step()
        grads_ok = [p for p in shadow_params if p.grad is not None]
        if grads_ok:
            with torch.no_grad():
                torch._foreach_lerp_(
                    [shadow_bufs[i] for i, p in enumerate(shadow_params) if p.grad is not None],
                    [p.grad for p in grads_ok],
                    1 - momentum,
                )
        _sync(device)
        timings.train_s += time.perf_counter() - start
        losses.append(value)

        if step in when:
            start = time.perf_counter()
            record, mats = _capture_once(step, value, named, buffer_of, momentum, keep=save_matrices and step == total)
            records.append(record)
            if mats is not None:
                matrices = mats
            _sync(device)
            timings.capture_s += time.perf_counter() - start
        if on_step is not None:
            on_step(step, value)

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
        "timings": timings.to_dict(total, len(records)),
        "routes": {name: reason for name, (_, reason) in route_module(model).items()},
    }
    return Spectra(
        meta=meta,
        layers=layers,
        captures=records,
        losses=losses,
        matrices=matrices,
        matrices_step=total if matrices is not None else None,
        window=recorder.result() if recorder is not None else None,
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


def _muon_routed(model: torch.nn.Module, routes: dict[str, str], optimizer: str) -> dict[str, bool]:
    """The layers Muon orthogonalizes: this run's routes, or under AdamW the ones ProfiledMuon would route."""
    if optimizer == "muon":
        return {name: route == "muon" for name, route in routes.items()}
    return {name: route == "muon" for name, (route, _) in route_module(model).items()}


def _capture_once(
    step: int,
    loss: float,
    named: list[tuple[str, torch.nn.Parameter]],
    buffer_of: Callable[[str, Tensor], Tensor],
    momentum: float,
    *,
    keep: bool = False,
) -> tuple[CaptureRecord, dict[str, dict[str, Tensor]] | None]:
    """Singular values of every layer's G and M = lerp(G, B, mu) at this step (with ``keep``: G, M too)."""
    grads, moms, names = [], [], []
    with torch.no_grad():
        for name, p in named:
            # An unused parameter's gradient is zero (torch leaves it None): record that truthfully.
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            g = grad.reshape(matrix_shape(tuple(p.shape)))
            m = g.lerp(buffer_of(name, p).reshape(g.shape).to(g.dtype), momentum)
            names.append(name)
            grads.append(g)
            moms.append(m)
        values = batched_svdvals(grads + moms)
    record = CaptureRecord(
        step=step,
        loss=loss,
        grad=dict(zip(names, values[: len(names)])),
        momentum=dict(zip(names, values[len(names) :])),
    )
    if not keep:
        return record, None
    mats = {
        "grad": {n: g.detach().float().cpu().clone() for n, g in zip(names, grads)},
        "momentum": {n: m.detach().float().cpu().clone() for n, m in zip(names, moms)},
    }
    return record, mats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_meta(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return {"type": device.type, "name": name, "threads": torch.get_num_threads()}
