"""User models: ``package.module:factory`` or ``path/to/file.py:factory``, called with the overrides.

A factory returns either an ``nn.Module`` (fed by muonprof's own data from its task) or a workload that
brings its own data and loss: a dict or object with ``model``, ``loss(model, batch) -> Tensor`` and
``batches`` (``step -> batch`` or any iterable), optionally ``val_batches`` and ``task``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from .task import LoadedModel, ModelSpecError, TaskInfo, infer_task

WORKLOAD_KEYS = ("model", "loss", "batches")
OPTIONAL_KEYS = ("val_batches", "task")
_SHAPE = "a dict or object with model, loss and batches (optional: val_batches, task)"


class StepBatches:
    """``batches(step)`` over an iterable: items are cached, so a step always gets the same batch (tuning
    trials replay identical data), and once the iterable runs out the cached epoch repeats."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._source: Iterator[Any] | None = iter(iterable)
        self._cache: list[Any] = []

    def __call__(self, step: int) -> Any:
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        while self._source is not None and len(self._cache) <= step:
            try:
                self._cache.append(next(self._source))
            except StopIteration:
                self._source = None
        if not self._cache:
            raise ValueError("the workload's batches iterable is empty")
        return self._cache[step % len(self._cache)]


class Reiterable:
    """``val_batches()`` over an iterable: re-iterates lists and loaders, replays a one-shot iterator's items."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable
        self._one_shot = iter(iterable) is iterable
        self._items: list[Any] | None = None

    def __call__(self) -> Iterable[Any]:
        if not self._one_shot:
            return self._iterable
        if self._items is None:
            self._items = list(self._iterable)
        return self._items


def load_factory(spec: str, **overrides: Any) -> LoadedModel:
    """Import, call and check a user factory; every failure is a one-line ModelSpecError."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ModelSpecError(f"model {spec!r}: expected package.module:factory or path/to/file.py:factory")
    module = _import_file(spec, target) if _is_path(target) else _import_module(spec, target)
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelSpecError(f"model {spec!r}: {target} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelSpecError(f"model {spec!r}: {target}.{attr} is a {type(factory).__name__}, not callable")
    try:
        result = factory(**overrides)
    except Exception as err:
        raise ModelSpecError(f"model {spec!r}: {attr}() raised {type(err).__name__}: {_one_line(err)}") from None
    if isinstance(result, nn.Module):
        return LoadedModel(spec=spec, model=result, task=_task_of(result), config=dict(overrides), source="factory")
    return _workload(spec, attr, result, overrides)


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_module(spec: str, name: str) -> ModuleType:
    # `python -m` and the console script do not put the working directory on sys.path; `mymodule:factory` should work
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise ModelSpecError(f"model {spec!r}: cannot import {name!r} ({err})") from None
    except Exception as err:
        raise ModelSpecError(
            f"model {spec!r}: cannot import {name!r} ({type(err).__name__}: {_one_line(err)})"
        ) from None


def _import_file(spec: str, target: str) -> ModuleType:
    """Import a file by path under a unique name; its folder goes on sys.path so it can import its neighbours."""
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ModelSpecError(f"model {spec!r}: cannot import {target!r} (no such file)")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_muonprof_user_{stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelSpecError(f"model {spec!r}: cannot import {target!r} (not a Python file)")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ModelSpecError(
            f"model {spec!r}: cannot import {target!r} ({type(err).__name__}: {_one_line(err)})"
        ) from None
    return module


def _task_of(model: nn.Module) -> TaskInfo | None:
    task = getattr(model, "muonprof_task", None)
    return task if isinstance(task, TaskInfo) else infer_task(model)


def _get(result: Any, key: str) -> Any:
    return result.get(key) if isinstance(result, Mapping) else getattr(result, key, None)


def _workload(spec: str, attr: str, result: Any, overrides: Mapping[str, Any]) -> LoadedModel:
    if not isinstance(result, Mapping) and not any(hasattr(result, key) for key in WORKLOAD_KEYS):
        raise ModelSpecError(
            f"model {spec!r}: {attr}() returned {type(result).__name__}, not an nn.Module or a workload ({_SHAPE})"
        )
    missing = [key for key in WORKLOAD_KEYS if _get(result, key) is None]
    if missing:
        raise ModelSpecError(f"model {spec!r}: the workload has no {', '.join(missing)}; a workload is {_SHAPE}")
    if isinstance(result, Mapping):
        unknown = sorted(set(result) - set(WORKLOAD_KEYS) - set(OPTIONAL_KEYS))
        if unknown:
            raise ModelSpecError(f"model {spec!r}: unknown workload key(s) {', '.join(map(str, unknown))}; {_SHAPE}")
    model, loss, batches = (_get(result, key) for key in WORKLOAD_KEYS)
    val_batches, task = (_get(result, key) for key in OPTIONAL_KEYS)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model {spec!r}: the workload's model is a {type(model).__name__}, not an nn.Module")
    if not callable(loss):
        raise ModelSpecError(f"model {spec!r}: the workload's loss must be callable as loss(model, batch)")
    return LoadedModel(
        spec=spec,
        model=model,
        task=_workload_task(spec, model, task),
        config=dict(overrides),
        batches=_callable_or_wrapped(spec, "batches", batches, StepBatches),
        loss=loss,
        val_batches=None if val_batches is None else _callable_or_wrapped(spec, "val_batches", val_batches, Reiterable),
        source="factory",
    )


def _callable_or_wrapped(spec: str, key: str, value: Any, wrap: Callable[[Iterable[Any]], Any]) -> Any:
    if callable(value):
        return value
    if isinstance(value, Iterable):
        return wrap(value)
    kind = type(value).__name__
    raise ModelSpecError(f"model {spec!r}: the workload's {key} must be callable or iterable, not {kind}")


def _workload_task(spec: str, model: nn.Module, task: Any) -> TaskInfo | None:
    if task is None:
        return _task_of(model)
    if isinstance(task, TaskInfo):
        return task
    if isinstance(task, Mapping):
        try:
            return TaskInfo(**task)
        except TypeError as err:
            raise ModelSpecError(f"model {spec!r}: the workload's task: {err}") from None
    raise ModelSpecError(f"model {spec!r}: the workload's task must be a TaskInfo or a dict, not {type(task).__name__}")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."
