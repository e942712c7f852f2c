"""The numbers ``muonprof validate`` reports, and its results file (format ``muonprof.validate/1``).

Every contender of a seed starts from the same weights and sees the same batches, so contenders are
compared **per seed** against one **reference** contender (``default``, ProfiledMuon's default recipe, when
it ran; else the first contender; ``--reference NAME`` picks another), with the paired rule of
``muonprof.stats`` (the one the tuner's race uses):

- **Equal steps.** Per seed, the difference ``d_s`` = contender's val loss - reference's val loss at the
  latest evaluation step both runs have (the last step, unless a time budget stopped one run earlier:
  then the last eval step they share). Across seeds: mean of ``d``, its one-sided 95% upper bound
  ``mean + t(0.95, n-1) * sd / sqrt(n)``, and the verdict at margin δ (``--max-loss-increase``, default
  ``stats.DEFAULT_MARGIN`` = 0.01 nats): **better** (bound < 0), **non-inferior** (bound < δ), **worse**
  (the lower bound > δ), else **inconclusive**. One seed gives the difference but no bound and no verdict.
- **Equal wall-clock.** T = the smallest total training time (eval excluded) among the contenders that did
  not diverge (the fastest contender's whole run), so every contender has a measurement at or before T.
  Each contender's value is its val loss at the **latest evaluation whose cumulative training time is <= T**
  (a real measurement, no interpolation; for the contender that defines T it is its final loss; the others'
  is taken up to one ``--eval-every`` interval before T, which favours no one systematically as long as eval
  points are dense). Paired against the reference's value at the same T, same rule and δ as equal steps.
- **Steps- and time-to-target** (AlgoPerf's measure). Per seed the target is the reference's own final val
  loss; a contender reaches it at its first evaluation at or below the target (``stats.first_reaching``):
  that eval's step and cumulative training time. The reference's own time is its first eval at or below its
  final loss (possibly before its last step). Time-to-target speedup per seed = reference's time /
  contender's time; across seeds: geometric mean, min and max over the seeds where both reached a target
  after step 0, beside how many seeds the contender reached it in (one that missed a seed is not faster).
- **Optimizer step.** The median over seeds of each run's median ``optimizer.step()`` time, and its ratio
  to the reference's (a timing on a shared machine: see the load average in ``meta``).

Final train loss: the mean over the last 10% of the steps run (at least one step), which smooths
batch-to-batch noise. Each number is also reported across seeds as mean, sample std (n-1), min and max (the
spread, for reading: the verdict is the paired rule above, never a comparison of these means). A contender
that diverged in any seed has no value, its verdict is ``diverged``, and it reaches no target in that seed.

The summary is derived from the runs and recomputed whenever a file is loaded (with the reference and δ it
records, if any), so a file written by an earlier version is re-judged by the current rule. The document is
checked against ``validate.schema.ValidateDocument`` on save and load (``muonprof schema validate``).
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import finite_or_null, loads_json, write_json
from ..artifacts import ArtifactKind, check_document, load_document, register
from ..stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MARGIN,
    check_margin,
    first_reaching,
    geometric_mean,
    paired_comparison,
)
from ..train import EvalPoint, TrainResult
from .schema import FORMAT, ValidateDocument

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
    "spread": "mean, sample std (n-1), min, max over seeds (for reading; the verdict is the paired rule)",
    "reference": "the contender every other is judged against: --reference, else 'default' if it ran, else the first",
    "paired": (
        "per seed d = contender - reference (val loss; lower is better): at equal steps at the latest eval step "
        "both runs have, at equal wall-clock at the seed's T; mean of d, sample std, one-sided 95% bounds "
        "mean -/+ t(0.95, n-1) sd / sqrt(n)"
    ),
    "verdict": (
        "better: upper bound < 0; non-inferior: upper bound < margin (--max-loss-increase, nats); worse: lower "
        "bound > margin; else inconclusive; one seed: the difference only, no bound, no verdict; diverged: "
        "the contender diverged in a seed (no value); the reference diverged or has no value: no verdict"
    ),
    "to_target": (
        "target per seed = the reference's final val loss; steps and time = the first evaluation at or below it "
        "(step, cumulative training time with eval excluded), or not reached; a diverged run reaches nothing"
    ),
    "speedup": (
        "time-to-target speedup per seed = reference's time / contender's time; geometric mean, min, max over "
        "the seeds where both reached the target after step 0; 'reached' counts the seeds the contender did"
    ),
    "optimizer_step_ratio": "median (over seeds) of each run's median optimizer.step() time / the reference's",
    "diverged": "a contender that diverged in any seed has no value, a 'diverged' verdict and reaches no target",
    "grad_evals": (
        "forward/backward passes actually made (closure calls; a storm-momentum step makes 2); equal steps "
        "is then not equal gradient evaluations: compare the curves against grad_evals too"
    ),
}
NO_VALUE = ("diverged", "no value", "no reference")


class ResultsFormatError(ValueError):
    """A file that is not a muonprof.validate/1 results file."""


KIND = register(
    ArtifactKind(
        name="validate",
        version=1,
        model=ValidateDocument,
        error=ResultsFormatError,
        what="validate results file",
        rerun="muonprof validate",
        schema_package=__package__,
    )
)


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

    def summarize(self, reference: str | None = None, margin: float | None = None) -> dict[str, Any]:
        """(Re)compute the summary. ``reference``/``margin`` None: the ones the current summary records (a
        loaded file's), else the defaults (``default`` or the first contender; ``DEFAULT_MARGIN``)."""
        reference = reference if reference is not None else self.summary.get("reference")
        margin = margin if margin is not None else self.summary.get("margin", DEFAULT_MARGIN)
        self.summary = summarize(self.contenders, self.seeds, reference=reference, margin=margin)
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
    def from_dict(cls, data: Mapping[str, Any], source: str = "results") -> ValidationResult:
        """Read the runs back and re-summarize them by the current rule (the stored summary only lends its
        reference and margin, so a file of an earlier version is judged as a new one would be)."""
        _, document = load_document(data, KIND, source)
        contenders = {}
        for name, entry in document["contenders"].items():
            runs = {int(r["seed"]): TrainResult.from_dict(r) for r in entry.get("runs", [])}
            contenders[name] = ContenderRuns(name, dict(entry.get("config") or {}), runs, entry.get("skipped"))
        result = cls(dict(document["meta"]), [int(s) for s in document["seeds"]], contenders, {})
        stored = document.get("summary") or {}
        try:
            result.summarize(reference=stored.get("reference"), margin=stored.get("margin"))
        except ValueError as err:  # summarize's own refusals: a stored reference that did not run, a bad margin
            raise ResultsFormatError(f"{source}: not a readable {FORMAT} results file ({err})") from None
        return result


def save_results(result: ValidationResult, path: str | os.PathLike[str]) -> Path:
    """Write the results JSON atomically (strict JSON: non-finite numbers are stored as null); a document the
    model refuses (a writer bug) never reaches the disk."""
    document = _strict(result.to_dict())
    check_document(document, KIND, str(path))
    return write_json(path, document, what=str(path), error=ResultsFormatError, indent=1)


def load_results(path: str | os.PathLike[str]) -> ValidationResult:
    """Read, check and re-judge a results file; every problem is a ResultsFormatError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsFormatError(f"{path}: cannot read results ({type(err).__name__})") from None
    data = loads_json(text, where=str(path), error=ResultsFormatError)
    return ValidationResult.from_dict(data, str(path))


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


def choose_reference(names: Sequence[str], requested: str | None = None) -> str:
    """The contender the others are judged against: ``requested`` (which must be one of ``names``), else
    ``default-lr`` (the default recipe with the profile's own learning rates: the fair reference for a tuned
    profile) or ``default`` (ProfiledMuon's default recipe) when present, else the first."""
    if requested is not None:
        if requested not in names:
            raise ValueError(
                f"--reference {requested!r} is not a contender of this run (contenders: {', '.join(names) or 'none'})"
            )
        return requested
    if not names:
        raise ValueError("no contenders to choose a reference from")
    for preferred in ("default-lr", "default"):
        if preferred in names:
            return preferred
    return names[0]


def equal_steps_values(candidate: TrainResult, reference: TrainResult) -> tuple[int, float, float] | None:
    """``(step, candidate loss, reference loss)`` at the latest eval step both runs have a finite val loss
    at (their last step unless a time budget stopped one earlier); None if either diverged or none is shared."""
    if candidate.diverged_at is not None or reference.diverged_at is not None:
        return None
    ours, theirs = _eval_losses(candidate), _eval_losses(reference)
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        return None
    step = shared[-1]
    return step, ours[step], theirs[step]


def summarize(
    contenders: Mapping[str, ContenderRuns],
    seeds: Sequence[int],
    *,
    reference: str | None = None,
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Any]:
    """The table numbers, the equal-wall-clock accounting per seed, the paired verdicts against the reference
    at margin ``margin`` and steps-/time-to-target (the rules are in the module docstring and ``RULES``).

    Raises ValueError for a ``reference`` that is not a contender or a negative / non-finite ``margin``.
    """
    margin = check_margin(margin, "--max-loss-increase")
    active = {n: c for n, c in contenders.items() if c.skipped is None and c.runs}
    if reference is not None:
        ref: str | None = choose_reference(list(contenders), reference)
    else:
        ref = choose_reference(list(active)) if active else None
    per_seed, wall_values = _equal_wall_per_seed(active, seeds)
    rows = {name: _row(c, name in active, wall_values.get(name, [])) for name, c in contenders.items()}
    ref_runs = active.get(ref) if ref is not None else None
    ref_step = rows[ref].get("median_optimizer_step_s") if ref is not None else None
    for row in rows.values():
        mine = row.get("median_optimizer_step_s")
        row["optimizer_step_ratio"] = mine / ref_step if mine is not None and ref_step else None

    verdicts = {
        "final_val_loss": _metric_verdict("final_val_loss", active, ref, ref_runs, seeds, margin, _equal_steps_pairs),
        "equal_wall_val_loss": _metric_verdict(
            "equal_wall_val_loss", active, ref, ref_runs, seeds, margin, _equal_wall_pairs(per_seed)
        ),
    }
    return {
        "rows": rows,
        "equal_wall": per_seed,
        "reference": ref,
        "margin": margin,
        "confidence": DEFAULT_CONFIDENCE,
        "seeds": len(seeds),
        "verdicts": verdicts,
        "to_target": _to_target(active, ref_runs, seeds),
        "rules": RULES,
    }


def _eval_losses(run: TrainResult) -> dict[int, float]:
    return {e.step: float(e.val_loss) for e in run.evals if e.val_loss is not None and math.isfinite(e.val_loss)}


def _equal_wall_per_seed(
    active: Mapping[str, ContenderRuns], seeds: Sequence[int]
) -> tuple[dict[str, Any], dict[str, list[float]]]:
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
    return per_seed, wall_values


def _row(c: ContenderRuns, active: bool, wall_values: list[float]) -> dict[str, Any]:
    row: dict[str, Any] = {"status": c.status, "skipped": c.skipped}
    if not active:
        return row
    ok = not c.diverged
    results = list(c.runs.values())
    train_losses = [r.final_train_loss(FINAL_TRAIN_FRACTION) for r in results]
    val_losses = [r.final_val_loss for r in results]
    complete = ok and len(wall_values) == len(results)
    row.update(
        steps_done=[r.steps_done for r in results],
        diverged_at={str(s): k for s, k in c.diverged.items()},
        final_train_loss=spread([v for v in train_losses if v is not None]) if ok else None,
        final_val_loss=spread([v for v in val_losses if v is not None])
        if ok and all(v is not None for v in val_losses)
        else None,
        equal_wall_val_loss=spread(wall_values) if complete else None,
        median_step_s=_median([r.median_step_s for r in results]),
        median_optimizer_step_s=_median([r.median_optimizer_step_s for r in results]),
        total_train_s=_median([r.total_wall_s for r in results]),
        total_grad_evals=_median([r.total_grad_evals for r in results]),
        grad_evals_per_step=_median([r.total_grad_evals / r.steps_done for r in results if r.steps_done]),
        peak_memory_bytes=max((r.peak_memory_bytes or 0 for r in results), default=0) or None,
        peak_memory_kind=results[0].peak_memory_kind,
        state_bytes=max(r.state_bytes for r in results),
    )
    return row


# A metric's pairing for one seed: (name, contender, reference name, reference, seed) -> (contender's value,
# reference's value, where it was read) or None when the seed has no pair of values.
PairValues = tuple[float, float, dict[str, Any]]
Pairing = Callable[[str, ContenderRuns, str, ContenderRuns, int], PairValues | None]


def _equal_steps_pairs(
    name: str, cand: ContenderRuns, ref_name: str, ref: ContenderRuns, seed: int
) -> PairValues | None:
    point = equal_steps_values(cand.runs[seed], ref.runs[seed])
    return None if point is None else (point[1], point[2], {"step": point[0]})


def _equal_wall_pairs(per_seed: Mapping[str, Any]) -> Pairing:
    def pair(name: str, cand: ContenderRuns, ref_name: str, ref: ContenderRuns, seed: int) -> PairValues | None:
        accounting = per_seed[str(seed)]
        mine, theirs = accounting["points"].get(name), accounting["points"].get(ref_name)
        if mine is None or theirs is None:
            return None
        return mine["val_loss"], theirs["val_loss"], {"T_s": accounting["T_s"]}

    return pair


def _metric_verdict(
    metric: str,
    active: Mapping[str, ContenderRuns],
    ref_name: str | None,
    ref: ContenderRuns | None,
    seeds: Sequence[int],
    margin: float,
    pairing: Pairing,
) -> dict[str, Any]:
    """Every active contender but the reference, paired against it on one metric (see ``RULES``)."""
    out: dict[str, Any] = {
        "metric": METRICS[metric],
        "reference": ref_name,
        "margin": margin,
        "confidence": DEFAULT_CONFIDENCE,
        "note": None,
        "pairs": {},
    }
    if ref is None:
        out["note"] = (
            "no reference ran (skipped or no contender)"
            if ref_name is None
            else (f"the reference {ref_name!r} was skipped: no verdict")
        )
        return out
    if ref.diverged:
        seed, step = next(iter(ref.diverged.items()))
        out["note"] = f"the reference {ref_name!r} diverged (seed {seed}, step {step}): no verdict"
    for name, cand in active.items():
        if name == ref_name:
            continue
        out["pairs"][name] = _pair_entry(name, cand, ref_name, ref, seeds, margin, pairing)
    return out


def _pair_entry(
    name: str,
    cand: ContenderRuns,
    ref_name: str,
    ref: ContenderRuns,
    seeds: Sequence[int],
    margin: float,
    pairing: Pairing,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "verdict": None, "note": None, "seeds": [], "candidate": [], "reference": [], "points": [],
        "n": 0, "diffs": [], "mean_diff": None, "std_diff": None, "upper_bound": None, "lower_bound": None,
        "margin": margin, "confidence": DEFAULT_CONFIDENCE,
    }  # fmt: skip
    if cand.diverged:
        seed, step = next(iter(cand.diverged.items()))
        entry.update(verdict="diverged", note=f"diverged in seed {seed} at step {step}: no value")
        return entry
    if ref.diverged:
        entry.update(verdict="no reference", note=f"the reference {ref_name!r} diverged: no value to pair with")
        return entry
    for seed in seeds:
        if seed not in cand.runs or seed not in ref.runs:
            continue
        pair = pairing(name, cand, ref_name, ref, seed)
        if pair is None:
            entry.update(verdict="no value", note=f"seed {seed} has no value to pair (no validation loss)")
            return entry
        entry["seeds"].append(seed)
        entry["candidate"].append(pair[0])
        entry["reference"].append(pair[1])
        entry["points"].append(pair[2])
    if not entry["seeds"]:
        entry.update(verdict="no value", note="no seed in common with the reference")
        return entry
    comparison = paired_comparison(entry["candidate"], entry["reference"], margin)
    entry.update(comparison.to_json())
    return entry


def _to_target(active: Mapping[str, ContenderRuns], ref: ContenderRuns | None, seeds: Sequence[int]) -> dict[str, Any]:
    """Steps- and time-to-target per contender and seed, target = the reference's final val loss per seed."""
    targets: dict[str, float | None] = {}
    for seed in seeds:
        run = ref.runs.get(seed) if ref is not None else None
        value = run.final_val_loss if run is not None else None
        targets[str(seed)] = value if value is not None and math.isfinite(value) else None
    ref_points = {s: _reach(ref.runs.get(s), targets[str(s)]) if ref is not None else None for s in seeds}
    contenders = {}
    for name, c in active.items():
        per_seed: dict[str, Any] = {}
        for seed in seeds:
            per_seed[str(seed)] = _seed_to_target(c.runs.get(seed), targets[str(seed)], ref_points[seed])
        contenders[name] = _to_target_summary(per_seed)
    return {"reference": None if ref is None else ref.name, "targets": targets, "contenders": contenders}


def _reach(run: TrainResult | None, target: float | None) -> EvalPoint | None:
    if run is None or target is None or run.diverged_at is not None:
        return None
    return first_reaching(run.evals, target)


def _seed_to_target(run: TrainResult | None, target: float | None, ref_point: EvalPoint | None) -> dict[str, Any]:
    out: dict[str, Any] = {"target": target, "reached": False, "step": None, "time_s": None, "speedup": None}
    if run is None:
        return {**out, "note": "no run in this seed"}
    if target is None:
        return {**out, "note": "no target: the reference has no final val loss in this seed"}
    if run.diverged_at is not None:
        return {**out, "note": f"diverged at step {run.diverged_at}"}
    point = first_reaching(run.evals, target)
    if point is None:
        return {**out, "note": "not reached"}
    out.update(reached=True, step=point.step, time_s=point.wall_s, note=None)
    if ref_point is None:
        out["note"] = "the reference has no time-to-target in this seed"
    elif point.wall_s > 0 and ref_point.wall_s > 0:
        out["speedup"] = ref_point.wall_s / point.wall_s
    else:
        out["note"] = "reached at step 0 (the target is not below the initial loss): no speedup"
    return out


def _to_target_summary(per_seed: dict[str, Any]) -> dict[str, Any]:
    reached = [v for v in per_seed.values() if v["reached"]]
    speedups = [v["speedup"] for v in reached if v["speedup"] is not None]
    return {
        "per_seed": per_seed,
        "reached": len(reached),
        "n": len(per_seed),
        "steps_median": _median([v["step"] for v in reached]),
        "time_s_median": _median([v["time_s"] for v in reached]),
        "speedup": None
        if not speedups
        else {"geomean": geometric_mean(speedups), "min": min(speedups), "max": max(speedups), "n": len(speedups)},
    }


def verdict_line(verdict: Mapping[str, Any] | None) -> str:
    """One sentence for a metric's paired verdicts against the reference."""
    if verdict is None or verdict.get("reference") is None:
        return "no contender has a value (all diverged or skipped)"
    metric, ref = verdict["metric"], verdict["reference"]
    pairs = verdict["pairs"]
    if not pairs:
        return f"{metric}: {verdict['note'] or f'only the reference {ref} ran: nothing to compare'}"
    n = max((p["n"] for p in pairs.values()), default=0)
    head = (
        f"{metric} vs {ref} (paired Δ over {n} seeds, one-sided {verdict['confidence']:.0%} bound, "
        f"margin δ = {verdict['margin']:g})"
        if n > 1
        else f"{metric} vs {ref} (one seed: the difference only, no verdict)"
    )
    parts = [f"{name} {_pair_text(p)}" for name, p in pairs.items()]
    return f"{head}: " + "; ".join(parts)


def _pair_text(pair: Mapping[str, Any]) -> str:
    if pair["verdict"] in NO_VALUE:
        return pair["verdict"]
    if pair["upper_bound"] is None:
        return f"Δ {pair['mean_diff']:+.4f}"
    return f"{pair['verdict']} (Δ {pair['mean_diff']:+.4f}, bound {pair['upper_bound']:+.4f})"


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _strict(value: Any) -> Any:
    """Replace non-finite floats by None so the file is strict JSON."""
    return finite_or_null(value)


__all__ = [
    "FORMAT",
    "METRICS",
    "RULES",
    "ContenderRuns",
    "ResultsFormatError",
    "ValidationResult",
    "choose_reference",
    "equal_steps_values",
    "equal_wall_clock",
    "load_results",
    "save_results",
    "spread",
    "summarize",
    "verdict_line",
]
