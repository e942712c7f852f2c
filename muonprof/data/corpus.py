"""Byte-level text corpora that need no download: this Python's standard library, a file, or a folder.

Real text matters for the profiles: gradient spectra on noise tokens look nothing like those of a
language model learning real structure. The standard library is on every machine that runs Python,
so the default corpus is always there and needs no network.

Also the package's shared pieces (``DataError`` and the per-step generator) live here because every
other module in ``muonprof.data`` imports this one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch


class DataError(ValueError):
    """A data input that cannot be used; the one-line message says what to pass instead."""


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: nearby inputs (seed, seed + 1, step, step + 1) give unrelated seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends on (seed, step, stream) only.

    Batch k is then the same on every run whether or not batches 0..k-1 were drawn, which is what
    resuming a run and comparing two optimizers on the same data need. Always on the CPU so a batch
    is identical across devices.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DataError(f"batch step must be a non-negative int, got {step!r}")
    value = _mix64(_mix64(_mix64(seed & _MASK64) ^ (stream & _MASK64)) ^ step)
    return torch.Generator().manual_seed(value >> 1)


def check_positive(name: str, value: int) -> int:
    """Validate a size argument (batch_size, seq_len, ...) with a message naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive int, got {value!r}")
    return value


DOC_SEPARATOR = b"\n\x1e\n"
"""Between documents: ASCII record separator on its own line, a byte plain text never contains."""

_SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages"})
_STDLIB_SKIP_DIRS = _SKIP_DIRS | {"test", "tests", "idle_test"}
_SNIFF = 8192


@dataclass(frozen=True, eq=False)
class Corpus:
    """Byte tokens (uint8, vocabulary 256) split into train and validation, or ``kind="random"``.

    ``kind="random"`` holds no bytes: the batcher draws uniform token ids (speed tests only).
    """

    kind: str = "bytes"
    source: str = ""
    train: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    val: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    vocab_size: int | None = 256
    files: int = 0
    val_files: int = 0
    split: str = "file"  # "file": whole documents go to validation; "bytes": the tail of the bytes does
    sha: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind == "random":
            object.__setattr__(self, "vocab_size", None)
            if not self.description:
                object.__setattr__(self, "description", "random tokens (no corpus; speed tests only)")
        elif self.kind != "bytes":
            raise DataError(f"corpus kind must be 'bytes' or 'random', got {self.kind!r}")

    @property
    def num_bytes(self) -> int:
        return self.train.numel() + self.val.numel()


def load_corpus(
    source: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.05,
    max_bytes: int | None = 64 << 20,
) -> Corpus:
    """The corpus for ``source``: ``None``/"stdlib", "random", or a path to a text file or folder.

    A string "stdlib" or "random" names the built-in corpora; pass ``Path("random")`` or "./random" for a
    folder of that name. Files are read in sorted relative-path order and at most ``max_bytes`` of them
    (the file that crosses the cap is cut), so the result is deterministic. A file goes to validation iff
    crc32 of its relative path falls below ``val_fraction``, so adding a file never moves the others; when
    that leaves a split empty (one file, a few files) the last ``val_fraction`` of the bytes is the
    validation split instead. Results are cached per process: a second call with the same arguments is free
    (files edited meanwhile are not re-read).
    """
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction < 1.0):
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise DataError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    if isinstance(source, str) and not source.strip():
        raise DataError("empty data source: pass 'stdlib', 'random' or a path to a text file or folder")
    if source is None or (isinstance(source, str) and source in ("stdlib", "random")):
        key = source or "stdlib"
    else:
        path = Path(os.fspath(source)).expanduser()
        if not path.exists():
            raise DataError(f"data path {str(path)!r} does not exist: pass an existing text file or folder")
        key = str(path.resolve())
    return _load_cached(key, float(val_fraction), max_bytes)


