"""Turning a profile plus a model's parameters into one concrete plan per parameter.

Precedence, lowest first: torch.optim.Muon's defaults, the profile's ``defaults`` block, then the layer's
own entry; inside a block a ``preset`` expands first and the block's explicit keys override it. All
problems are collected and reported together, each naming its layer, so a user fixes a profile in one
pass instead of one error per run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..lr_rules import lr_rule_factor, matrix_shape
from ..ortho.config import PRESETS, OrthoConfig
from .io import ProfileError, fingerprint
from .schema import Ladder, LayerSettings, Profile

ORTHO_KEYS = frozenset(OrthoConfig.__dataclass_fields__)
MOMENTUM_KEYS = frozenset({"momentum", "momentum_rank"})


@dataclass(frozen=True)
class LadderPlan:
    """A layer's resolved ladder: one validated ``OrthoConfig`` (and lr_scale) per rung, cheap -> expensive,
    plus the controller's settings (``optim.ladder``)."""

    rungs: tuple[OrthoConfig, ...]
    lr_scales: tuple[float, ...]
    floor: float
    margin: float = 0.05
    patience: int = 3
    every: int = 50
    start: int = 0

    def to_json(self) -> str:
        """A stable text of the whole ladder (part of the plan hash every rank must agree on)."""
        import json

        body = {
            "rungs": [r.to_dict() for r in self.rungs],
            "lr_scales": list(self.lr_scales),
            "floor": self.floor,
            "margin": self.margin,
            "patience": self.patience,
            "every": self.every,
            "start": self.start,
        }
        return json.dumps(body, sort_keys=True)


@dataclass(frozen=True)
class LayerPlan:
    """Everything the optimizer needs for one parameter, resolved once at construction."""

    name: str
    optimizer: str  # "muon" | "adamw"
    reason: str  # why this optimizer: "hidden matrix", "embedding", "profile", ...
    shape: tuple[int, ...]
    ortho: OrthoConfig | None = None
    lr_rule: str = "original"
    lr_scale: float = 1.0
    momentum: str = "ema"  # "ema" | "storm"
    momentum_rank: int | None = None  # low-rank momentum factors (LiMuon); None keeps the full buffer
    layout: str = "out_in"  # "in_out": stored as (fan_in, fan_out), e.g. Hugging Face's Conv1D (``fan_shape``)
    ladder: LadderPlan | None = None  # adaptive recipes; ``ortho`` / ``lr_scale`` are then the active rung's

    @property
    def momentum_label(self) -> str:
        base = self.momentum
        if self.ortho is not None and self.ortho.error_feedback:
            return f"{base}, error feedback"
        if self.ortho is not None and self.ortho.method == "subset":
            return f"{base}, subset decay"
        return f"{base}, rank {self.momentum_rank}" if self.momentum_rank else base

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The (fan_out, fan_in) matrix Muon orthogonalizes: conv weights flattened to (out, in*kh*kw)."""
        return matrix_shape(self.shape)

    @property
    def fan_shape(self) -> tuple[int, int]:
        """(fan_out, fan_in) as the layer uses the matrix: ``matrix_shape``, transposed for an ``in_out`` weight.
        The shape rules of the lr read this; the update itself is computed on the stored matrix."""
        rows, cols = self.matrix_shape
        return (cols, rows) if self.layout == "in_out" else (rows, cols)

    @property
    def lr_factor(self) -> float:
        """lr_rule(fan shape) x lr_scale: the layer's step size is base lr times this."""
        if self.optimizer != "muon":
            return self.lr_scale
        return lr_rule_factor(self.lr_rule, *self.fan_shape) * self.lr_scale


def _apply_block(settings: dict[str, Any], block: LayerSettings) -> None:
    explicit = block.explicit()
    explicit.pop("ladder", None)  # a ladder is resolved on its own (``_resolve_ladder``), never merged key by key
    preset = explicit.pop("preset", None)
    if preset is not None:
        settings.update(PRESETS[preset].to_dict())
    settings.update(explicit)


