"""Turn tuning decisions into a ``muonprof.profile/1`` document that explains itself.

Each layer entry carries its recipe (the flat keys ProfiledMuon reads), its resolved learning-rate scale,
and under ``measured`` the bench numbers behind the choice next to the baseline's for the same layer, so
a reader sees what was traded for what. Provenance records where and how it was made, including the
Optuna storage and study names, so the study can be reopened (optuna-dashboard, ``optuna`` CLI).
"""

from __future__ import annotations

import platform
import socket
from collections.abc import Mapping, Sequence
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
) -> Profile:
    """The profile for ``choice`` (stage 1) and ``lr`` (stage 2: ``{"lr_rule", "scales": {layer: s}, ...}``).

    ``state`` (``state_summary``) goes to ``provenance.study.state_memory``; the predicted Muon state is in
    ``provenance.expected`` either way. ``race`` (``RaceResult.to_json()``): the stage-3 table that proved
    (or refused) the profile, kept as ``provenance.race``."""
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
