"""Writing results so that nothing already written is lost: atomic replace, and refusing early.

Every artifact (spectra, bench, profile, validate results) is written through a temp file in the target
directory and renamed over the target, so a reader sees the old file or the new one, never half of one,
and Ctrl-C mid-write leaves the old file intact. ``check_writable`` runs before a long job starts, so an
unwritable ``--out`` fails in a second instead of after an hour of training.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the path and the reason."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the result the permissions a plain open() would (or the old file's).
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable: without an fsync of the folder a crash can lose the new entry."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows, where folders cannot be opened: the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and /proc-like mounts) refuse fsync on folders
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask can only set it, so reading
    it that way briefly gives every other thread a zero umask); on Linux from /proc/self/status."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_IMPORT


def _read_umask_once() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _read_umask_once()  # at import, before any thread of ours runs


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Raise OutputPathError unless ``path`` can be created or replaced (creating missing parent folders)."""
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"{target}: is a directory, expected a file path")
    parent = target.parent
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _CREATED.extend(reversed(missing))  # deepest last: removed first by remove_created_folders
    except OSError as err:
        raise OutputPathError(f"{target}: cannot create folder {parent} ({err.strerror or err})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{target}: folder {parent} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"{target}: file exists and is not writable")
    return target


_CREATED: list[Path] = []
"""Folders ``check_writable`` created for this process's outputs, so a failing run can take them back."""


def remove_created_folders() -> None:
    """Remove the folders ``check_writable`` created that are still empty (a run that failed before writing
    anything): bad input must not leave empty ``--out`` folders behind. A folder holding a file is kept."""
    while _CREATED:
        folder = _CREATED.pop()
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when empty


def safe_name(spec: str) -> str:
    """A file-name stem for a MODEL spec (``pkg.mod:build`` -> ``pkg.mod_build``; ``hf:/a/b`` -> ``b``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.rsplit("/", 1)[-1]).strip("_") or "model"


# Strict JSON: what we write any strict parser can read back, and what we read is checked the same way.

MAX_JSON_DEPTH = 64
"""Deepest nesting any muonprof JSON document needs is under 10; a deeper input is refused with one line
before recursive code (pydantic, our own walkers) meets it and raises RecursionError."""


def nonfinite_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first NaN/infinite float in ``value`` (dicts, lists, tuples), or None."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return f"{where or '(document)'} = {item}"
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list | tuple):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests (a scalar is 0), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def dumps_json(value: Any, *, what: str, error: type[Exception] = ValueError, **kwargs: Any) -> str:
    """``json.dumps(value, allow_nan=False)``; a NaN/infinity is refused as ``error`` naming the field."""
    bad = nonfinite_field(value)
    if bad is not None:
        raise error(f"{what}: {bad} is not a finite number; JSON cannot store it")
    return json.dumps(value, allow_nan=False, **kwargs)


class _Constant:
    """Stands in for a ``NaN``/``Infinity`` literal while parsing, so the refusal can name its field."""

    def __init__(self, name: str) -> None:
        self.name = name


def _first_constant(value: Any) -> str | None:
    """The path of the first parsed ``NaN``/``Infinity`` literal in ``value`` and the literal, or None."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, _Constant):
            return f"{where or '(document)'} = {item.name}"
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return None


def loads_json(text: str | bytes, *, where: str, error: type[Exception] = ValueError) -> Any:
    """Parse strict JSON: ``NaN``/``Infinity`` literals (named by field), syntax errors and nesting deeper
    than ``MAX_JSON_DEPTH`` are refused as ``error`` with a one-line message naming ``where``."""
    try:
        data = json.loads(text, parse_constant=_Constant)
    except json.JSONDecodeError as err:
        raise error(f"{where}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise error(f"{where}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    bad = _first_constant(data)
    if bad is not None:
        raise error(f"{where}: not standard JSON: {bad} (NaN/Infinity are not JSON numbers; use null)")
    return data


def write_json(
    path: str | os.PathLike[str], value: Any, *, what: str, error: type[Exception] = ValueError, **kwargs: Any
) -> Path:
    """Serialize strictly (refusing non-finite numbers, naming the field) and only then write atomically."""
    text = dumps_json(value, what=what, error=error, **kwargs) + "\n"
    data = text.encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN/infinite float replaced by None (dict keys as str), for documents where a
    diverged or untimed number legitimately has no value (bench times, validate losses, ``--json`` output)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value
