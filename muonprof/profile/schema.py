"""The ``muonprof.profile/1`` document: pydantic models that are the contract between tune and training.

The hand-writable keys (``optimizer``, ``method``, ``ns_steps``, ...) are deliberately flat and mirror
``OrthoConfig`` so that a person can write ``{"layers": {"h.0.mlp.c_fc.weight": {"rank": 64}}}``.
Everything else (model fingerprint, provenance, measurements) is optional, so a hand-written profile is
a few lines while a tuned one explains every choice it made.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

FORMAT = "muonprof.profile/1"

Coefficients = str | list[Annotated[list[float], Field(min_length=2, max_length=3)]]


class _Strict(BaseModel):
    # allow_inf_nan=False: a profile is strict JSON, so no field may hold NaN or an infinity.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Measured(BaseModel):
    """What bench/tune measured for this layer's chosen recipe, so a reader can see why it was chosen."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _unmeasured_is_null(cls, data: Any) -> Any:
        """A candidate that was never timed (or diverged) has an infinite/NaN number in memory: it was not
        measured, so it is stored as null; strict JSON has no infinity to write it as."""
        if isinstance(data, dict):
            return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()}
        return data

    time_ms: float | None = Field(None, ge=0, description="Orthogonalization time per step (batched), ms.")
    alignment: float | None = Field(None, description="<G, O> / (||G||_* ||O||_op) on captured spectra.")
    rel_err: float | None = Field(None, ge=0, description="||O - UV^T||_F / ||UV^T||_F on captured spectra.")
    sv_min: float | None = None
    sv_max: float | None = None
    baseline_time_ms: float | None = Field(None, ge=0, description="Same layer under the default recipe.")
    baseline_alignment: float | None = None
    source: str | None = Field(None, description="Where the numbers come from (spectral model, real run...).")


def _finite_number(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _known_schedule(value: Coefficients | None) -> Coefficients | None:
    from ..ortho.schedules import resolve_schedule

    if value is None:
        return value
    if isinstance(value, list) and not value:
        raise ValueError("needs at least one row [a, b, c]")
    resolve_schedule(value)
    for row in value if isinstance(value, list) else []:
        if not all(math.isfinite(v) for v in row):
            raise ValueError("coefficients must be finite numbers")
    return value


def _known_preset(value: str | None) -> str | None:
    from ..ortho.config import PRESETS

    if value is not None and value not in PRESETS:
        raise ValueError(f"unknown preset {value!r} (known: {', '.join(sorted(PRESETS))})")
    return value


class OrthoRecipe(_Strict):
    """The orthogonalizer keys: what a layer entry and a ladder rung share (one declaration, one set of checks)."""

    preset: str | None = Field(None, description="A named orthogonalizer recipe, e.g. lowrank_he2025.")
    method: Literal["newton_schulz", "svd", "lowrank", "rsvd", "subset"] | None = Field(
        None,
        description=(
            "newton_schulz, svd (exact polar), lowrank / rsvd (rank-r update), subset (Dion2: orthogonalize the "
            "fraction of the long-side rows with the largest norms; only those rows of the momentum decay)."
        ),
    )
    ns_steps: int | None = Field(None, ge=0, le=100)
    coefficients: Coefficients | None = Field(
        None,
        description="A schedule name (jordan, cubic, quintic, you, polar_express, ...) or [[a, b, c], ...].",
    )
    rank: int | None = Field(None, gt=0)
    range_finder: Literal["power", "columns"] | None = None
    power_iters: int | None = Field(None, ge=0)
    oversample: int | None = Field(None, ge=0)
    core: Literal["newton_schulz", "svd"] | None = None
    full_below: int | None = Field(None, ge=0)
    error_feedback: StrictBool | None = Field(
        None,
        description=(
            "lowrank / rsvd only: the momentum keeps the part of itself the rank-r update did not apply and "
            "decays only the applied part (Dion), so the layer serves its whole spectrum over time."
        ),
    )
    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="subset only: the share of the long side's rows (columns) orthogonalized each step, in (0, 1].",
    )
    gram: StrictBool | None = Field(
        None,
        description=(
            "Run the Newton-Schulz iteration (newton_schulz, or the Newton-Schulz core of lowrank / subset) as "
            "Gram Newton-Schulz: the same polynomial on the short-side Gram matrix, fewer flops on rectangular "
            "matrices."
        ),
    )
    gram_restarts: list[Annotated[StrictInt, Field(ge=1)]] | None = Field(
        None,
        description=(
            "gram only: the steps after which Gram Newton-Schulz re-forms X and its Gram matrix (1-based, each "
            "in [1, ns_steps - 1], increasing); unset: after every other step."
        ),
    )
    dtype: Literal["bfloat16", "float32"] | None = None
    eps: float | None = Field(None, gt=0)

    @field_validator("eps", "fraction")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        return _finite_number(value)

    @field_validator("coefficients")
    @classmethod
    def _known_schedule(cls, value: Coefficients | None) -> Coefficients | None:
        return _known_schedule(value)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        return _known_preset(value)

    def explicit(self) -> dict[str, Any]:
        """Only the keys the author actually set."""
        return self.model_dump(exclude_none=True, exclude_unset=True)


