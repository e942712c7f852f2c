"""The bench artifact's document (``muonprof.bench/2``, and the ``/1`` it upgrades from): pydantic models.

They gate reading and writing (``bench.artifact``) and generate the shipped JSON Schema; ``BenchResult``
keeps its own in-memory form. The top level, layers, costs and timings are strict (every key known); the
per-candidate measures, front points, summary and meta are open (typed known keys, more allowed), because
they grow with new measures without changing what a reader of the file relies on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    StrictBool,
    ValidationInfo,
    field_validator,
)

from ..artifacts import OpenModel, StrictModel

FORMAT_V1 = "muonprof.bench/1"
FORMAT = "muonprof.bench/2"

MatrixShape = Annotated[list[PositiveInt], Field(min_length=2, max_length=2, description="(m, n) of the matrix.")]
Seconds = NonNegativeFloat | None


class TimingEntry(StrictModel):
    """``cost.Timing``: seconds per timed call over ``repeats`` samples (warm-up excluded)."""

    median_s: NonNegativeFloat
    min_s: NonNegativeFloat
    max_s: NonNegativeFloat
    p10_s: NonNegativeFloat
    p90_s: NonNegativeFloat
    repeats: PositiveInt
    warmup_s: NonNegativeFloat


class CostEntry(StrictModel):
    """One row of ``costs``: a candidate timed on the layers of one matrix shape (``cost.CostRecord``)."""

    shape: MatrixShape
    label: str = Field(..., description="The candidate's label (bench.candidates.candidate_label).")
    config: dict[str, Any] = Field(..., description="The candidate (OrthoConfig.to_dict or a momentum_rank).")
    count: PositiveInt = Field(..., description="Benched layers of this shape.")
    batch: PositiveInt = Field(..., description="Matrices per timed call: 1 on CPU, count on accelerators.")
    time_s: TimingEntry | None = Field(None, description="The timing; null when skipped.")
    spread: NonNegativeFloat | None = Field(
        None, description="Relative IQR of the samples, (q3 - q1) / median (bench/1 files: (p90 - p10) / median)."
    )
    per_layer_s: Seconds = None
    bucket_s: Seconds = None
    state_bytes: NonNegativeInt = Field(..., description="Muon optimizer state of one layer under the candidate.")
    peak_memory_bytes: NonNegativeInt | None = None
    memory_source: str | None = None
    skipped: str | None = Field(None, description="Why the candidate was not timed.")
    shared_from: str | None = Field(None, description="The label whose timing this one reuses.")
    # Optional figures of the robust timing (interleaved rounds, quartiles, re-measurement of noisy ones).
    time_estimate_s: Seconds = Field(None, description="The figure bench uses: the estimator's value (else median).")
    estimator: Literal["min", "p10", "q1", "median"] | None = Field(
        None, description="Which statistic of the interleaved samples time_estimate_s is."
    )
    rounds: NonNegativeInt | None = Field(None, description="Interleaved timing rounds this timing took part in.")
    time_q1_s: Seconds = Field(None, description="First quartile of the per-call seconds.")
    time_q3_s: Seconds = Field(None, description="Third quartile of the per-call seconds.")
    remeasured: StrictBool | None = Field(None, description="Timed again because the first timing was too noisy.")
    certainty: Literal["high", "medium", "low"] | None = Field(
        None,
        description="high: >= 5 samples, spread <= 0.10; medium: >= 3 samples, spread <= 0.25; low: otherwise.",
    )

    @field_validator("config")
    @classmethod
    def _known_candidate(cls, value: dict[str, Any]) -> dict[str, Any]:
        """A config tune could not rebuild is refused here, naming the cost, not later inside tuning."""
        from .candidates import candidate_from_dict

        try:
            candidate_from_dict(value)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a bench candidate ({type(err).__name__}: {err})") from None
        return value


class CostEntryV1(CostEntry):
    """bench/1: ``state_bytes`` was added to the format without a version change, so it may be missing."""

    state_bytes: NonNegativeInt | None = None  # type: ignore[assignment]


class BenchLayer(StrictModel):
    """One benched layer (``spectra``'s record of it)."""

    name: str
    matrix_shape: MatrixShape
    role: str
    optimizer: str


class Measures(OpenModel):
    """One candidate's accuracy on one layer (``bench.accuracy``); ``source`` says how it was obtained."""

    source: str | None = Field(None, description="spectral model, real matrix (N seeds), skipped, ...")
    reason: str | None = Field(None, description="Why the candidate was not measured.")
    alignment: float | None = None
    alignment_worst: float | None = None
    rel_err: NonNegativeFloat | None = None
    rel_err_worst: NonNegativeFloat | None = None
    sv_min: float | None = None
    sv_max: float | None = None
    multistep_alignment: float | None = None


class FrontPoint(OpenModel):
    """A point of a Pareto front (``pareto.point_json``)."""

    label: str
    time_s: Seconds = None
    alignment: float | None = None
    state_bytes: NonNegativeInt | None = None


class BenchSummary(OpenModel):
    """The whole-model comparison (``pareto.model_summary``); empty in a file without layers."""

    baseline: str | None = None
    target_alignment: float | None = None
    default_step_s: Seconds = None
    tuned_step_s: Seconds = None
    speedup: NonNegativeFloat | None = None
    choices: dict[str, dict[str, Any]] | None = None
    short_of_target: list[str] | None = None
    baseline_missing: list[str] | None = None
    default_state_bytes: NonNegativeInt | None = None
    tuned_state_bytes: NonNegativeInt | None = None
    min_state_bytes: NonNegativeInt | None = None


class BenchMeta(OpenModel):
    """How and where the bench ran (all optional: a hand-made file may have an empty meta)."""

    device: dict[str, Any] | None = None
    matmul: dict[str, Any] | None = None
    telemetry: dict[str, Any] | None = None
    spectra: dict[str, Any] | None = None
    grid: dict[str, Any] | None = None
    candidates: NonNegativeInt | None = None
    seeds: PositiveInt | None = None
    all_layers: bool | None = None
    skipped_dtypes: dict[str, str] | None = None
    notes: list[str] | None = None
    versions: dict[str, str] | None = None
    command: str | None = None
    created: str | None = None
    wall_s: NonNegativeFloat | None = None
    load: list[float] | dict[str, Any] | None = Field(
        None, description="The machine's load while timing (load averages), to read the timings against."
    )


Fronts = dict[str, dict[str, list[FrontPoint]]]  # "layers" / "roles" / "role_points" / "roles_state" -> name -> points


class _BenchBase(StrictModel):
    meta: BenchMeta
    layers: list[BenchLayer]
    accuracy: dict[str, dict[str, Measures]] = Field(..., description="layer -> candidate label -> measures")
    model_check: dict[str, Any] = Field(default_factory=dict, description="The spectral model vs real runs.")
    fronts: Fronts = Field(default_factory=dict)
    summary: BenchSummary = Field(default_factory=BenchSummary)


class BenchV1(_BenchBase):
    """A ``muonprof.bench/1`` document (read to be upgraded, never written)."""

    format: Literal["muonprof.bench/1"]
    costs: list[CostEntryV1]


class Bench(_BenchBase):
    """A ``muonprof.bench/2`` document: what ``muonprof bench`` writes and ``muonprof tune --bench`` reads."""

    format: Literal["muonprof.bench/2"] = Field(..., description="Format tag; must be muonprof.bench/2.")
    costs: list[CostEntry]

    @field_validator("fronts")
    @classmethod
    def _state_front_reported(cls, value: Fronts, info: ValidationInfo) -> Fronts:
        """bench/2's promise over /1: a file with layers has the optimizer-state front per role."""
        if info.data.get("layers") and "roles_state" not in value:
            raise ValueError("roles_state is required when the file has layers")
        return value

    @field_validator("summary")
    @classmethod
    def _state_summary_reported(cls, value: BenchSummary, info: ValidationInfo) -> BenchSummary:
        """bench/2's promise over /1: a file with layers reports the state its choices imply (null if unknown)."""
        if info.data.get("layers") and "default_state_bytes" not in value.model_fields_set:
            raise ValueError("default_state_bytes is required when the file has layers (null if unknown)")
        return value
