"""A window of consecutive raw gradients, for accuracy measures over many steps instead of one.

Why: an orthogonalizer that keeps what it did not apply in the momentum (error feedback) is unfairly
judged by one step's accuracy (DESIGN.md, "Three kinds of speedup"): it needs T consecutive gradients
G_1..G_T of the same run and the momentum buffer B_0 just before G_1, from which any recipe's momentum
recurrence can be replayed. ``GradientWindow`` is that contract; ``WindowRecorder`` fills it during the
capture run's last T steps.

Size: T float32 copies of every Muon matrix can be large (gpt2-small: 340 MB per step), so the layers kept
are chosen within a byte cap, round-robin over (role, shape) groups so that every kind of layer gets a
representative before any kind gets a second one; the others are listed in ``skipped`` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

DEFAULT_WINDOW = 16  # consecutive gradients `muonprof spectrum` keeps unless --window says otherwise
MAX_WINDOW = 64
WINDOW_BYTES = 512 * 2**20  # one layer per role of gpt2-small at T = 16 fits (4 x 40 MB + 2 x 160 MB)
MIB = 2**20


class _Layer(Protocol):
    name: str
    role: str
    matrix_shape: tuple[int, int]


@dataclass
class GradientWindow:
    """T consecutive gradients per kept layer (float32, (T, m, n)) and its momentum buffer before them."""

    start_step: int
    grads: dict[str, Tensor]
    momentum: dict[str, Tensor]
    byte_cap: int = WINDOW_BYTES
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return next(iter(self.grads.values())).shape[0] if self.grads else 0

    @property
    def steps(self) -> list[int]:
        """The absolute training steps of ``grads[name][0]``, ``[1]``, ..."""
        return list(range(self.start_step, self.start_step + self.length))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.grads.values(), *self.momentum.values()])

    def to_payload(self) -> dict[str, Any]:
        return {
            "start_step": self.start_step,
            "grads": dict(self.grads),
            "momentum": dict(self.momentum),
            "byte_cap": self.byte_cap,
            "skipped": dict(self.skipped),
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no tensors)."""
        return {
            "start_step": self.start_step,
            "length": self.length,
            "layers": sorted(self.grads),
            "bytes": self.nbytes,
            "byte_cap": self.byte_cap,
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_payload(cls, data: Any, shapes: dict[str, tuple[int, int]], total_steps: int | None) -> GradientWindow:
        """Rebuild and check a saved window; ValueError (one line) names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("window is not a mapping")
        window = cls(
            start_step=int(data["start_step"]),
            grads=dict(data["grads"]),
            momentum=dict(data["momentum"]),
            byte_cap=int(data.get("byte_cap", WINDOW_BYTES)),
            skipped={str(k): str(v) for k, v in dict(data.get("skipped", {})).items()},
        )
        window.check(shapes, total_steps)
        return window

    def check(self, shapes: dict[str, tuple[int, int]], total_steps: int | None) -> None:
        """Every kept layer is known, (T, m, n) float32 with one T, with an (m, n) momentum; steps fit."""
        if self.start_step < 1:
            raise ValueError(f"window start_step {self.start_step} is before step 1")
        if set(self.grads) != set(self.momentum):
            raise ValueError("window grads and momentum hold different layers")
        lengths = set()
        for name, g in self.grads.items():
            if name not in shapes:
                raise ValueError(f"window layer {name!r} is not one of the captured layers")
            m, n = shapes[name]
            mom = self.momentum[name]
            if not isinstance(g, Tensor) or g.dtype != torch.float32 or g.ndim != 3 or tuple(g.shape[1:]) != (m, n):
                raise ValueError(f"window gradients of {name!r} are not float32 (T, {m}, {n})")
            if not isinstance(mom, Tensor) or tuple(mom.shape) != (m, n):
                raise ValueError(f"window momentum of {name!r} is not ({m}, {n})")
            lengths.add(g.shape[0])
        if len(lengths) > 1 or 0 in lengths:
            raise ValueError(f"window layers hold different or zero lengths {sorted(lengths)}")
        if total_steps is not None and self.grads and self.start_step + self.length - 1 > total_steps:
            raise ValueError(f"window steps {self.start_step}..{self.start_step + self.length - 1} exceed the run")


def select_window_layers(layers: Sequence[_Layer], length: int, byte_cap: int) -> tuple[list[str], dict[str, str]]:
    """The layers whose T gradients + momentum fit in ``byte_cap``, round-robin over (role, shape) groups.

    Returns (kept names in ``layers`` order, skipped name -> reason).
    """
    groups: dict[tuple[str, tuple[int, int]], list[_Layer]] = {}
    for layer in layers:
        groups.setdefault((layer.role, tuple(layer.matrix_shape)), []).append(layer)
    left = byte_cap
    kept: set[str] = set()
    skipped: dict[str, str] = {}
    for depth in range(max((len(g) for g in groups.values()), default=0)):
        for members in groups.values():
            if depth >= len(members):
                continue
            layer = members[depth]
            m, n = layer.matrix_shape
            need = (length + 1) * m * n * 4
            if need <= left:
                kept.add(layer.name)
                left -= need
            else:
                cap = f"{left / MIB:.1f} of {byte_cap / MIB:.0f} MiB left"
                skipped[layer.name] = f"{need / MIB:.1f} MiB is over the window byte cap ({cap})"
    return [layer.name for layer in layers if layer.name in kept], skipped


class WindowRecorder:
    """Copies the gradients of steps ``start_step .. start_step + length - 1`` and B before the first."""

    def __init__(
        self,
        layers: Sequence[_Layer],
        params: dict[str, Tensor],
        *,
        start_step: int,
        length: int,
        byte_cap: int = WINDOW_BYTES,
    ) -> None:
        names, self.skipped = select_window_layers(layers, length, byte_cap)
        shapes = {layer.name: tuple(layer.matrix_shape) for layer in layers}
        self.params = {name: params[name] for name in names}
        self.shapes = {name: shapes[name] for name in names}
        self.start_step, self.length, self.byte_cap = start_step, length, byte_cap
        # Allocated up front, so the cap bounds the memory too.
        self.grads = {name: torch.zeros(length, *shapes[name], dtype=torch.float32) for name in names}
        self.momentum: dict[str, Tensor] = {}

    def record(self, step: int, buffer_of: Callable[[str, Tensor], Tensor]) -> None:
        """Call after backward and before ``optimizer.step()`` of ``step`` (B is still step - 1's)."""
        index = step - self.start_step
        if not 0 <= index < self.length:
            return
        with torch.no_grad():
            for name, p in self.params.items():
                if index == 0:
                    self.momentum[name] = buffer_of(name, p).detach().reshape(self.shapes[name]).float().cpu().clone()
                if p.grad is None:  # an unused parameter: its gradient is zero
                    self.grads[name][index].zero_()
                else:
                    self.grads[name][index].copy_(p.grad.detach().reshape(self.shapes[name]))

    def result(self) -> GradientWindow:
        return GradientWindow(
            start_step=self.start_step,
            grads=self.grads,
            momentum=self.momentum,
            byte_cap=self.byte_cap,
            skipped=dict(self.skipped),
        )