class LadderRung(OrthoRecipe):
    """One rung of a ladder: a full orthogonalizer recipe (the orthogonalizer keys a layer entry has) and
    optionally its own ``lr_scale``. A rung does not inherit the layer's orthogonalizer keys: it starts from
    torch.optim.Muon's recipe (Jordan x5, bf16), its ``preset`` expands first, its keys override."""

    lr_scale: float | None = Field(
        None, gt=0, le=1e6, description="This rung's lr_scale (a rung changes the update size); unset: the layer's."
    )

    @field_validator("lr_scale")
    @classmethod
    def _finite_scale(cls, value: float | None) -> float | None:
        return _finite_number(value)


class Ladder(_Strict):
    """Recipes from cheap to exact that ProfiledMuon moves a layer along while it trains (``optim.ladder``).

    Every ``every`` steps the optimizer measures the active rung's quality signal (in [0, 1], 1 = exact;
    ``ortho.signals``): below ``floor`` the layer moves one rung up at once; after ``patience`` consecutive
    measurements at or above ``floor + margin`` it moves one rung down (a cheaper rung that then falls below
    the floor is retried only after twice as long each time, so a stationary spectrum does not flap)."""

    rungs: list[LadderRung] = Field(..., description="Recipes ordered cheap -> expensive (by flops for the shape).")
    floor: float = Field(..., description="The quality below which the layer climbs, in [0, 1] (signal scale).")
    margin: float = Field(0.05, ge=0, le=1, description="Slack above the floor needed to count toward a descent.")
    patience: int = Field(3, ge=1, description="Consecutive slack measurements before moving one rung down.")
    every: int = Field(50, ge=1, description="Measure the signal (and decide) every this many steps (K).")
    start: int = Field(0, ge=0, description="The rung a fresh run starts on (index into rungs).")

    @field_validator("rungs")
    @classmethod
    def _not_empty(cls, value: list[LadderRung]) -> list[LadderRung]:
        if not value:
            raise ValueError("a ladder needs at least one rung")
        return value

    @field_validator("floor")
    @classmethod
    def _unit_floor(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"floor must be in [0, 1] (the signal's scale), got {value}")
        return value

    @model_validator(mode="after")
    def _start_in_range(self) -> Ladder:
        if self.start >= len(self.rungs):
            raise ValueError(f"start {self.start} is not a rung index (the ladder has {len(self.rungs)} rungs)")
        return self


