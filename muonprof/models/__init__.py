"""Model specs shared by every command: a built-in name, ``package.module:factory``, ``file.py:factory``
or ``hf:PATH``.

Every spec resolves to a plain ``nn.Module`` (``load_model``) or, with what the spec says about feeding
it, a ``LoadedModel`` (``load_spec``), so training scripts name models the way the CLI does.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from .registry import BUILTINS, Builtin, catalog, count_params, load_builtin, parse_overrides, resolve_config
from .task import LoadedModel, ModelSpecError, TaskInfo, infer_task

__all__ = [
    "BUILTINS",
    "Builtin",
    "LoadedModel",
    "ModelSpecError",
    "TaskInfo",
    "catalog",
    "count_params",
    "infer_task",
    "load_model",
    "load_spec",
    "parse_overrides",
    "resolve_config",
]


def load_spec(spec: str, **overrides: Any) -> LoadedModel:
    """Resolve any MODEL spec; ``overrides`` are config settings (built-ins, hf) or factory keyword arguments."""
    if spec in BUILTINS:
        return load_builtin(spec, **overrides)
    if spec.startswith("hf:"):
        from .hf import load_hf

        return load_hf(spec, **overrides)
    if ":" in spec:
        from .user import load_factory

        return load_factory(spec, **overrides)
    known = ", ".join(BUILTINS)
    close = difflib.get_close_matches(spec, list(BUILTINS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ModelSpecError(
        f"unknown model {spec!r}{hint}: use a built-in ({known}), package.module:factory, file.py:factory or hf:PATH"
    )


def load_model(spec: str, **overrides: Any) -> nn.Module:
    """The ``nn.Module`` for any MODEL spec (see ``load_spec``)."""
    return load_spec(spec, **overrides).model