def resolve_layers(
    profile: Profile | None,
    shapes: Mapping[str, tuple[int, ...]],
    routes: Mapping[str, tuple[str, str]],
    *,
    strict: bool = True,
    layouts: Mapping[str, str] | None = None,
) -> dict[str, LayerPlan]:
    """One ``LayerPlan`` per parameter name in ``shapes``.

    ``routes`` gives the automatic choice per parameter (``("muon" | "adamw", reason)``). With
    ``strict=False`` layers the profile cannot be applied to (unknown name, wrong shape, another
    model's fingerprint) fall back to defaults with one warning that lists them; every other problem
    is an error either way. ``layouts`` names the weights stored as (fan_in, fan_out) (``routing.fan_layouts``).
    """
    layouts = layouts or {}
    errors: list[str] = []
    skipped: list[str] = []
    layers = dict(profile.layers) if profile else {}

    if profile is not None and profile.model is not None and profile.model.fingerprint:
        ours = fingerprint(shapes.items())
        if ours != profile.model.fingerprint:
            detail = _describe_mismatch(profile, shapes)
            msg = (
                f"profile was made for model {profile.model.name!r} ({profile.model.fingerprint}), "
                f"this model is {ours}{detail}"
            )
            if strict:
                errors.append(msg)
            else:
                skipped.append(msg)

    for name, entry in list(layers.items()):
        if name not in shapes:
            (errors if strict else skipped).append(f'layers["{name}"]: no parameter of that name in the model')
            layers.pop(name)
        elif entry.shape is not None and tuple(entry.shape) != tuple(shapes[name]):
            (errors if strict else skipped).append(
                f'layers["{name}"]: profile has shape {tuple(entry.shape)}, model has {tuple(shapes[name])}'
            )
            layers.pop(name)

    plans: dict[str, LayerPlan] = {}
    for name, shape in shapes.items():
        auto_optimizer, reason = routes[name]
        settings: dict[str, Any] = {}
        if profile is not None:
            _apply_block(settings, profile.defaults)
        entry = layers.get(name)
        if entry is not None:
            _apply_block(settings, entry)
            reason = "profile"
        optimizer = auto_optimizer
        if entry is not None and entry.optimizer is not None:
            optimizer = entry.optimizer
        elif profile is not None and profile.defaults.optimizer == "adamw":
            optimizer, reason = "adamw", "profile defaults"
        lr_scale = float(settings.get("lr_scale", 1.0))
        lr_rule = settings.get("lr_rule", "original")
        where = f'layers["{name}"]' if entry is not None else f"defaults (applied to {name!r})"
        if optimizer == "adamw":
            own = sorted((MOMENTUM_KEYS | {"ladder"}) & entry.explicit().keys()) if entry is not None else []
            if own:
                errors.append(f"{where}: {', '.join(own)} applies to Muon layers only (this layer uses adamw)")
                continue
            plans[name] = LayerPlan(name, "adamw", reason, tuple(shape), None, lr_rule, lr_scale)
            continue
        if len(shape) < 2:
            errors.append(f"{where}: optimizer muon needs a matrix, {name!r} has shape {tuple(shape)}")
            continue
        momentum = settings.get("momentum", "ema")
        momentum_rank = settings.get("momentum_rank")
        try:
            ortho = OrthoConfig.from_dict({k: v for k, v in settings.items() if k in ORTHO_KEYS})
            plan = LayerPlan(
                name,
                "muon",
                reason,
                tuple(shape),
                ortho,
                lr_rule,
                lr_scale,
                momentum,
                momentum_rank,
                layouts.get(name, "out_in"),
            )
            ortho.check_shape(plan.matrix_shape)
            _check_momentum(plan, entry)
        except ValueError as err:
            errors.append(f"{where} (matrix {'x'.join(map(str, matrix_shape(shape)))}): {err}")
            continue
        ladder = _ladder_of(profile, entry)
        if ladder is not None:
            try:
                plan = _with_ladder(plan, ladder, lr_scale)
            except ValueError as err:
                ladder_where = f'layers["{name}"].ladder' if entry is not None and entry.ladder else (
                    f"defaults.ladder (applied to {name!r})"
                )
                errors.append(f"{ladder_where} (matrix {'x'.join(map(str, matrix_shape(shape)))}): {err}")
                continue
        plans[name] = plan

    if errors:
        raise ProfileError("\n".join(errors))
    if skipped:
        warnings.warn(
            "strict=False: these profile entries do not match the model and were ignored "
            "(those layers use defaults):\n  " + "\n  ".join(skipped),
            stacklevel=3,
        )
    return plans