class LayerSettings(OrthoRecipe):
    """One layer's recipe (or the ``defaults`` block). Every key is optional: unset keys inherit."""

    optimizer: Literal["muon", "adamw"] | None = Field(None, description="Which update rule the layer gets.")
    lr_rule: Literal["original", "match_rms_adamw", "spectral", "none"] | None = Field(
        None, description="Shape rule: step = base lr x lr_rule(shape) x lr_scale."
    )
    lr_scale: float | None = Field(None, gt=0, le=1e6)
    momentum: Literal["ema", "storm"] | None = Field(
        None,
        description=(
            "ema: torch.optim.Muon's B <- lerp(B, g, 1 - mu). storm: LiMuon's variance-reduced "
            "M_t = g(x_t) + mu (M_{t-1} - g(x_{t-1})) on the same batch; needs step(closure) (two backward passes)."
        ),
    )
    momentum_rank: int | None = Field(
        None,
        gt=0,
        description=(
            "Keep the momentum as rank-r randomized-SVD factors ((m + n + 1) r numbers instead of m n); "
            "the update is U_r V_r^T straight from the factors (LiMuon)."
        ),
    )

    ladder: Ladder | None = Field(
        None,
        description=(
            "Adapt while training: recipes from cheap to exact and a quality floor (ProfiledMuon moves the layer "
            "along them by a cheap quality signal); replaces the layer's own orthogonalizer. A layer's ladder "
            "replaces the defaults' ladder; a one-rung ladder pins the layer to that recipe."
        ),
    )

    @field_validator("lr_scale")
    @classmethod
    def _finite_scale(cls, value: float | None) -> float | None:
        return _finite_number(value)


class LayerEntry(LayerSettings):
    """A layer's recipe plus what was measured and recorded about it (never read by the optimizer)."""

    role: str | None = Field(None, description="attn_qkv, attn_out, mlp_up, mlp_down, conv, ... (informational).")
    shape: list[int] | None = Field(None, description="The parameter's shape when the profile was made.")
    lr_factor: float | None = Field(
        None, description="Resolved lr_rule(shape) x lr_scale, written by tune for readers; not read back."
    )
    measured: Measured | None = None


class ModelInfo(_Strict):
    name: str = Field(..., description="The model spec the profile was tuned on (e.g. gpt2-small).")
    fingerprint: str | None = Field(None, description="sha256 prefix of sorted 'name:shape' lines.")
    num_parameters: int | None = Field(None, ge=0)
    config: dict[str, Any] | None = None


class Provenance(BaseModel):
    model_config = ConfigDict(extra="allow")

    created: str | None = None
    muonprof_version: str | None = None
    torch_version: str | None = None
    python_version: str | None = None
    device: str | None = None
    device_name: str | None = None
    host: str | None = None
    command: str | None = None
    study: dict[str, Any] | None = None


class Conventions(BaseModel):
    """The update conventions the profile assumes; 'Muon' means several update magnitudes in the wild."""

    model_config = ConfigDict(extra="allow")

    momentum: str = "ema (per layer: ema | storm, optionally low-rank with momentum_rank)"
    nesterov: bool = True
    normalization: str = "X / max(||X||_F * norm_scale, eps) before Newton-Schulz"
    lr: str = "base lr x lr_rule(fan_out, fan_in of the orthogonalized matrix) x lr_scale"
    weight_decay: str = "decoupled: p *= 1 - base_lr * weight_decay (unadjusted lr, as torch.optim.Muon)"
    conv: str = "conv weights flattened to (out, in*kh*kw); lr_rule uses that matrix's shape"


class Profile(_Strict):
    """A ``muonprof.profile/1`` document."""

    format: Literal["muonprof.profile/1"] = Field(FORMAT, description="Format tag; must be muonprof.profile/1.")
    model: ModelInfo | None = None
    provenance: Provenance | None = None
    conventions: Conventions | None = None
    defaults: LayerSettings = Field(default_factory=LayerSettings)
    layers: dict[str, LayerEntry] = Field(default_factory=dict)
    notes: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _format_first(cls, data: Any) -> Any:
        if isinstance(data, dict) and "format" not in data:
            raise ValueError(f'missing "format": expected "{FORMAT}"')
        return data


def has_ladders(profile: Profile | None) -> bool:
    """Whether any layer (or the defaults) of ``profile`` adapts along a ladder."""
    if profile is None:
        return False
    return profile.defaults.ladder is not None or any(e.ladder is not None for e in profile.layers.values())


def without_ladders(profile: Profile) -> Profile:
    """The same profile with every ladder removed: each layer back on its own static recipe (what ``validate``
    races an adaptive profile against, as ``static``)."""
    data = {**profile.model_dump(exclude_none=True, exclude_unset=True), "format": profile.format}
    data.get("defaults", {}).pop("ladder", None)
    for entry in data.get("layers", {}).values():
        entry.pop("ladder", None)
    return Profile.model_validate(data)
