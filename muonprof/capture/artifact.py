"""The spectra artifact (``muonprof.spectra/1``): what ``spectrum`` writes and ``bench`` / ``tune`` read.

One file, written atomically with ``torch.save`` and read with ``torch.load(weights_only=True)`` (only
tensors, numbers, strings, lists and dicts: loading someone's spectra file cannot run code). Singular
values are stored per capture step, per layer, for the gradient G and for the momentum M that Muon
orthogonalizes; ``--save-matrices`` adds the matrices G and M themselves at the last capture step (column
selection's accuracy depends on the actual columns, not only on the spectrum).

Later additions, all optional so that older files still load: ``meta["warmup_steps"]`` (the burn-in before
the first capture; missing: 0), ``window`` (a ``GradientWindow`` of consecutive raw gradients; missing:
None) and ``drift`` (per layer, how the statistics moved from the first to the last capture: derived from
the captures, written for readers of the file and recomputed on load, so it can never disagree with them).
The JSON-able part (format, meta, layers, per-capture step and loss) is checked against
``capture.schema.SpectraDocument`` on save and load (``muonprof schema spectra`` prints its JSON Schema).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from .._files import atomic_write, dumps_json
from ..artifacts import ArtifactKind, check_document, load_document, register
from .schema import FORMAT, SpectraDocument, spectra_view
from .stats import stats_row
from .window import GradientWindow

KINDS = ("grad", "momentum")


class SpectraError(ValueError):
    """A spectra file that cannot be used: missing, corrupt, another format version, or inconsistent."""


KIND = register(
    ArtifactKind(
        name="spectra",
        version=1,
        model=SpectraDocument,
        error=SpectraError,
        what="spectra file",
        rerun="muonprof spectrum",
        schema_package=__package__,
        view=spectra_view,
    )
)


@dataclass(frozen=True)
class LayerRecord:
    """One weight matrix: its parameter shape, the 2-D shape an orthogonalizer sees, role and optimizer."""

    name: str
    shape: tuple[int, ...]
    matrix_shape: tuple[int, int]
    role: str
    optimizer: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "matrix_shape": list(self.matrix_shape),
            "role": self.role,
            "optimizer": self.optimizer,
        }


@dataclass
class CaptureRecord:
    """Singular values (descending, float32) of G and M for every layer at one training step."""

    step: int
    loss: float
    grad: dict[str, Tensor]
    momentum: dict[str, Tensor]

    def spectrum(self, kind: str, name: str) -> Tensor:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return (self.grad if kind == "grad" else self.momentum)[name]


@dataclass
class Spectra:
    meta: dict[str, Any]
    layers: list[LayerRecord]
    captures: list[CaptureRecord]
    losses: list[float] = field(default_factory=list)
    matrices: dict[str, dict[str, Tensor]] | None = None  # {"grad": {name: G}, "momentum": {name: M}}
    matrices_step: int | None = None
    window: GradientWindow | None = None

    @property
    def warmup_steps(self) -> int:
        """Burn-in steps trained before the first capture (0 for files written before burn-in existed)."""
        return int(self.meta.get("warmup_steps", 0))

    def drift(self, kind: str = "momentum") -> dict[str, dict[str, Any]]:
        """Per layer: how its statistics moved from the first to the last capture (after the burn-in).

        Why: a spectrum that is still moving at the last capture means the recipe is scored on a phase that
        training is leaving; the relative changes say how much (``rel_change``: (last - first) / first,
        None when first is 0).
        """
        first, last = self.captures[0], self.captures[-1]
        out: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            a, b = stats_row(first.spectrum(kind, layer.name)), stats_row(last.spectrum(kind, layer.name))
            k = min(layer.matrix_shape)
            share_a, share_b = a["nuclear_rank_90"] / k, b["nuclear_rank_90"] / k
            out[layer.name] = {
                "first_step": first.step,
                "last_step": last.step,
                "nuclear_rank_90_share": [share_a, share_b],
                "nuclear_rank_90_share_change": rel_change(share_a, share_b),
                "nuclear_change": rel_change(a["nuclear"], b["nuclear"]),
                "effective_rank_change": rel_change(a["effective_rank"], b["effective_rank"]),
            }
        return out

    def layer(self, name: str) -> LayerRecord:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.captures]

    def capture_at(self, step: int | None = None) -> CaptureRecord:
        """The capture at ``step`` (None: the last one)."""
        if step is None:
            return self.captures[-1]
        for capture in self.captures:
            if capture.step == step:
                return capture
        raise SpectraError(f"no capture at step {step}; captured steps: {self.steps}")

    def stats(self, kind: str = "momentum", step: int | None = None) -> dict[str, dict[str, float | int]]:
        """Per-layer ``stats_row`` of the spectra at ``step`` (None: the last capture)."""
        capture = self.capture_at(step)
        return {layer.name: stats_row(capture.spectrum(kind, layer.name)) for layer in self.layers}

    def summary(self) -> dict[str, Any]:
        """JSON-ready: metadata, layers, and per capture step the loss and each layer's statistics."""
        return {
            "format": FORMAT,
            "meta": self.meta,
            "layers": [layer.to_dict() for layer in self.layers],
            "captures": [
                {
                    "step": c.step,
                    "loss": c.loss,
                    "layers": {
                        layer.name: {kind: stats_row(c.spectrum(kind, layer.name)) for kind in KINDS}
                        for layer in self.layers
                    },
                }
                for c in self.captures
            ],
            "losses": self.losses,
            "matrices_step": self.matrices_step,
            "warmup_steps": self.warmup_steps,
            "drift": self.drift(),
            "window": self.window.summary() if self.window is not None else None,
        }


