"""Paired-seed statistics for loss claims: the one rule ``tune``'s race and ``validate`` both judge by.

Contenders are trained from the same initial weights on the same batches, once per seed, so the seed's own
luck (init, data order) cancels in the per-seed difference ``d_s = candidate_s - reference_s`` (lower is
better: ``d_s > 0`` means the candidate is worse). The claim is about the mean of ``d``:

- **non-inferior at margin δ**: the one-sided ``confidence`` upper bound of the mean difference,
  ``mean(d) + t_{conf, n-1} * sd(d) / sqrt(n)``, is below δ;
- **better**: that upper bound is below 0 (the candidate is lower by more than the noise);
- **worse**: the one-sided lower bound ``mean(d) - t * sd(d) / sqrt(n)`` is above δ (worse than the margin
  allows, beyond the noise);
- otherwise **inconclusive**: neither shown non-inferior nor shown worse (more seeds or a longer horizon
  would tell). For a decision (the race) only ``better`` and ``non-inferior`` pass.

One seed gives numbers but no bound and no verdict (``"one seed"``). Identical runs (every ``d_s = 0``)
have zero spread and are non-inferior at any positive margin, as they should be.

The Student-t quantile is computed here (regularized incomplete beta by continued fraction, then bisection)
so the package needs no SciPy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

PASSING = ("better", "non-inferior")
# The loss increase (nats, per-seed mean of candidate - reference) a candidate may cost and still count as
# non-inferior: one number for the tuner's race and ``validate --max-loss-increase``, so both judge alike.
DEFAULT_MARGIN = 0.01
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedComparison:
    """Candidate vs reference on a lower-is-better metric over paired seeds (see the module docstring)."""

    n: int
    diffs: tuple[float, ...]  # candidate - reference, per seed, in seed order
    mean_diff: float
    std_diff: float | None  # sample std (n - 1); None with one seed
    upper_bound: float | None  # one-sided upper confidence bound of the mean difference
    lower_bound: float | None  # one-sided lower confidence bound
    margin: float
    confidence: float
    verdict: str  # better | non-inferior | worse | inconclusive | one seed

    @property
    def passes(self) -> bool:
        """Shown non-inferior at the margin (or better): what the race requires."""
        return self.verdict in PASSING

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["diffs"] = list(self.diffs)
        return data

    def describe(self) -> str:
        """``+0.0123 (bound +0.0310, 3 seeds): inconclusive at 0.02``."""
        if self.upper_bound is None:
            return f"{self.mean_diff:+.4f} (one seed: no bound, no verdict)"
        return (
            f"{self.mean_diff:+.4f} (bound {self.upper_bound:+.4f}, {self.n} seeds): {self.verdict} at {self.margin:g}"
        )


def check_margin(margin: float, name: str = "the margin") -> float:
    """``margin`` as a float, or ValueError naming ``name`` (e.g. ``--max-loss-increase``): a negative margin
    would demand a candidate be better to pass, and NaN/inf would make every verdict meaningless."""
    try:
        value = float(margin)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 0, got {margin!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {margin}")
    return value


def paired_comparison(
    candidate: Sequence[float], reference: Sequence[float], margin: float, confidence: float = DEFAULT_CONFIDENCE
) -> PairedComparison:
    """Judge ``candidate`` against ``reference`` (same seeds, same order). Raises ValueError on bad input."""
    if len(candidate) != len(reference):
        raise ValueError(f"paired values need the same seeds: {len(candidate)} vs {len(reference)}")
    if not candidate:
        raise ValueError("no paired values")
    check_margin(margin)
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    diffs = tuple(float(c) - float(r) for c, r in zip(candidate, reference))
    if not all(math.isfinite(d) for d in diffs):
        raise ValueError("paired values must be finite (a diverged run has no value)")
    n = len(diffs)
    mean = math.fsum(diffs) / n
    if n < 2:
        return PairedComparison(n, diffs, mean, None, None, None, margin, confidence, "one seed")
    sd = statistics.stdev(diffs)
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    upper, lower = mean + half, mean - half
    if upper < 0:
        verdict = "better"
    elif upper < margin:
        verdict = "non-inferior"
    elif lower > margin:
        verdict = "worse"
    else:
        verdict = "inconclusive"
    return PairedComparison(n, diffs, mean, sd, upper, lower, margin, confidence, verdict)


class _Eval(Protocol):
    step: int
    wall_s: float
    val_loss: float | None


def first_reaching(evals: Iterable[_Eval], target: float) -> _Eval | None:
    """The first evaluation whose validation loss is at or below ``target`` (a real measurement, no
    interpolation), or None when the run never got there. Step 0 counts (a target above the initial loss
    is reached at once)."""
    for point in evals:
        if point.val_loss is not None and math.isfinite(point.val_loss) and point.val_loss <= target:
            return point
    return None


def geometric_mean(values: Sequence[float]) -> float | None:
    """Of positive ratios (speedups); None when there are none."""
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(math.fsum(math.log(v) for v in vals) / len(vals))


# ----------------------------------------------------------------------------------- Student's t


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (``t_quantile(0.95, 2)`` = 2.919986)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (Numerical Recipes' continued fraction, Lentz's method)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return h


__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_MARGIN",
    "PASSING",
    "PairedComparison",
    "check_margin",
    "first_reaching",
    "geometric_mean",
    "paired_comparison",
    "t_cdf",
    "t_quantile",
]
