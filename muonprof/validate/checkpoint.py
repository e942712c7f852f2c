"""Finished ``validate`` runs kept across an interruption, so that the same command again continues.

A validate race is many independent training runs, one per (contender, seed), each from a fresh workload
built from its seed: a finished run does not depend on any other. So after every finished run the command
writes all finished runs so far to a side file beside the results (``OUT.partial``, atomically: a Ctrl-C
or SIGKILL mid-write leaves the previous version), and a re-run with the same inputs trains only the runs
that are missing. The results file itself is still written once, at the end, when every run is there; the
side file is then removed.

"The same inputs" is a digest of everything a run's numbers depend on (model, profile bytes, contenders,
steps, time budget, evaluation interval, data, batch, sequence length, overrides, device, learning rates,
ranks, versions). The seed list is not part of it: a run is keyed by its own seed, so raising ``--seeds``
after an interruption reuses the seeds already run. A side file made with other inputs (or unreadable) is
not reused, and is replaced by the first run that finishes.

Reused runs are named in the results' ``meta["resumed_runs"]``: their timings were taken by an earlier
process (on a shared machine, under another load), which a reader comparing wall-clock numbers should know.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._files import finite_or_null, loads_json, write_json
from ..train import TrainResult

FORMAT = "muonprof.validate-runs/1"

RunKey = tuple[str, int]  # (contender, seed)


def partial_path(out: str | os.PathLike[str]) -> Path:
    """Where the finished runs of a validate writing ``out`` are kept until it completes."""
    target = Path(out)
    return target.with_name(target.name + ".partial")


def inputs_digest(inputs: Mapping[str, Any]) -> str:
    """A short stable digest of ``inputs`` (JSON with sorted keys; non-JSON values by ``str``)."""
    text = json.dumps(dict(inputs), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunStore:
    """The finished runs of one validate (``runs``), persisted to ``path`` after each :meth:`add`.

    ``ignored`` says why an existing file at ``path`` was not reused (other inputs, unreadable), else None.
    """

    def __init__(self, path: Path, key: str, runs: dict[RunKey, TrainResult], ignored: str | None = None) -> None:
        self.path, self.key, self.runs, self.ignored = path, key, runs, ignored

    @classmethod
    def open(cls, path: str | os.PathLike[str], inputs: Mapping[str, Any]) -> RunStore:
        """The runs stored at ``path`` for these ``inputs`` (none when the file is absent or not for them)."""
        target, key = Path(path), inputs_digest(inputs)
        if not target.is_file():
            return cls(target, key, {})
        try:
            data = loads_json(target.read_bytes(), where=str(target))
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            if data.get("key") != key:
                return cls(target, key, {}, ignored="made with other options")
            runs = {(str(r["contender"]), int(r["seed"])): TrainResult.from_dict(r) for r in data["runs"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return cls(target, key, {}, ignored=f"unreadable ({type(err).__name__})")
        return cls(target, key, runs)

    def add(self, contender: str, seed: int, result: TrainResult) -> None:
        """Keep one more finished run, and write them all (atomically) before the next run starts."""
        self.runs[(contender, seed)] = result
        document = {
            "format": FORMAT,
            "key": self.key,
            "runs": [{"contender": c, "seed": s, **r.to_dict()} for (c, s), r in self.runs.items()],
        }
        write_json(self.path, finite_or_null(document), what=str(self.path), indent=1)

    def remove(self) -> None:
        """Forget the runs (the results file now holds them)."""
        self.path.unlink(missing_ok=True)


__all__ = ["FORMAT", "RunKey", "RunStore", "inputs_digest", "partial_path"]
