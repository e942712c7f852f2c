"""Capture spectra from the user's own training loop: ``SpectrumRecorder``, one call per step.

``muonprof spectrum`` trains on built-in data; a person with a training script, a data pipeline and a framework
wants the spectra of *their* run, at *their* training phase. The recorder attaches to a model and its optimizer and
is called once per step, after ``backward()`` and before ``optimizer.step()`` (Hugging Face's
``on_pre_optimizer_step``, Lightning's ``on_before_optimizer_step``; see ``muonprof.integrations``)::

    recorder = SpectrumRecorder(model, optimizer, every=10, window=16, total_steps=1000)
    for step, batch in enumerate(loader, start=1):
        loss = model(batch).loss
        loss.backward()
        recorder.record(step, loss)
        optimizer.step()
        optimizer.zero_grad()
    recorder.save("run.spectra.pt")         # the same muonprof.spectra/1 artifact as `muonprof spectrum`

What it records is what ``capture_spectra`` records: at each capture step the singular values of every weight
matrix's gradient G and of M = lerp(G, B, mu), the matrix Muon orthogonalizes, with B <- lerp(B, G, 1 - mu) the
momentum. B is read from ProfiledMuon's own buffer where it has one; for every other layer (AdamW-routed ones, or
everything under any other optimizer) a shadow buffer with the same recurrence is kept (one fused lerp per step),
so the spectra say what Muon would see on that layer in this very run. With ``window`` T and ``total_steps`` the
last T gradients and the momentum before them are kept too, for bench's multi-step accuracy.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..lr_rules import matrix_shape
from ..optim import ProfiledMuon
from ..optim.routing import route_module
from ..profile import fingerprint
from ..roles import classify_roles
from .artifact import CaptureRecord, LayerRecord, Spectra, save_spectra
from .window import WINDOW_BYTES, WindowRecorder


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


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside a framework's wrapper (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``: both keep it as ``.optimizer`` / ``._optimizer``), so ProfiledMuon is recognized."""
    for _ in range(4):
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            return optimizer
        optimizer = inner
    return optimizer