def rel_change(first: float, last: float) -> float | None:
    """(last - first) / |first|; 0 when both are 0, None when only ``first`` is (no finite answer)."""
    if first == 0:
        return 0.0 if last == 0 else None
    return (last - first) / abs(first)


def save_spectra(spectra: Spectra, path: str | os.PathLike[str]) -> Path:
    """Write atomically: an interrupted save leaves the previous file (or none), never half of one."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        # Plain JSON types only (e.g. torch.__version__ is a str subclass that weights_only loading refuses).
        "meta": json.loads(dumps_json(spectra.meta, what=f"{path}: spectra meta", error=SpectraError, default=str)),
        "layers": [layer.to_dict() for layer in spectra.layers],
        "captures": [
            {"step": c.step, "loss": c.loss, "grad": dict(c.grad), "momentum": dict(c.momentum)}
            for c in spectra.captures
        ],
        "losses": list(spectra.losses),
        "matrices": spectra.matrices,
        "matrices_step": spectra.matrices_step,
        "drift": spectra.drift(),
        "window": spectra.window.to_payload() if spectra.window is not None else None,
    }
    check_document(payload, KIND, f"{path}: spectra")
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def load_spectra(path: str | os.PathLike[str]) -> Spectra:
    """Read and check a spectra file; every problem is a SpectraError with a one-line message."""
    source = Path(path)
    if not source.is_file():
        raise SpectraError(f"{source}: no such spectra file")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not its zip format
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise SpectraError(f"{source}: not a muonprof spectra file (cannot be read: {reason})") from None
    model, payload = load_document(payload, KIND, str(source))
    document = cast(SpectraDocument, model)
    _check_tensor_dicts(payload, source)
    spectra = Spectra(
        meta=dict(payload["meta"]),
        layers=[
            LayerRecord(d.name, tuple(d.shape), (d.matrix_shape[0], d.matrix_shape[1]), d.role, d.optimizer)
            for d in document.layers
        ],
        captures=[
            CaptureRecord(step=c.step, loss=c.loss, grad=raw["grad"], momentum=raw["momentum"])
            for c, raw in zip(document.captures, payload["captures"], strict=True)
        ],
        losses=list(document.losses),
        matrices=payload.get("matrices"),
        matrices_step=document.matrices_step,
    )
    _check_consistent(spectra, source)
    spectra.window = _load_window(payload.get("window"), spectra, source)
    return spectra


def _check_tensor_dicts(payload: dict[str, Any], source: Path) -> None:
    """The tensor parts the model does not see: each capture's per-layer singular values, the matrices."""
    for i, capture in enumerate(payload["captures"]):
        for kind in KINDS:
            if not isinstance(capture.get(kind), dict):
                raise SpectraError(
                    f"{source}: corrupt spectra file: captures[{i}].{kind}: must map each layer to its singular values"
                )
    matrices = payload.get("matrices")
    if matrices is not None and not (
        isinstance(matrices, dict) and all(isinstance(v, dict) for v in matrices.values())
    ):
        raise SpectraError(f"{source}: corrupt spectra file: matrices: must map grad/momentum to per-layer matrices")


def _load_window(data: Any, spectra: Spectra, source: Path) -> GradientWindow | None:
    if data is None:
        return None
    shapes = {layer.name: layer.matrix_shape for layer in spectra.layers}
    total = spectra.meta.get("total_steps")
    try:
        return GradientWindow.from_payload(data, shapes, int(total) if total is not None else None)
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as err:
        raise SpectraError(f"{source}: corrupt gradient window ({err})") from None


def _check_consistent(spectra: Spectra, source: Path) -> None:
    if not spectra.layers or not spectra.captures:
        raise SpectraError(f"{source}: spectra file holds no layers or no captures")
    for capture in spectra.captures:
        for kind in KINDS:
            values = capture.grad if kind == "grad" else capture.momentum
            for layer in spectra.layers:
                s = values.get(layer.name)
                if not isinstance(s, Tensor) or s.ndim != 1 or s.numel() != min(layer.matrix_shape):
                    raise SpectraError(
                        f"{source}: corrupt spectra file (step {capture.step}, {kind} of {layer.name!r} "
                        f"should hold {min(layer.matrix_shape)} singular values)"
                    )
                if not s.is_floating_point() or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                    raise SpectraError(
                        f"{source}: corrupt spectra file (step {capture.step}, {kind} of {layer.name!r}: "
                        "singular values must be finite and >= 0)"
                    )
