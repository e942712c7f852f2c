"""The numbers ``muonprof validate`` reports, and its results file (format ``muonprof.validate/1``).

Two comparisons, per seed, then across seeds:

- **Equal steps.** Final train loss: the mean over the last 10% of the steps run (at least one step), which
  smooths batch-to-batch noise; final val loss: the evaluation after the last step (at ``--steps`` unless a
  time budget stopped the run earlier; ``steps_done`` says where).
- **Equal wall-clock.** T = the smallest total training time (eval excluded) among the contenders that did
  not diverge (the fastest contender's whole run), so every contender has a measurement at or before T.
  Each contender's value is its val
  loss at the **latest evaluation whose cumulative training time is <= T** (a real measurement, no
  interpolation; for the contender that defines T it is its final loss; the others' is taken up to one
  ``--eval-every`` interval before T, which favours no one systematically as long as eval points are dense).

Across seeds, each number is reported as mean, sample std (n-1), min and max. **Tie rule**: on a metric, the
contender with the lowest mean wins outright only if its lead over every other contender is at least the
larger of the two standard deviations; a contender whose mean is within that noise of the best is tied with
it. With one seed there is no noise estimate: the lowest value is reported as "lowest (one seed)" and no tie
is called (run ``--seeds 3`` for a verdict). A contender that diverged in any seed has no value on either
metric and cannot win.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import atomic_write
from ..train import EvalPoint, TrainResult

FORMAT = "muonprof.validate/1"
FINAL_TRAIN_FRACTION = 0.1
METRICS = {
    "final_val_loss": "val loss at equal steps",
    "equal_wall_val_loss": "val loss at equal wall-clock",
}
RULES = {
    "final_train_loss": "mean train loss over the last 10% of the steps run (at least 1)",
    "final_val_loss": "val loss of the evaluation after the last step",
    "equal_wall": (
        "T = least total training time (eval excluded) among non-diverged contenders, per seed; each "
        "contender's val loss at its latest evaluation with cumulative training time <= T (no interpolation)"
    ),
    "spread": "mean, sample std (n-1), min, max over seeds",
    "tie": (
        "the lowest mean wins only if its lead over a contender is >= the larger of the two stds; otherwise "
        "they tie; with one seed no tie is called (no noise estimate)"
    ),
    "diverged": "a contender that diverged in any seed has no value and cannot win",
    "grad_evals": (
        "forward/backward passes actually made (closure calls; a storm-momentum step makes 2); equal steps "
        "is then not equal gradient evaluations: compare the curves against grad_evals too"
    ),
}


class ResultsFormatError(ValueError):
    """A file that is not a muonprof.validate/1 results file."""


@dataclass
class ContenderRuns:
    """One contender: how it was configured and its run per seed (or why it was skipped)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    runs: dict[int, TrainResult] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def diverged(self) -> dict[int, int]:
        """``{seed: step}`` for the seeds in which it diverged."""
        return {s: r.diverged_at for s, r in self.runs.items() if r.diverged_at is not None}

    @property
    def status(self) -> str:
        if self.skipped is not None:
            return f"skipped: {self.skipped}"
        bad = self.diverged
        if bad:
            seed, step = next(iter(bad.items()))
            more = f" (+{len(bad) - 1} more seeds)" if len(bad) > 1 else ""
            return f"diverged at {step}" + (f" (seed {seed})" if len(self.runs) > 1 else "") + more
        return "ok"


