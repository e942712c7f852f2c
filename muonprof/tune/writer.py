"""Turn tuning decisions into a ``muonprof.profile/1`` document that explains itself.

Each layer entry carries its recipe (the flat keys ProfiledMuon reads), its resolved learning-rate scale,
and under ``measured`` the bench numbers behind the choice next to the baseline's for the same layer, so
a reader sees what was traded for what. Provenance records where and how it was made, including the
Optuna storage and study names, so the study can be reopened (optuna-dashboard, ``optuna`` CLI).
"""

from __future__ import annotations

import platform
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import torch

from .._version import __version__
from ..bench.candidates import Candidate, MomentumRank
from ..lr_rules import lr_rule_factor
from ..optim.state_memory import format_bytes
from ..ortho import OrthoConfig
from ..profile import Profile, parse_profile
from .space import BASELINE_LABEL, LayerMenu
from .stage1 import Assignment

_LOWRANK_KEYS = ("rank", "range_finder", "power_iters", "oversample", "core", "full_below")


def settings_of(config: Candidate) -> dict[str, Any]:
    """The profile keys for an orthogonalizer: everything that defines it, nothing that doesn't apply.

    A low-rank momentum (``MomentumRank``) is ``{"momentum_rank": r}`` alone: it orthogonalizes straight
    from its factors, and the profile refuses orthogonalizer keys beside it."""
    if isinstance(config, MomentumRank):
        return {"momentum_rank": config.rank}
    out: dict[str, Any] = {"method": config.method}
    if config.method == "svd":
        return out
    out.update(ns_steps=config.ns_steps, coefficients=config.coefficients, dtype=config.dtype)
    if config.eps != OrthoConfig().eps:
        out["eps"] = config.eps
    if config.gram:
        out["gram"] = True
        if config.gram_restarts is not None:
            out["gram_restarts"] = list(config.gram_restarts)
    if config.method in ("lowrank", "rsvd"):
        for key in _LOWRANK_KEYS:
            value = getattr(config, key)
            if value is not None:
                out[key] = value
        if config.error_feedback:
            out["error_feedback"] = True
    if config.method == "subset":
        out.update(fraction=config.fraction, core=config.core)
    return out


def layer_ladder(
    menu: LayerMenu,
    chosen: str,
    spectrum: Sequence[float] | torch.Tensor,
    *,
    slack: float = 0.02,
    margin: float = 0.05,
    patience: int = 3,
    every: int = 50,
    lr_scale: Callable[[Any], float] | None = None,
) -> dict[str, Any] | None:
    """A ladder for one layer from its stage-1 front (``menu``) around the recipe the race accepted (``chosen``).

    Rungs: the front's options that report the same kind of signal as the chosen one (``ortho.signals``:
    energy share, applied share or orthogonality; the exact SVD reports 1 and may sit on top), kept as one chain
    that is increasing in flops (the balancing cost model, ``distributed.ortho_flops``) and in alignment, the
    chosen one included and the start rung. The floor is the chosen recipe's predicted signal on ``spectrum``
    (the layer's captured momentum spectrum: what the race accepted it on) minus ``slack``, clipped to [0, 1]:
    the layer climbs once its spectrum has become harder than that. None when no other rung fits (a one-rung
    ladder would never move). ``lr_scale(option)``: each rung's own lr_scale (tune gives every rung the scale the
    race would train that recipe with: stage 2's, times its update-size factor); without it rungs take the
    layer's."""
    from ..optim.distributed import ortho_flops
    from ..ortho.signals import predicted_signal, signal_kind

    pick = menu.option(chosen)
    if not isinstance(pick.config, OrthoConfig):
        return None  # a low-rank momentum orthogonalizes from its factors: no ladder
    kind = signal_kind(pick.config)

    def cost(option: Any) -> float:
        return ortho_flops(menu.shape, option.config)

    same = [o for o in menu.options if isinstance(o.config, OrthoConfig)]
    same = [o for o in same if signal_kind(o.config) in (kind, "exact")]
    below = [o for o in same if o is not pick and signal_kind(o.config) == kind]  # the exact SVD only on top
    above = [o for o in same if o is not pick]
    chain_down: list[Any] = []
    for o in sorted(below, key=lambda o: (-cost(o), -o.alignment)):
        last = chain_down[-1] if chain_down else pick
        if cost(o) <= cost(last) and o.alignment < last.alignment:
            chain_down.append(o)
    chain_up: list[Any] = []
    for o in sorted(above, key=lambda o: (cost(o), o.alignment)):
        last = chain_up[-1] if chain_up else pick
        if cost(o) >= cost(last) and o.alignment > last.alignment:
            chain_up.append(o)
    rungs = [*reversed(chain_down), pick, *chain_up]
    if len(rungs) < 2:
        return None
    signal = predicted_signal(spectrum, pick.config, menu.shape)
    return {
        "rungs": [
            {**settings_of(o.config), **({"lr_scale": lr_scale(o)} if lr_scale is not None else {})} for o in rungs
        ],
        "floor": min(1.0, max(0.0, signal - slack)),
        "margin": margin,
        "patience": patience,
        "every": every,
        "start": len(chain_down),
    }


