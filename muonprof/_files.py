"""Writing results so that nothing already written is lost: atomic replace, and refusing early.

Every artifact (spectra, bench, profile, validate results) is written through a temp file in the target
directory and renamed over the target, so a reader sees the old file or the new one, never half of one,
and Ctrl-C mid-write leaves the old file intact. ``check_writable`` runs before a long job starts, so an
unwritable ``--out`` fails in a second instead of after an hour of training.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


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
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Raise OutputPathError unless ``path`` can be created or replaced (creating missing parent folders)."""
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"{target}: is a directory, expected a file path")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"{target}: cannot create folder {parent} ({err.strerror or err})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{target}: folder {parent} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"{target}: file exists and is not writable")
    return target


def safe_name(spec: str) -> str:
    """A file-name stem for a MODEL spec (``pkg.mod:build`` -> ``pkg.mod_build``; ``hf:/a/b`` -> ``b``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.rsplit("/", 1)[-1]).strip("_") or "model"
