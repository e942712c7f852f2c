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
from ..lr_rules import matrix_shape
from ..optim import ProfiledMuon
from ..optim.routing import route_module
from ..profile import fingerprint
from ..roles import classify_roles
from ..workload import Workload
from .artifact import CaptureRecord, LayerRecord, Spectra

MUON_LR = 0.02
ADAMW_LR = 1e-3


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
    optimizer: str = "muon",
    lr: float | None = None,
    momentum: float = 0.95,
    seed: int = 0,
    save_matrices: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    command: str | None = None,
) -> Spectra:
    """Train ``workload`` for ``steps`` steps and return the spectra captured at ``capture_steps``.

    ``on_step(step, loss)`` is called after each step (progress bars); ``command`` goes into the metadata.
    Raises CaptureError on a non-finite loss (nothing is returned, so nothing half-done gets written).
    """
    when = set(capture_steps(steps, every))
    model = workload.model
    named = matrix_parameters(workload)
    if not named:
        raise CaptureError(f"model {workload.spec!r} has no matrix parameters to capture (only vectors/scalars)")
    device = next(iter(named))[1].device
    roles = classify_roles(model)
    if optimizer == "muon":
        base_lr = MUON_LR if lr is None else lr
        opt: torch.optim.Optimizer = ProfiledMuon(model, lr=base_lr, momentum=momentum, seed=seed)
        routes = {name: plan.optimizer for name, plan in opt.plans.items()}  # type: ignore[attr-defined]
    elif optimizer == "adamw":
        base_lr = ADAMW_LR if lr is None else lr
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=base_lr, betas=(0.9, 0.95), weight_decay=0.0)
        routes = {name: "adamw" for name, _ in model.named_parameters()}
    else:
        raise ValueError(f"--optimizer must be muon or adamw, got {optimizer!r}")
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

    timings = CaptureTimings()
    captures: list[CaptureRecord] = []
    losses: list[float] = []
    matrices: dict[str, dict[str, Tensor]] | None = None
    model.train()
    for step in range(1, steps + 1):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = workload.loss(workload.train_batch(step - 1))
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise CaptureError(f"the training loss became {value} at step {step}; try a lower --lr")
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
            grads, moms, names = [], [], []
            with torch.no_grad():
                for name, p in named:
                    # An unused parameter's gradient is zero (torch leaves it None): record that truthfully.
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    g = grad.reshape(matrix_shape(tuple(p.shape)))
                    buf = shadow[name] if name in shadow else opt.state.get(p, {}).get("momentum_buffer")
                    if buf is None:  # a Muon layer that has never had a gradient has no buffer yet
                        buf = torch.zeros_like(p)
                    m = g.lerp(buf.reshape(g.shape).to(g.dtype), momentum)
                    names.append(name)
                    grads.append(g)
                    moms.append(m)
                values = batched_svdvals(grads + moms)
            captures.append(
                CaptureRecord(
                    step=step,
                    loss=value,
                    grad=dict(zip(names, values[: len(names)])),
                    momentum=dict(zip(names, values[len(names) :])),
                )
            )
            if save_matrices and step == steps:
                matrices = {
                    "grad": {n: g.detach().float().cpu().clone() for n, g in zip(names, grads)},
                    "momentum": {n: m.detach().float().cpu().clone() for n, m in zip(names, moms)},
                }
            _sync(device)
            timings.capture_s += time.perf_counter() - start
        if on_step is not None:
            on_step(step, value)

    meta = {
        "model": workload.describe(),
        "fingerprint": fingerprint((n, p.shape) for n, p in model.named_parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "every": every,
        "capture_steps": sorted(when),
        "seed": seed,
        "optimizer": {"name": optimizer, "lr": base_lr, "momentum": momentum, "nesterov": True},
        "device": _device_meta(device),
        "versions": {"muonprof": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
        "timings": timings.to_dict(steps, len(captures)),
        "routes": {name: reason for name, (_, reason) in route_module(model).items()},
    }
    return Spectra(
        meta=meta,
        layers=layers,
        captures=captures,
        losses=losses,
        matrices=matrices,
        matrices_step=steps if matrices is not None else None,
    )


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