@dataclass
class ValidationResult:
    meta: dict[str, Any]
    seeds: list[int]
    contenders: dict[str, ContenderRuns]
    summary: dict[str, Any] = field(default_factory=dict)

    def summarize(self) -> dict[str, Any]:
        self.summary = summarize(self.contenders, self.seeds)
        return self.summary

    def to_dict(self, *, curves: bool = True) -> dict[str, Any]:
        contenders: dict[str, Any] = {}
        for name, c in self.contenders.items():
            entry: dict[str, Any] = {"config": c.config, "status": c.status, "skipped": c.skipped}
            if curves:
                entry["runs"] = [{"seed": s, **r.to_dict()} for s, r in c.runs.items()]
            contenders[name] = entry
        return {
            "format": FORMAT,
            "meta": self.meta,
            "seeds": self.seeds,
            "contenders": contenders,
            "summary": self.summary or summarize(self.contenders, self.seeds),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValidationResult:
        if data.get("format") != FORMAT:
            raise ResultsFormatError(f"not a {FORMAT} results file (format: {data.get('format')!r})")
        contenders = {}
        for name, entry in data["contenders"].items():
            runs = {int(r["seed"]): TrainResult.from_dict(r) for r in entry.get("runs", [])}
            contenders[name] = ContenderRuns(name, dict(entry.get("config") or {}), runs, entry.get("skipped"))
        return cls(dict(data["meta"]), [int(s) for s in data["seeds"]], contenders, dict(data.get("summary") or {}))


def save_results(result: ValidationResult, path: str | os.PathLike[str]) -> Path:
    """Write the results JSON atomically (strict JSON: non-finite numbers are stored as null)."""
    text = json.dumps(_strict(result.to_dict()), indent=1, allow_nan=False) + "\n"
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def load_results(path: str | os.PathLike[str]) -> ValidationResult:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsFormatError(f"{path}: cannot read results ({err})") from None
    if not isinstance(data, dict):
        raise ResultsFormatError(f"{path}: not a {FORMAT} results file")
    return ValidationResult.from_dict(data)


# ----------------------------------------------------------------------------------------------- numbers


def equal_wall_clock(runs: Mapping[str, TrainResult]) -> tuple[float | None, dict[str, EvalPoint | None]]:
    """T and each contender's eval point for one seed (see the module docstring for the rule).

    Contenders that diverged, ran no step or have no validation loss get None; T is None when no
    contender qualifies.
    """
    usable = {n: r for n, r in runs.items() if r.diverged_at is None and r.steps_done > 0}
    if not usable:
        return None, {n: None for n in runs}
    T = min(r.total_wall_s for r in usable.values())
    points: dict[str, EvalPoint | None] = {}
    for name, r in runs.items():
        if name not in usable:
            points[name] = None
            continue
        tolerance = 1e-9 * max(1.0, T)
        eligible = [e for e in r.evals if e.wall_s <= T + tolerance and e.val_loss is not None]
        points[name] = eligible[-1] if eligible else None
    return T, points


def spread(values: Sequence[float]) -> dict[str, Any] | None:
    """Mean, sample std (None for one value), min, max, n; None for no values."""
    if not values:
        return None
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` vs ``b`` (spreads of a lower-is-better metric): delta = mean_b - mean_a and the call."""
    delta = b["mean"] - a["mean"]
    stds = [s["std"] for s in (a, b) if s.get("std") is not None]
    noise = max(stds) if len(stds) == 2 else None
    if noise is None:
        call = "one seed: no noise estimate"
    elif abs(delta) < noise:
        call = "tie"
    else:
        call = "better" if delta > 0 else "worse"
    return {"delta": delta, "noise": noise, "call": call}


def summarize(contenders: Mapping[str, ContenderRuns], seeds: Sequence[int]) -> dict[str, Any]:
    """The table numbers, the equal-wall-clock accounting per seed and the verdict per metric."""
    active = {n: c for n, c in contenders.items() if c.skipped is None and c.runs}
    per_seed: dict[str, Any] = {}
    wall_values: dict[str, list[float]] = {n: [] for n in active}
    for seed in seeds:
        runs = {n: c.runs[seed] for n, c in active.items() if seed in c.runs}
        T, points = equal_wall_clock(runs)
        per_seed[str(seed)] = {
            "T_s": T,
            "points": {
                n: None if p is None else {"step": p.step, "wall_s": p.wall_s, "val_loss": p.val_loss}
                for n, p in points.items()
            },
        }
        for n, p in points.items():
            if p is not None and p.val_loss is not None:
                wall_values[n].append(p.val_loss)

    rows: dict[str, Any] = {}
    for name, c in contenders.items():
        row: dict[str, Any] = {"status": c.status, "skipped": c.skipped}
        if name in active:
            ok = not c.diverged
            results = list(c.runs.values())
            train_losses = [r.final_train_loss(FINAL_TRAIN_FRACTION) for r in results]
            val_losses = [r.final_val_loss for r in results]
            complete = ok and len(wall_values[name]) == len(results)
            row.update(
                steps_done=[r.steps_done for r in results],
                diverged_at={str(s): k for s, k in c.diverged.items()},
                final_train_loss=spread([v for v in train_losses if v is not None]) if ok else None,
                final_val_loss=spread([v for v in val_losses if v is not None])
                if ok and all(v is not None for v in val_losses)
                else None,
                equal_wall_val_loss=spread(wall_values[name]) if complete else None,
                median_step_s=_median([r.median_step_s for r in results]),
                median_optimizer_step_s=_median([r.median_optimizer_step_s for r in results]),
                total_train_s=_median([r.total_wall_s for r in results]),
                total_grad_evals=_median([r.total_grad_evals for r in results]),
                grad_evals_per_step=_median([r.total_grad_evals / r.steps_done for r in results if r.steps_done]),
                peak_memory_bytes=max((r.peak_memory_bytes or 0 for r in results), default=0) or None,
                peak_memory_kind=results[0].peak_memory_kind,
                state_bytes=max(r.state_bytes for r in results),
            )
        rows[name] = row

    verdicts = {metric: _verdict(rows, metric) for metric in METRICS}
    return {"rows": rows, "equal_wall": per_seed, "verdicts": verdicts, "rules": RULES}


def _verdict(rows: Mapping[str, Any], metric: str) -> dict[str, Any] | None:
    candidates = {n: r[metric] for n, r in rows.items() if r.get(metric)}
    if not candidates:
        return None
    best = min(candidates, key=lambda n: candidates[n]["mean"])
    pairs = {n: compare(candidates[best], s) for n, s in candidates.items() if n != best}
    ties = [n for n, p in pairs.items() if p["call"] == "tie"]
    single_seed = any(p["noise"] is None for p in pairs.values())
    if not pairs:
        call = "only contender"
    elif single_seed:
        call = "lowest (one seed)"
    elif ties:
        call = "tie"
    else:
        call = "win"
    runner_up = min(pairs, key=lambda n: pairs[n]["delta"]) if pairs else None
    return {
        "metric": METRICS[metric],
        "best": best,
        "call": call,
        "tied_with": ties,
        "runner_up": runner_up,
        "margin": pairs[runner_up]["delta"] if runner_up else None,
        "pairs": pairs,
    }


def verdict_line(verdict: Mapping[str, Any] | None) -> str:
    """One sentence for a metric's verdict."""
    if verdict is None:
        return "no contender has a value (all diverged or skipped)"
    best, call = verdict["best"], verdict["call"]
    metric = verdict["metric"]
    if call == "only contender":
        return f"{metric}: {best} (the only contender with a value)"
    margin = verdict["margin"]
    runner = verdict["runner_up"]
    if call == "tie":
        tied = ", ".join(verdict["tied_with"])
        noise = verdict["pairs"][verdict["tied_with"][0]]["noise"]
        return f"{metric}: tie: {best} and {tied} are within the seed noise (std {noise:.4f})"
    if call == "win":
        noise = verdict["pairs"][runner]["noise"]
        return f"{metric}: {best} wins, {margin:.4f} below {runner} (seed std {noise:.4f})"
    return f"{metric}: {best} lowest, {margin:.4f} below {runner} (one seed: no noise estimate, no tie called)"


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _strict(value: Any) -> Any:
    """Replace non-finite floats by None so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


__all__ = [
    "FORMAT",
    "METRICS",
    "RULES",
    "ContenderRuns",
    "ResultsFormatError",
    "ValidationResult",
    "compare",
    "equal_wall_clock",
    "load_results",
    "save_results",
    "spread",
    "summarize",
    "verdict_line",
]
