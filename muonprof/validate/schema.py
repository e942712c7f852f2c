"""The validate results file (``muonprof.validate/1``): pydantic models of its document.

They gate reading and writing (``validate.results``) and give ``muonprof schema validate``. The runs (one per
contender and seed) are the data and are strict; the ``summary`` is derived from them and recomputed on
every load (only its ``reference`` and ``margin`` are read back), so it is open: a file written by an earlier
version, whose summary had other keys (the old tie rule's ``call``), still reads.

Older validate/1 files have the same shape with fewer keys, so they need no migration: a run without
``grad_evals`` (written before storm momentum made two passes a step) reads as one pass per step
(``TrainResult.from_dict``), and the derived per-run figures (``steps_done``, ``median_step_s``, ...) are
optional because they are recomputed from the per-step lists.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt

from ..artifacts import OpenModel, StrictModel

FORMAT = "muonprof.validate/1"


class EvalEntry(StrictModel):
    """One evaluation: val loss after ``step`` steps at ``wall_s`` seconds of cumulative training time."""

    step: NonNegativeInt
    wall_s: NonNegativeFloat
    val_loss: float | None = Field(..., description="null when the loss was not finite.")


class RunEntry(StrictModel):
    """One contender's run in one seed (``train.TrainResult.to_dict`` plus the seed)."""

    seed: int
    steps_planned: NonNegativeInt
    train_losses: list[float | None] = Field(..., description="Per step; null where the loss was not finite.")
    wall_s: list[NonNegativeFloat] = Field(..., description="Cumulative training time after each step.")
    step_s: list[NonNegativeFloat]
    optimizer_step_s: list[NonNegativeFloat]
    evals: list[EvalEntry]
    eval_s: NonNegativeFloat
    peak_memory_bytes: NonNegativeInt | None = None
    peak_memory_kind: str
    state_bytes: NonNegativeInt
    diverged_at: NonNegativeInt | None = None
    stop_reason: str = Field(..., description="steps, time_budget or diverged.")
    grad_evals: list[NonNegativeInt] | None = Field(
        None, description="Cumulative forward/backward passes after each step; missing in older files: 1 per step."
    )
    steps_done: NonNegativeInt | None = None
    median_step_s: NonNegativeFloat | None = None
    median_optimizer_step_s: NonNegativeFloat | None = None
    total_grad_evals: NonNegativeInt | None = None


class ContenderEntry(StrictModel):
    """One contender: its configuration, status and runs (no runs when it was skipped)."""

    config: dict[str, Any] = Field(default_factory=dict)
    status: str | None = None
    skipped: str | None = Field(None, description="Why the contender did not run.")
    runs: list[RunEntry] = Field(default_factory=list)


class ValidateSummary(OpenModel):
    """The derived summary: recomputed on load; only ``reference`` and ``margin`` are read back."""

    reference: str | None = None
    margin: float | None = Field(None, description="δ of the non-inferiority verdict (nats).")


class ValidateMeta(OpenModel):
    """How validate ran (all optional; more keys allowed: devices, options, distributed layout, ...)."""

    created: str | None = None
    command: str | None = None
    model: dict[str, Any] | str | None = None
    fingerprint: str | None = None
    steps: NonNegativeInt | None = None
    eval_every: NonNegativeInt | None = None
    time_budget_s: NonNegativeFloat | None = None
    cpu_load_before: list[float] | None = Field(None, description="Load averages before the runs.")
    cpu_load_after: list[float] | None = Field(None, description="Load averages after the runs.")


class ValidateDocument(StrictModel):
    """A ``muonprof.validate/1`` results file."""

    format: Literal["muonprof.validate/1"] = Field(..., description="Format tag; must be muonprof.validate/1.")
    meta: ValidateMeta
    seeds: list[int]
    contenders: dict[str, ContenderEntry]
    summary: ValidateSummary = Field(default_factory=ValidateSummary)
