"""The bench artifact (``muonprof.bench/2``): what ``bench`` writes and ``tune`` reads.

Plain JSON (it is small: costs per unique shape, measures per layer), written atomically at the end of
the run, so an interrupted bench leaves the previous file or none, never half of one. The document is
checked against ``bench.schema.Bench`` on save and on load (``muonprof schema bench`` prints its JSON
Schema); a ``muonprof.bench/1`` file is upgraded by the explicit migration ``bench/1 -> bench/2`` below.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import atomic_write, dumps_json, finite_or_null, loads_json
from ..artifacts import ArtifactKind, check_document, check_format, load_document, register
from .candidates import BASELINE, candidate_from_dict, candidate_label, state_bytes
from .cost import CostRecord
from .pareto import TARGET_ALIGNMENT, derive_fronts
from .schema import FORMAT, Bench, BenchV1


class BenchError(ValueError):
    """A bench file that cannot be used: missing, corrupt, or another format version; one line."""


@dataclass
class BenchResult:
    """Everything one bench run measured, plus what was derived from it (fronts, model summary)."""

    meta: dict[str, Any]
    layers: list[dict[str, Any]]  # name, matrix_shape, role, optimizer
    costs: list[CostRecord]
    accuracy: dict[str, dict[str, dict[str, Any]]]  # layer -> candidate label -> measures
    model_check: dict[str, Any] = field(default_factory=dict)
    fronts: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)  # "layers"/"roles" -> name
    summary: dict[str, Any] = field(default_factory=dict)

    def per_layer_costs(self) -> dict[tuple[int, int], dict[str, float]]:
        """(m, n) -> label -> one layer's seconds per step, for the candidates that were timed."""
        return per_layer_costs(self.costs)

    def per_layer_state(self) -> dict[tuple[int, int], dict[str, int]]:
        """(m, n) -> label -> Muon optimizer-state bytes of one layer under that candidate (float32)."""
        return per_layer_state(self.costs)

    def cost(self, shape: tuple[int, int], label: str) -> CostRecord | None:
        for c in self.costs:
            if c.shape == tuple(shape) and c.label == label:
                return c
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "meta": self.meta,
            "layers": self.layers,
            "costs": [c.to_json() for c in self.costs],
            "accuracy": self.accuracy,
            "model_check": self.model_check,
            "fronts": self.fronts,
            "summary": self.summary,
        }

    def dumps(self) -> str:
        """The file's text; a document the model refuses (a writer bug) never reaches the disk."""
        document = _finite(self.to_json())
        check_document(document, KIND, "bench data")
        return dumps_json(document, what="bench data", error=BenchError, indent=1)

    @classmethod
    def from_json(cls, data: Any, source: str = "bench data") -> BenchResult:
        """A result from a parsed bench document of any version this muonprof reads (migrated, validated)."""
        check_format(data, KIND, source)
        _check_times(data.get("costs"), source)
        _, document = load_document(data, KIND, source)
        return cls(
            meta=dict(document["meta"]),
            layers=[dict(layer) for layer in document["layers"]],
            costs=[CostRecord.from_json(c) for c in document["costs"]],
            accuracy={str(k): dict(v) for k, v in document["accuracy"].items()},
            model_check=dict(document.get("model_check") or {}),
            fronts=dict(document.get("fronts") or {}),
            summary=dict(document.get("summary") or {}),
        )


def per_layer_costs(costs: Iterable[CostRecord]) -> dict[tuple[int, int], dict[str, float]]:
    """(m, n) -> label -> one layer's seconds per step, for the candidates that were timed."""
    out: dict[tuple[int, int], dict[str, float]] = {}
    for c in costs:
        if c.per_layer_s is not None:
            out.setdefault(c.shape, {})[c.label] = c.per_layer_s
    return out


def per_layer_state(costs: Iterable[CostRecord]) -> dict[tuple[int, int], dict[str, int]]:
    """(m, n) -> label -> Muon optimizer-state bytes of one layer under that candidate (float32)."""
    out: dict[tuple[int, int], dict[str, int]] = {}
    for c in costs:
        out.setdefault(c.shape, {})[c.label] = c.state_bytes
    return out


KIND = register(
    ArtifactKind(
        name="bench",
        version=2,
        model=Bench,
        error=BenchError,
        what="bench file",
        rerun="muonprof bench",
        schema_package=__package__,
        models={1: BenchV1},
    )
)


@KIND.migration(1)
def bench_1_to_2(document: dict[str, Any]) -> dict[str, Any]:
    """bench/2 reports optimizer state everywhere. bench/1 gained these figures without a version change,
    so a /1 file may lack them: every cost gets ``state_bytes`` (a function of shape and candidate alone),
    and a file with layers but no ``summary.default_state_bytes`` gets its fronts (with ``roles_state``)
    and summary derived from its costs and accuracy, exactly as a fresh bench derives them. A /1 file that
    has them is only re-tagged."""
    for cost in document["costs"]:
        if cost.get("state_bytes") is None:
            cost["state_bytes"] = state_bytes(cost["shape"], candidate_from_dict(cost["config"]))
    summary = document.get("summary") or {}
    if document["layers"] and "default_state_bytes" not in summary:
        records = [CostRecord.from_json(c) for c in document["costs"]]
        document["fronts"], document["summary"] = derive_fronts(
            document["layers"],
            document["accuracy"],
            per_layer_costs(records),
            per_layer_state(records),
            candidate_label(BASELINE),
            float(summary.get("target_alignment") or TARGET_ALIGNMENT),
        )
    return document


def _check_times(costs: Any, source: str) -> None:
    """Refuse a timing that is not a number >= 0 (a hand-edited or corrupt file), naming the field: tune would
    otherwise build a profile from it and then reject its own output."""
    if not isinstance(costs, list):
        return  # the structural check in from_json reports it
    for i, cost in enumerate(costs):
        timing = cost.get("time_s") if isinstance(cost, dict) else None
        if not isinstance(timing, dict):
            continue
        for key, value in timing.items():
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value < 0:
                label = cost.get("label", "?")
                raise BenchError(f"{source}: costs[{i}] ({label}).time_s.{key} = {value!r}: must be a number >= 0")


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null (a diverged candidate has no number to report)."""
    return finite_or_null(value)


def save_bench(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    """Write the artifact atomically."""
    text = result.dumps() + "\n"
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def load_bench(path: str | os.PathLike[str]) -> BenchResult:
    """Read and check a bench file; every problem is a BenchError with a one-line message."""
    source = Path(path)
    if not source.is_file():
        raise BenchError(f"{source}: no such bench file")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise BenchError(f"{source}: not a muonprof bench file (cannot be read: {reason})") from None
    try:
        data = loads_json(text, where=str(source), error=BenchError)
    except BenchError as err:
        reason = str(err).removeprefix(f"{source}: ")
        raise BenchError(f"{source}: not a muonprof bench file ({reason})") from None
    return BenchResult.from_json(data, str(source))