@functools.lru_cache(maxsize=16)
def _load_cached(key: str, val_fraction: float, max_bytes: int | None) -> Corpus:
    if key == "random":
        return Corpus(kind="random", source="random")
    if key == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        paths = _walk(root, _STDLIB_SKIP_DIRS, suffix=".py")
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        label = f"Python {version} standard library source"
        source = f"stdlib:{root}"
    else:
        root = Path(key)
        if root.is_dir():
            paths = _walk(root, _SKIP_DIRS)
            label = f"text files under {root}"
        else:
            label = f"text file {root}"
            paths, root = [root], root.parent
        source = key
    docs = _read(root, paths, max_bytes)
    if not docs:
        raise DataError(f"no text found in {key!r}: pass a non-empty text file or a folder with text files")
    return _build(docs, val_fraction, source=source, label=label)


def _walk(root: Path, skip_dirs: frozenset[str], suffix: str | None = None) -> list[Path]:
    """Files under ``root`` sorted by relative path; hidden entries, caches and installed packages skipped.

    For the standard library the ``test``/``tests``/``idle_test`` folders are skipped too: distributions
    often strip them (so the corpus would vary by machine), and they hold deliberately odd inputs (bad
    encodings, huge generated literals, syntax errors) rather than representative code. ``site-packages``
    is third-party code, different in every environment.
    """
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or (suffix is not None and not name.endswith(suffix)):
                continue
            full = Path(dirpath, name)
            found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return [full for _, full in found]


def _looks_binary(head: bytes) -> bool:
    """NUL bytes or many control characters in the first few KB: images, archives, compiled files."""
    if b"\x00" in head:
        return True
    control = sum(head.count(bytes([c])) for c in range(32) if c not in (8, 9, 10, 12, 13, 27))
    return control > len(head) // 10


def _read(root: Path, paths: list[Path], max_bytes: int | None) -> list[tuple[str, bytes]]:
    """(relative path, bytes) of the text files in order until ``max_bytes``; unreadable files skipped."""
    docs: list[tuple[str, bytes]] = []
    left = max_bytes
    for path in paths:
        if left is not None and left <= 0:
            break
        try:
            with open(path, "rb") as handle:
                data = handle.read() if left is None else handle.read(left)
        except OSError:
            continue
        if not data or _looks_binary(data[:_SNIFF]):
            continue
        docs.append((path.relative_to(root).as_posix(), data))
        if left is not None:
            left -= len(data)
    return docs


def _in_val(relpath: str, val_fraction: float) -> bool:
    """Stable per-document coin: crc32 of the relative path, independent of the other files."""
    return zlib.crc32(relpath.encode("utf-8", "surrogateescape")) < val_fraction * 2**32


def _tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _build(docs: list[tuple[str, bytes]], val_fraction: float, *, source: str, label: str) -> Corpus:
    val_docs = [data for rel, data in docs if _in_val(rel, val_fraction)]
    train_docs = [data for rel, data in docs if not _in_val(rel, val_fraction)]
    split = "file"
    if val_fraction > 0 and (not val_docs or not train_docs):
        split = "bytes"
        whole = DOC_SEPARATOR.join(data for _, data in docs)
        n_val = min(max(1, int(len(whole) * val_fraction)), len(whole) - 1)
        train_bytes, val_bytes = whole[: len(whole) - n_val], whole[len(whole) - n_val :]
        n_val_files = 0
    else:
        train_bytes, val_bytes = DOC_SEPARATOR.join(train_docs), DOC_SEPARATOR.join(val_docs)
        n_val_files = len(val_docs)
    if not train_bytes:
        raise DataError(f"{label} is too small to split: pass more text or a smaller val_fraction")
    digest = hashlib.sha256()
    for part in (train_bytes, val_bytes):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)

    def mb(n: int) -> str:
        return f"{n / 1e6:.1f} MB"

    total = sum(len(data) for _, data in docs)
    description = (
        f"{label}, {len(docs):,} file{'' if len(docs) == 1 else 's'}, {mb(total)} "
        f"(train {mb(len(train_bytes))} / val {mb(len(val_bytes))}"
        f"{', split by bytes' if split == 'bytes' else ''})"
    )
    return Corpus(
        kind="bytes",
        source=source,
        train=_tensor(train_bytes),
        val=_tensor(val_bytes),
        vocab_size=256,
        files=len(docs),
        val_files=n_val_files,
        split=split,
        sha=digest.hexdigest()[:12],
        description=description,
    )