class SpectrumRecorder:
    """Records ``muonprof.spectra/1`` spectra at chosen steps of a training loop it does not own.

    Args:
        model: the model being trained (its >= 2 x 2 matrices are recorded, routed and given roles as
            ProfiledMuon would).
        optimizer: the optimizer stepping it. ProfiledMuon's momentum buffers are read directly; for any other
            optimizer (or None) every matrix gets a shadow momentum.
        capture_steps: the (1-based) steps to capture at; else every ``every``-th step from ``warmup_steps``
            on (``every=10``: steps w+10, w+20, ...).
        momentum: mu of the shadow momentum and of M (ProfiledMuon's group momentum when it is the optimizer).
        window: keep the last ``window`` gradients (needs ``total_steps``) within ``window_bytes``.
        layers: ``"muon"`` (default) records the matrices Muon updates (or would, under another optimizer): what
            bench prices and tune chooses for. ``"all"`` adds the AdamW-routed ones (embeddings, heads, stems), as
            ``muonprof spectrum`` does; on an LM their vocabulary-sized tables are most of a capture's cost
            (llama-20m: ~34% overhead at a capture every 10 steps with them, measured).
        name: what the artifact calls the model (default: the class name). Give your model's
            ``package.module:factory`` spec (a factory returning the model, its batches and loss) so that
            ``muonprof tune FILE.spectra.pt`` can rebuild and train it; ``muonprof bench`` needs no more than the
            artifact.
        keep_matrices_at: at this capture step also keep every recorded G and M (float32, on CPU) in the
            artifact (``Spectra.matrices``): bench's column-selection candidates need the real matrices.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        capture_steps: Sequence[int] | None = None,
        every: int = 10,
        warmup_steps: int = 0,
        momentum: float | None = None,
        window: int = 0,
        total_steps: int | None = None,
        window_bytes: int = WINDOW_BYTES,
        layers: str = "muon",
        name: str | None = None,
        keep_matrices_at: int | None = None,
    ) -> None:
        if capture_steps is None and every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        if capture_steps is not None and any(int(s) < 1 for s in capture_steps):
            raise ValueError("capture_steps are 1-based training steps: each must be at least 1")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if layers not in ("muon", "all"):
            raise ValueError(f"layers must be 'muon' or 'all', got {layers!r}")
        if window and total_steps is None:
            raise ValueError("window needs total_steps: the window is the last `window` steps of the run")
        optimizer = unwrap_optimizer(optimizer)
        self.model, self.optimizer = model, optimizer
        self.capture_steps = None if capture_steps is None else sorted({int(s) for s in capture_steps})
        self.every, self.warmup_steps = every, warmup_steps
        self.name = name or type(model).__name__
        self.named = [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and p.ndim >= 2 and min(matrix_shape(tuple(p.shape))) >= 2
        ]
        if not self.named:
            raise ValueError(f"{self.name} has no matrix parameters to record (only vectors/scalars)")
        routes = route_module(model)
        if layers == "muon":
            self.named = [(n, p) for n, p in self.named if routes[n][0] == "muon"]
            if not self.named:
                raise ValueError(f"{self.name} has no matrices Muon would update: layers='all' records the others")
        self.profiled = isinstance(optimizer, ProfiledMuon)
        if self.profiled:
            assert isinstance(optimizer, ProfiledMuon)
            muon_groups = [g for g in optimizer.param_groups if g.get("use_muon")]
            group_mu = muon_groups[0]["momentum"] if muon_groups else 0.95
            self.momentum = float(group_mu if momentum is None else momentum)
            self.optimizer_routes = {n: plan.optimizer for n, plan in optimizer.plans.items()}
            owned = {n for n, route in self.optimizer_routes.items() if route == "muon"}
        else:  # the layers are labelled with the route ProfiledMuon would give them; every buffer is a shadow
            self.momentum = 0.95 if momentum is None else float(momentum)
            self.optimizer_routes = {n: route for n, (route, _) in routes.items()}
            owned = set()
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        roles = classify_roles(model)
        self.layers = [
            LayerRecord(
                name=n,
                shape=tuple(p.shape),
                matrix_shape=matrix_shape(tuple(p.shape)),
                role=roles.get(n, "linear"),
                optimizer=self.optimizer_routes.get(n, "adamw"),
            )
            for n, p in self.named
        ]
        self.routes = routes
        # Shadow momentum for every matrix the optimizer keeps no Muon buffer for.
        self.shadow = {n: torch.zeros_like(p) for n, p in self.named if n not in owned}
        self.window: WindowRecorder | None = None
        if window:
            assert total_steps is not None
            muon = [layer for layer in self.layers if routes[layer.name][0] == "muon"]
            self.window = WindowRecorder(
                muon,
                dict(self.named),
                start_step=total_steps - window + 1,
                length=window,
                byte_cap=window_bytes,
            )
        self.records: list[CaptureRecord] = []
        self.losses: list[float] = []
        self.keep_matrices_at = keep_matrices_at
        self.matrices: dict[str, dict[str, Tensor]] | None = None
        self.matrices_step: int | None = None
        self.record_s = 0.0  # time inside record(), captures included: the recorder's whole cost to the loop
        self.capture_s = 0.0
        self.steps_seen = 0
        self.device = self.named[0][1].device

    def due(self, step: int) -> bool:
        """Whether ``step`` is a capture step."""
        if self.capture_steps is not None:
            return step in self.capture_steps
        return step > self.warmup_steps and (step - self.warmup_steps) % self.every == 0

    def _previous_buffer(self, name: str, p: Tensor) -> Tensor:
        """B_{t-1}: the optimizer's Muon buffer, or the shadow (zeros before the first step)."""
        if name in self.shadow:
            return self.shadow[name]
        buf = self.optimizer.state.get(p, {}).get("momentum_buffer") if self.optimizer is not None else None
        return buf if buf is not None else torch.zeros_like(p)

    @torch.no_grad()
    def record(self, step: int, loss: float | Tensor | None = None) -> None:
        """Call once per training step, after ``backward()`` and before ``optimizer.step()``.

        Off the capture steps this costs one fused lerp of the shadow buffers (and, inside the window, a copy of
        the gradients); at a capture step, the batched singular values of every G and M. ``loss`` is stored as a
        float (one host sync; pass None to skip it).
        """
        start = time.perf_counter()
        self.steps_seen += 1
        value = (
            float(loss.detach()) if isinstance(loss, Tensor) else (float(loss) if loss is not None else float("nan"))
        )
        self.losses.append(value)
        if self.window is not None:
            self.window.record(step, self._previous_buffer)
        current: dict[str, Tensor] = {}
        with_grad = [(n, p) for n, p in self.named if p.grad is not None]
        shadowed = [(n, p) for n, p in with_grad if n in self.shadow]
        if shadowed:
            torch._foreach_lerp_(
                [self.shadow[n] for n, _ in shadowed], [p.grad for _, p in shadowed], 1 - self.momentum
            )
        if self.due(step):
            for n, p in with_grad:
                if n not in self.shadow:  # B_t as the optimizer is about to compute it
                    current[n] = self._previous_buffer(n, p).lerp(p.grad.to(p.dtype), 1 - self.momentum)

            def buffer_of(name: str, p: Tensor) -> Tensor:
                if name in self.shadow:
                    return self.shadow[name]
                # A layer without a gradient is not stepped: its buffer stays B_{t-1}.
                return current[name] if name in current else self._previous_buffer(name, p)

            capture_start = time.perf_counter()
            keep = step == self.keep_matrices_at
            record, matrices = _capture_once(step, value, self.named, buffer_of, self.momentum, keep=keep)
            self.records.append(record)
            if matrices is not None:
                self.matrices, self.matrices_step = matrices, step
            _sync(self.device)
            self.capture_s += time.perf_counter() - capture_start
        self.record_s += time.perf_counter() - start

    def spectra(self) -> Spectra:
        """The artifact so far (``muonprof.spectra/1``): what ``muonprof bench`` and ``muonprof tune`` read."""
        if not self.records:
            raise ValueError(
                f"no capture yet after {self.steps_seen} recorded steps "
                f"(captures at {self.capture_steps or f'every {self.every} steps after {self.warmup_steps}'})"
            )
        steps = [r.step for r in self.records]
        meta: dict[str, Any] = {
            "model": {"spec": self.name, "source": "in-loop recorder"},
            "fingerprint": fingerprint((n, p.shape) for n, p in self.model.named_parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "steps": self.steps_seen,
            "warmup_steps": min(steps) - 1,
            "total_steps": self.steps_seen,
            "every": None if self.capture_steps is not None else self.every,
            "captures": len(steps),
            "capture_steps": steps,
            "seed": None,
            "optimizer": {
                "name": type(self.optimizer).__name__ if self.optimizer is not None else None,
                "momentum": self.momentum,
                "nesterov": True,
                "shadow_momentum": sorted(self.shadow),
            },
            "device": _device_meta(self.device),
            "versions": {"muonprof": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "timings": {
                "record_s": round(self.record_s, 4),
                "capture_s": round(self.capture_s, 4),
                "record_per_step_s": round(self.record_s / max(self.steps_seen, 1), 6),
                "capture_per_capture_s": round(self.capture_s / max(len(self.records), 1), 4),
            },
            "routes": {n: reason for n, (_, reason) in self.routes.items()},
            "recorder": True,
        }
        window = None
        if self.window is not None and self.window.momentum:
            window = self.window.result()
        return Spectra(
            meta=meta,
            layers=self.layers,
            captures=list(self.records),
            losses=list(self.losses),
            matrices=self.matrices,
            matrices_step=self.matrices_step,
            window=window,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the artifact atomically (as ``muonprof spectrum --out`` does)."""
        return save_spectra(self.spectra(), path)
