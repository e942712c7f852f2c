"""The spectra artifact's metadata (``muonprof.spectra/1``): pydantic models of its JSON-able part.

A spectra file is a ``torch.save`` payload: singular values, matrices and the gradient window are tensors,
which no JSON Schema describes; they are checked by ``capture.artifact`` (lengths, finiteness) and
``capture.window``. These models cover everything else (format, meta, layers, per-capture step and loss,
losses) and give ``muonprof schema spectra``. ``spectra_view`` picks that part out of a payload.

Older spectra/1 files (before the burn-in, the gradient window and drift existed) have the same shape with
fewer keys, so they need no migration: ``meta.warmup_steps`` missing reads as 0, ``window`` missing as
None, and ``drift`` is recomputed from the captures on load (never read back).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, NonNegativeInt, PositiveInt

from ..artifacts import OpenModel, StrictModel

FORMAT = "muonprof.spectra/1"


class _Payload(StrictModel):
    # Not JSON: a training loss may be NaN in a torch payload (a diverging run is still worth reading).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)


class SpectraLayer(StrictModel):
    """One weight matrix (``capture.artifact.LayerRecord``)."""

    name: str
    shape: list[PositiveInt] = Field(..., description="The parameter's shape.")
    matrix_shape: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] = Field(
        ..., description="The 2-D shape an orthogonalizer sees (conv kernels flattened)."
    )
    role: str
    optimizer: str = Field(..., description="muon or adamw: where the optimizer routes the parameter.")


class SpectraCapture(_Payload):
    """One capture's JSON-able part; its ``grad`` / ``momentum`` singular values are tensors."""

    step: NonNegativeInt
    loss: float


class SpectraMeta(OpenModel):
    """How the spectra were captured (all optional: a hand-made or old file may carry less)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=True)

    model: dict[str, Any] | str | None = Field(None, description="The workload (spec, task, sizes).")
    fingerprint: str | None = Field(None, description="sha256 prefix of the model's parameter names and shapes.")
    parameters: NonNegativeInt | None = None
    steps: NonNegativeInt | None = None
    warmup_steps: NonNegativeInt | None = Field(None, description="Burn-in before the first capture; missing: 0.")
    total_steps: NonNegativeInt | None = None
    every: PositiveInt | None = None
    captures: NonNegativeInt | None = None
    capture_steps: list[NonNegativeInt] | None = None
    seed: int | None = None
    optimizer: dict[str, Any] | None = None
    device: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    created: str | None = None
    command: str | None = None
    timings: dict[str, Any] | None = None
    routes: dict[str, str] | None = None


class SpectraDocument(_Payload):
    """The JSON-able part of a ``muonprof.spectra/1`` file."""

    format: Literal["muonprof.spectra/1"] = Field(..., description="Format tag; must be muonprof.spectra/1.")
    meta: SpectraMeta
    layers: list[SpectraLayer]
    captures: list[SpectraCapture]
    losses: list[float] = Field(default_factory=list, description="Training loss of every step.")
    matrices_step: NonNegativeInt | None = Field(None, description="The step --save-matrices saved G and M at.")
    drift: dict[str, dict[str, Any]] | None = Field(
        None, description="Per layer, how its statistics moved over the captures (recomputed on load, not read)."
    )


TENSOR_KEYS = ("matrices", "window")
"""Top-level payload keys that hold tensors (checked by capture.artifact and capture.window, not the models)."""


def spectra_view(payload: dict[str, Any]) -> dict[str, Any]:
    """The part of a spectra payload the models describe: every key but the tensor ones, each capture's step
    and loss (missing keys left missing, unknown keys kept so the model refuses them)."""
    view = {key: value for key, value in payload.items() if key not in TENSOR_KEYS}
    if "captures" in payload:
        captures = payload["captures"]
        view["captures"] = (
            [{k: c[k] for k in ("step", "loss") if k in c} if isinstance(c, dict) else c for c in captures]
            if isinstance(captures, list)
            else captures
        )
    return view
