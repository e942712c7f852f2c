"""The built-in models: named configs per family, ``--set key=value`` overrides, and the catalog table.

A family module (gpt2, llama, vit, mlp) exposes a frozen config dataclass with ``validate()``, ``CONFIGS``
(name -> (config, description)), ``ALIASES`` (override name -> config field), ``build(config)`` and
``task_info(config)``. Everything else (parsing, type checks, errors, counting) lives here once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import gpt2, llama, mlp, vit
from .task import LoadedModel, ModelSpecError, TaskInfo

COMMON_ALIASES = ("width", "depth", "heads", "vocab", "seq_len")
_FAMILIES: tuple[tuple[str, ModuleType], ...] = (("gpt2", gpt2), ("llama", llama), ("vit", vit), ("mlp", mlp))


@dataclass(frozen=True)
class Builtin:
    """One named model: a family's config plus how to build it."""

    name: str
    family: str
    config: Any
    description: str
    build: Callable[[Any], nn.Module]
    task: Callable[[Any], TaskInfo]
    aliases: Mapping[str, str]

    def keys(self) -> list[str]:
        """Every override name this model accepts: its config fields and the aliases that apply."""
        return sorted({f.name for f in dataclasses.fields(self.config)} | set(self.aliases))


def _builtins() -> dict[str, Builtin]:
    out: dict[str, Builtin] = {}
    for family, module in _FAMILIES:
        fields = {f.name for f in dataclasses.fields(module.CONFIGS[next(iter(module.CONFIGS))][0])}
        # a common alias that is already a field name (llama's "heads") needs no mapping
        aliases = {**{a: a for a in COMMON_ALIASES if a in fields}, **module.ALIASES}
        for name, (config, description) in module.CONFIGS.items():
            out[name] = Builtin(name, family, config, description, module.build, module.task_info, aliases)
    return out


BUILTINS: dict[str, Builtin] = _builtins()


def parse_value(text: str) -> Any:
    """``--set`` values: int, then float, then true/false, else the string itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["width=128", "depth=4"]`` -> ``{"width": 128, "depth": 4}``; a malformed item is a ModelSpecError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelSpecError(f"--set expects key=value (e.g. width=128), got {item!r}")
        if key in out:
            raise ModelSpecError(f"--set {key} given twice")
        out[key] = parse_value(value.strip())
    return out


def resolve_config(name: str, overrides: Mapping[str, Any]) -> Any:
    """The built-in's config with ``overrides`` applied and checked; every problem is one ModelSpecError line."""
    builtin = BUILTINS[name]
    defaults = {f.name: getattr(builtin.config, f.name) for f in dataclasses.fields(builtin.config)}
    changes: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in overrides.items():
        field = builtin.aliases.get(key, key)
        if field not in defaults:
            if key in COMMON_ALIASES:
                raise ModelSpecError(
                    f"{name}: {key!r} does not apply to a {builtin.family} model; valid: {', '.join(builtin.keys())}"
                )
            raise ModelSpecError(f"{name}: unknown setting {key!r}; valid: {', '.join(builtin.keys())}")
        if field in given_as:
            raise ModelSpecError(f"{name}: {key!r} and {given_as[field]!r} both set {field}")
        given_as[field] = key
        changes[field] = _check_value(name, key, value, defaults[field])
    config = dataclasses.replace(builtin.config, **changes)
    try:
        config.validate()
    except ModelSpecError as err:
        raise ModelSpecError(f"{name}: {err}") from None
    return config


def _check_value(name: str, key: str, value: Any, default: Any) -> Any:
    """Sizes are positive ints, rates and epsilons positive finite floats; strings are parsed as on the CLI."""
    if isinstance(value, str):
        value = parse_value(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelSpecError(f"{name}: {key} must be a positive integer, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ModelSpecError(f"{name}: {key} must be a positive number, got {value!r}")
    return float(value)


def load_builtin(name: str, **overrides: Any) -> LoadedModel:
    """Build a built-in on the current default device, tagged with ``muonprof_task`` and ``muonprof_config``."""
    builtin = BUILTINS[name]
    config = resolve_config(name, overrides)
    model = builtin.build(config)
    task = builtin.task(config)
    resolved = dataclasses.asdict(config)
    model.muonprof_task = task
    model.muonprof_config = resolved
    return LoadedModel(spec=name, model=model, task=task, config=resolved, source="builtin")


def count_params(model: nn.Module) -> dict[str, int]:
    """``parameters`` (tied weights once), ``muon_parameters`` and ``muon_matrices`` (what Muon updates).

    Only shapes and structure are read, so it works on meta-device models."""
    from ..optim.routing import route_module

    named = dict(model.named_parameters())
    muon = [named[n] for n, (optimizer, _) in route_module(model).items() if optimizer == "muon"]
    return {
        "parameters": sum(p.numel() for p in named.values()),
        "muon_parameters": sum(p.numel() for p in muon),
        "muon_matrices": len(muon),
    }


def catalog() -> list[dict[str, Any]]:
    """One row per built-in for ``muonprof models``; models are built on the meta device, so it is instant."""
    rows = []
    for builtin in BUILTINS.values():
        with torch.device("meta"):
            model = builtin.build(builtin.config)
        rows.append(
            {
                "name": builtin.name,
                "family": builtin.family,
                "description": builtin.description,
                "config": dataclasses.asdict(builtin.config),
                **count_params(model),
            }
        )
    return rows
