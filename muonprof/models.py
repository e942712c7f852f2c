"""Model specs shared by every command: a built-in name or a user's ``package.module:factory``.

The built-in zoo (GPT-2, LLaMA, ViT families) grows here; every spec resolves to a plain ``nn.Module``
so training scripts name models the way the CLI does.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn


class ModelSpecError(ValueError):
    """A MODEL argument that cannot be turned into a module; the message says what to pass instead."""


def _mlp(width: int = 256, depth: int = 3, inputs: int = 64, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.GELU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


BUILTINS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "mlp": (_mlp, "MLP classifier: 64 inputs, 3 hidden layers of 256, 10 classes"),
}


def load_model(spec: str, **overrides: Any) -> nn.Module:
    """The ``nn.Module`` for a built-in name or ``package.module:factory`` (called with ``overrides``)."""
    if spec in BUILTINS:
        factory, _ = BUILTINS[spec]
    elif ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ModelSpecError(f"model {spec!r}: cannot import {module_name!r} ({err})") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ModelSpecError(f"model {spec!r}: {module_name} has no callable {attr!r}")
    else:
        known = ", ".join(sorted(BUILTINS))
        raise ModelSpecError(f"unknown model {spec!r}: use a built-in ({known}) or package.module:factory")
    try:
        model = factory(**overrides)
    except TypeError as err:
        raise ModelSpecError(f"model {spec!r}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model {spec!r}: factory returned {type(model).__name__}, not an nn.Module")
    return model