def _ladder_of(profile: Profile | None, entry: LayerSettings | None) -> Ladder | None:
    """The layer's own ladder, else the defaults' one."""
    if entry is not None and entry.ladder is not None:
        return entry.ladder
    return profile.defaults.ladder if profile is not None else None


def _with_ladder(plan: LayerPlan, ladder: Ladder, layer_lr_scale: float) -> LayerPlan:
    """``plan`` on its ladder's start rung. Each rung is resolved as a layer block is (preset, then keys, on
    torch's recipe) and checked like one (``check_shape``, the momentum rules); ValueError names the rung.
    The rungs must be ordered: none may cost fewer flops (``distributed.ortho_flops``, the balancing cost
    model, for this layer's matrix shape) than the rung below it."""
    from ..optim.distributed import ortho_flops  # the optimizer imports profiles: resolve lazily

    if plan.momentum_rank is not None:
        raise ValueError("momentum_rank orthogonalizes straight from its factors: it cannot have a ladder")
    rungs: list[OrthoConfig] = []
    scales: list[float] = []
    costs: list[float] = []
    for i, rung in enumerate(ladder.rungs):
        settings: dict[str, Any] = {}
        explicit = rung.explicit()
        scale = float(explicit.pop("lr_scale", layer_lr_scale))
        preset = explicit.pop("preset", None)
        if preset is not None:
            settings.update(PRESETS[preset].to_dict())
        settings.update(explicit)
        try:
            ortho = OrthoConfig.from_dict(settings)
            ortho.check_shape(plan.matrix_shape)
            _check_momentum(LayerPlan(plan.name, "muon", plan.reason, plan.shape, ortho, momentum=plan.momentum), None)
        except ValueError as err:
            raise ValueError(f"rungs[{i}]: {err}") from None
        cost = ortho_flops(plan.matrix_shape, ortho)
        if costs and cost < costs[-1]:
            raise ValueError(
                f"rungs[{i}] ({ortho.label()}, {cost:.3g} flops) is cheaper than rungs[{i - 1}] "
                f"({rungs[-1].label()}, {costs[-1]:.3g} flops): order the rungs cheap -> expensive"
            )
        rungs.append(ortho)
        scales.append(scale)
        costs.append(cost)
    resolved = LadderPlan(
        tuple(rungs), tuple(scales), ladder.floor, ladder.margin, ladder.patience, ladder.every, ladder.start
    )
    start = resolved.start
    return replace(plan, ortho=rungs[start], lr_scale=scales[start], ladder=resolved)


def _check_momentum(plan: LayerPlan, entry: LayerSettings | None) -> None:
    """A low-rank momentum is orthogonalized from its own factors, so it must fit the matrix and must not
    be combined with an orthogonalizer the same entry asks for (that would be silently ignored)."""
    if plan.momentum == "storm" and plan.ortho is not None and plan.ortho.keeps_tail:
        what = "error_feedback" if plan.ortho.error_feedback else "method subset"
        raise ValueError(f"{what} keeps an EMA momentum's tail; momentum 'storm' is not supported with it")
    rank = plan.momentum_rank
    if rank is None:
        return
    m, n = plan.matrix_shape
    if rank > min(m, n):
        raise ValueError(f"momentum_rank {rank} is larger than the matrix allows (min(m, n) = {min(m, n)})")
    own = entry.explicit() if entry is not None else {}
    clashing = sorted(k for k in own if k in ORTHO_KEYS or k == "preset")
    if clashing:
        raise ValueError(
            f"momentum_rank orthogonalizes straight from its factors (U_r V_r^T); "
            f"{', '.join(clashing)} would be ignored: drop them or drop momentum_rank"
        )


def _describe_mismatch(profile: Profile, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Name the layers behind a fingerprint mismatch, as far as the profile recorded them."""
    missing = [n for n in profile.layers if n not in shapes]
    reshaped = [
        n
        for n, e in profile.layers.items()
        if n in shapes and e.shape is not None and tuple(e.shape) != tuple(shapes[n])
    ]
    recorded = {n for n, e in profile.layers.items() if e.shape is not None}
    extra = [n for n in shapes if n not in profile.layers] if recorded else []
    parts = []
    for label, names in (
        ("not in this model", missing),
        ("with another shape", reshaped),
        ("not in the profile", extra),
    ):
        if names:
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            parts.append(f"{len(names)} layer(s) {label}: {shown}")
    return ("; " + "; ".join(parts)) if parts else ""