def state_summary(
    choice: Assignment, baseline: Assignment, budget: int | None, adamw_bytes: int | None = None
) -> dict[str, Any]:
    """What the profile's optimizer state is predicted to be (bytes, float32 parameters).

    ``muon``: the chosen profile's Muon state over the tuned layers (momentum or its low-rank factors, and
    a step counter each: what ``--state-memory-budget`` bounds); ``muon_default``: the same layers with the
    default full momentum; ``adamw``: the AdamW-routed parameters' state (two moments and a step counter),
    fixed by the model whatever the profile; ``total``: muon + adamw."""
    out: dict[str, Any] = {
        "budget": budget,
        "muon": choice.state_bytes,
        "muon_default": baseline.state_bytes,
        "saved": baseline.state_bytes - choice.state_bytes,
        "adamw": adamw_bytes,
        "total": choice.state_bytes + adamw_bytes if adamw_bytes is not None else None,
        "counts": "Muon: momentum (or momentum_rank factors) + 4-byte step counter per tuned layer; float32",
    }
    out["human"] = {k: format_bytes(v) for k, v in out.items() if isinstance(v, int) and not isinstance(v, bool)}
    return out


def build_profile(
    *,
    model: str,
    fingerprint: str,
    num_parameters: int | None,
    shapes: Mapping[str, Sequence[int]],
    menus: Sequence[LayerMenu],
    choice: Assignment,
    lr: Mapping[str, Any] | None,
    device: Mapping[str, Any],
    command: str,
    study: Mapping[str, Any],
    notes: str | None = None,
    state: Mapping[str, Any] | None = None,
    race: Mapping[str, Any] | None = None,
    ladders: Mapping[str, Mapping[str, Any]] | None = None,
) -> Profile:
    """The profile for ``choice`` (stage 1) and ``lr`` (stage 2: ``{"lr_rule", "scales": {layer: s}, ...}``).

    ``state`` (``state_summary``) goes to ``provenance.study.state_memory``; the predicted Muon state is in
    ``provenance.expected`` either way. ``race`` (``RaceResult.to_json()``): the stage-3 table that proved
    (or refused) the profile, kept as ``provenance.race``. ``ladders``: per layer, a ladder (``layer_ladder``)
    written into its entry (the entry's own recipe stays: it is what the profile runs without adaptation)."""
    lr = dict(lr or {})
    rule = lr.get("lr_rule", "original")
    scales: Mapping[str, float] = lr.get("scales", {})
    layers: dict[str, Any] = {}
    for menu in menus:
        option = menu.option(choice.picks[menu.name])
        base = menu.option(BASELINE_LABEL) if BASELINE_LABEL in menu.labels else None
        scale = float(scales.get(menu.name, 1.0))
        m, n = menu.shape
        entry: dict[str, Any] = {
            **settings_of(option.config),
            "lr_scale": scale,
            "role": menu.role,
            "shape": list(shapes.get(menu.name, menu.shape)),
            "lr_factor": lr_rule_factor(rule, m, n) * scale,
            "measured": {
                "time_ms": option.time_s * 1e3,
                "alignment": option.alignment,
                "rel_err": option.rel_err,
                "sv_min": option.sv_min,
                "sv_max": option.sv_max,
                "baseline_time_ms": base.time_s * 1e3 if base else None,
                "baseline_alignment": base.alignment if base else None,
                "source": option.source,
                "label": option.label,
                "weight": menu.weight,
                "state_bytes": option.state_bytes,
                "baseline_state_bytes": base.state_bytes if base else None,
            },
        }
        if ladders and menu.name in ladders:
            entry["ladder"] = dict(ladders[menu.name])
        layers[menu.name] = entry
    defaults: dict[str, Any] = {"lr_rule": rule} if rule != "original" else {}
    if float(lr.get("adamw_mult", 1.0)) != 1.0:
        # Every layer not listed (the AdamW-routed embeddings, head, gains) inherits this lr_scale.
        defaults["lr_scale"] = float(lr["adamw_mult"])
    document = {
        "format": "muonprof.profile/1",
        "model": {"name": model, "fingerprint": fingerprint, "num_parameters": num_parameters},
        "provenance": {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "muonprof_version": __version__,
            "torch_version": str(torch.__version__),
            "python_version": platform.python_version(),
            "device": device.get("type"),
            "device_name": device.get("name"),
            "host": socket.gethostname(),
            "command": command,
            "study": {**dict(study), **({"state_memory": dict(state)} if state is not None else {})},
            "expected": {
                "ortho_time_ms": choice.time_s * 1e3,
                "alignment": choice.quality,
                "worst_alignment": choice.worst,
                "base_lr": lr.get("base_lr"),
                "muon_state_bytes": choice.state_bytes,
            },
            **({"race": dict(race)} if race is not None else {}),
        },
        "conventions": {},
        "defaults": defaults,
        "layers": layers,
        "notes": notes,
    }
    return parse_profile(document)
