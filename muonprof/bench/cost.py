"""Cost: time one orthogonalization per unique (matrix shape, config) on the device.

Cost depends on shape, method, dtype and device, never on the values (DESIGN.md), so each unique
(shape, config) is timed once and shared by every layer of that shape. It is timed the way ProfiledMuon
runs it: on CPU one matrix per call (ProfiledMuon does not batch there), so a bucket of ``count`` layers
costs ``count`` x the time; on accelerators the whole same-shape bucket as one batched call, so each
layer's share is the batch time / ``count``.

Newton-Schulz cost does not depend on the coefficients, only on the number of steps, the dtype and
which steps are cubic (a cubic step skips one of the three products): every schedule with the same
(shape, steps, dtype, cubic pattern) shares one timing. That is what keeps a CPU bench of 5 schedules
x 8 steps x 2 dtypes at 32 timings per shape instead of 80. (Polar Express also scales the input by a
constant, one elementwise pass: noise next to the matmuls.)

A ``momentum_rank`` candidate (LiMuon's low-rank momentum) replaces the orthogonalization by what
ProfiledMuon does for such a layer each step: rebuild the momentum U diag(S) V^T, fold the gradient in
(lerp, mu = 0.95), compress it back (randomized SVD, ``lowrank_momentum.compress``) and take the direction
U V^T from the new factors (``momentum_rank_step``). That includes one m x n lerp the full-buffer
candidates are not charged for (theirs is the same for all of them, and not timed): the comparison errs
against the low-rank momentum by one elementwise pass.

Timing on a shared machine (issue 16). All candidates of one shape are timed in interleaved rounds
(``interleaved_samples``): every round visits each candidate still sampling once, in an order shuffled by a
seeded RNG (A B C, A C B, ...), so a load that comes and goes over seconds lands on all of them alike
instead of on whichever ran during it. Other processes only ever add time to a compute-bound op, so the
figure is a low quantile of the rounds (``DEFAULT_ESTIMATOR``; measured against the median and the minimum
in ``tests/benchmarks/bench_load_ranking.py``), not the median. A candidate whose rounds spread widely
(interquartile range over median above ``REMEASURE_SPREAD``) is re-measured once with as many rounds
again, and every figure carries how sure it is: rounds, quartiles, relative spread, a certainty grade
(``certainty``) and whether it was re-measured. ``time_op`` is the older back-to-back harness, kept for
single ops and as the baseline the benchmark compares against.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch

from ..device.probe import Timer, default_timer
from ..optim.lowrank_momentum import MOMENTUM_OVERSAMPLE, compress, expand, polar_of_factors
from ..ortho import applied_update, orthogonalize, resolve_schedule
from ..ortho.feedback import subset_size
from .candidates import BASELINE, Candidate, MomentumRank, candidate_from_dict, candidate_label, fits, state_bytes

TIMING_MOMENTUM = 0.95  # mu of the timed low-rank momentum step (the value does not change the cost)

Progress = Callable[[str, int, int], None]  # (description, done, total)

MEMORY_ESTIMATE = "estimate: bytes of the algorithm's live tensors (cost.workspace_bytes), not the allocator's peak"
MEMORY_MEASURED = "measured: torch.cuda.max_memory_allocated delta around one call"


Certainty = Literal["high", "medium", "low"]
CERTAINTIES: tuple[Certainty, ...] = ("low", "medium", "high")  # least sure first

# A quantile of the rounds (0 = the minimum, 0.5 = the median): what ``Timing.figure_s`` reports.
ESTIMATORS: dict[str, float] = {"min": 0.0, "p10": 0.1, "q1": 0.25, "median": 0.5}
DEFAULT_ESTIMATOR = "q1"
MIN_ROUNDS = 5  # rounds every (not pathologically slow) candidate gets: a quartile needs a few
MAX_ROUNDS = 15  # fast candidates go on up to this many (their noise is relatively larger)
TARGET_S = 0.15  # ... until their samples add up to this many seconds
SLOW_S = 5.0  # warm-up and first sample both slower than this: that one sample only
REMEASURE_SPREAD = 0.25  # IQR / median above this: re-measure (the bar tune.timing uses for its rounds)
HIGH_SPREAD = 0.10  # IQR / median at or below this with >= HIGH_ROUNDS rounds: "high" certainty
HIGH_ROUNDS = 5
MEDIUM_ROUNDS = 3  # fewer rounds than this, or a spread above REMEASURE_SPREAD: "low"


@dataclass
class Timing:
    """Seconds per timed call over ``repeats`` samples (warm-up excluded).

    The first seven fields are the artifact's ``time_s`` (every bench file has them). The rest came with
    interleaved timing and are stored beside ``time_s`` in a cost row (``CostRecord.to_json``); a file
    written before has them as None / False, and its figure is then the median, as it was.
    """

    median_s: float
    min_s: float
    max_s: float
    p10_s: float
    p90_s: float
    repeats: int
    warmup_s: float
    q1_s: float | None = None
    q3_s: float | None = None
    estimate_s: float | None = None  # the robust figure (a low quantile of the rounds)
    estimator: str | None = None  # which: a key of ESTIMATORS
    rounds: int | None = None  # interleaved rounds this candidate was timed in (None: back-to-back)
    remeasured: bool = False

    @property
    def figure_s(self) -> float:
        """The seconds per call bench reports and tune uses: the robust estimate, else (old files) the median."""
        return self.estimate_s if self.estimate_s is not None else self.median_s

    @property
    def spread(self) -> float | None:
        """(q3 - q1) / median, the relative interquartile range (None for a file written without quartiles)."""
        if self.q1_s is None or self.q3_s is None:
            return None
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s > 0 else 0.0

    @property
    def certainty(self) -> Certainty | None:
        """How sure the figure is, from its sample count and spread (``grade``); None for old files."""
        return grade(self.repeats, self.spread) if self.spread is not None else None

    def time_s_json(self) -> dict[str, float | int]:
        """The artifact's ``time_s``: the fields every bench file has (all numbers)."""
        return {f.name: getattr(self, f.name) for f in fields(self)[:7]}


def grade(samples: int, spread: float) -> Certainty:
    """``high``: >= 5 samples within 10% (IQR / median); ``medium``: >= 3 within 25%; else ``low``.

    25% is the re-measure bar: a figure still above it after a re-measure moved by more than a quarter
    between rounds, and a ranking that hinges on it is a coin toss.
    """
    if samples >= HIGH_ROUNDS and spread <= HIGH_SPREAD:
        return "high"
    if samples >= MEDIUM_ROUNDS and spread <= REMEASURE_SPREAD:
        return "medium"
    return "low"


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of a short list (statistics.quantiles needs >= 2 and excludes ends)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_op(
    op: Callable[[], Any],
    timer: Timer,
    *,
    min_repeats: int = 3,
    max_repeats: int = 15,
    target_s: float = 0.15,
    slow_s: float = 5.0,
) -> Timing:
    """One warm-up call (not counted), then samples until ``min_repeats`` and ``target_s`` are both reached.

    Repeats adapt to the time budget: fast ops get up to ``max_repeats`` samples (their noise is
    relatively larger), and an op whose warm-up alone took over ``slow_s`` gets a single sample, so a
    pathological candidate (e.g. emulated bf16) cannot stall the bench for minutes.
    """
    warmup = timer.measure(op)
    wanted = 1 if warmup > slow_s else min_repeats
    times: list[float] = []
    while len(times) < max_repeats and (len(times) < wanted or (wanted > 1 and sum(times) < target_s)):
        times.append(timer.measure(op))
    return summarize(times, warmup)


def summarize(
    times: Sequence[float],
    warmup_s: float,
    *,
    estimator: str | None = None,
    rounds: int | None = None,
    remeasured: bool = False,
) -> Timing:
    """The ``Timing`` of ``times`` (at least one sample); ``estimator`` (a key of ESTIMATORS) sets ``estimate_s``."""
    if estimator is not None and estimator not in ESTIMATORS:
        raise ValueError(f"unknown timing estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    return Timing(
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        p10_s=_quantile(times, 0.1),
        p90_s=_quantile(times, 0.9),
        repeats=len(times),
        warmup_s=warmup_s,
        q1_s=_quantile(times, 0.25),
        q3_s=_quantile(times, 0.75),
        estimate_s=_quantile(times, ESTIMATORS[estimator]) if estimator is not None else None,
        estimator=estimator,
        rounds=rounds,
        remeasured=remeasured,
    )


def relative_iqr(times: Sequence[float]) -> float:
    """(q3 - q1) / median of ``times``: 0 for fewer than two samples."""
    mid = statistics.median(times) if times else 0.0
    return (_quantile(times, 0.75) - _quantile(times, 0.25)) / mid if len(times) > 1 and mid > 0 else 0.0


@dataclass
class Samples:
    """What ``interleaved_samples`` measured: per key, the timed samples, the warm-up, and which keys
    were re-measured or failed (out of memory: the reason)."""

    times: dict[str, list[float]]
    warmup_s: dict[str, float]
    remeasured: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)


def interleaved_samples(
    ops: Mapping[str, Callable[[], Any]],
    timer: Timer,
    *,
    min_repeats: int = MIN_ROUNDS,
    max_repeats: int = MAX_ROUNDS,
    target_s: float = TARGET_S,
    slow_s: float = SLOW_S,
    remeasure_spread: float = REMEASURE_SPREAD,
    seed: int = 0,
    on_round: Callable[[int], None] | None = None,
) -> Samples:
    """Time ``ops`` round-robin: one warm-up call each (not counted), then rounds that visit every key still
    sampling once, in an order shuffled by ``random.Random(seed)``.

    A key keeps sampling until it has ``min_repeats`` samples and ``target_s`` seconds of them counted at its
    fastest sample (at most ``max_repeats``), so the first ``min_repeats`` rounds visit all keys and only the
    fast ones go on (their noise is relatively larger), and load, which slows samples, does not shorten the
    rounds. A key whose warm-up and first sample both took over ``slow_s`` gets that one sample (a
    pathological candidate, e.g. emulated bf16, cannot stall the bench). Then every key whose relative IQR
    exceeds ``remeasure_spread`` is re-measured once: as many rounds again, among the re-measured keys,
    interleaved the same way. Out of memory on a key drops it with the reason; the others go on.
    """
    rng = random.Random(seed)
    samples = Samples(times={key: [] for key in ops}, warmup_s={})
    live: list[str] = []
    for key, op in ops.items():
        try:
            samples.warmup_s[key] = timer.measure(op)
            live.append(key)
        except torch.OutOfMemoryError as err:
            samples.failed[key] = f"out of memory: {_one_line(err)}"
    def pathological(key: str) -> bool:
        # Slow at warm-up and at its first sample: one load spike on the warm-up alone does not cut its rounds.
        got = samples.times[key]
        return samples.warmup_s[key] > slow_s and (not got or min(got) > slow_s)

    def wants(key: str) -> bool:
        got = samples.times[key]
        if len(got) >= max_repeats:
            return False
        if pathological(key):
            return not got
        # The budget counts each sample at the fastest one's cost, so a loaded machine does not cut the rounds.
        return len(got) < min_repeats or len(got) * min(got) < target_s

    def one_round(keys: list[str]) -> None:
        rng.shuffle(keys)
        for key in keys:
            try:
                samples.times[key].append(timer.measure(ops[key]))
            except torch.OutOfMemoryError as err:
                samples.failed[key] = f"out of memory: {_one_line(err)}"
                live.remove(key)
        if on_round is not None:
            on_round(len(keys))

    while todo := [key for key in live if wants(key)]:
        one_round(todo)
    noisy = {
        key: len(samples.times[key])
        for key in live
        if not pathological(key) and len(samples.times[key]) > 1 and relative_iqr(samples.times[key]) > remeasure_spread
    }
    samples.remeasured = set(noisy)
    for extra in range(max(noisy.values(), default=0)):
        todo = [key for key in live if key in noisy and extra < noisy[key]]
        if todo:
            one_round(todo)
    return samples


def time_interleaved(
    ops: Mapping[str, Callable[[], Any]],
    timer: Timer,
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    **options: Any,
) -> tuple[dict[str, Timing], dict[str, str]]:
    """``interleaved_samples`` summarized: (key -> Timing with ``estimator``'s figure, key -> failure reason)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown timing estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    got = interleaved_samples(ops, timer, **options)
    timings = {
        key: summarize(
            times, got.warmup_s[key], estimator=estimator, rounds=len(times), remeasured=key in got.remeasured
        )
        for key, times in got.times.items()
        if key not in got.failed and times
    }
    return timings, got.failed


def momentum_rank_step(
    U: torch.Tensor,
    S: torch.Tensor,
    V: torch.Tensor,
    G: torch.Tensor,
    rank: int,
    *,
    mu: float = TIMING_MOMENTUM,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One low-rank-momentum step as ProfiledMuon runs it: expand, lerp with ``G``, compress, direction."""
    M = expand(U, S, V).lerp_(G.float(), 1 - mu)
    return polar_of_factors(*compress(M, rank, generator=generator))


def cost_key(config: Candidate) -> str:
    """What the timing of ``config`` depends on: for Newton-Schulz, steps, dtype and the cubic steps only (and,
    for Gram Newton-Schulz, where it restarts)."""
    if config.method == "newton_schulz":
        rows = resolve_schedule(config.coefficients).coefficients(config.ns_steps)
        pattern = "".join("c" if c == 0.0 else "q" for _, _, c in rows)
        if config.gram:
            return f"gns:{config.dtype}:{pattern}:rs{'.'.join(map(str, config.restart_steps))}"
        return f"ns:{config.dtype}:{pattern}"
    return config.to_json()


def workspace_bytes(m: int, n: int, config: Candidate, batch: int = 1) -> int:
    """Estimated extra memory of one call: the live tensors at the algorithm's busiest point.

    With k = min(m, n), l = max(m, n), e = bytes of the compute dtype, sketch width w = rank + oversample:
    Newton-Schulz holds the cast input, X, the Gram A = X X^T, B = bA + cA^2 and the new X: e(3kl + 2k^2);
    Gram Newton-Schulz holds the cast input, X, R, Z, Q, R Z and the new R (or Q), then Q X: e(3kl + 5k^2)
    (and a Gram core of low-rank or subset holds 5 small squares instead of 2);
    SVD (float32) holds U, S, Vh, the product and about one copy as LAPACK workspace: 4(3kl + 2k^2);
    low-rank holds the unit-norm input and its cast, the sketch and its products, the core and its
    Newton-Schulz workspace, and the lifted result: 4(kl + 2lw + 3kw) + e(2kl + 3rl + 2r^2).
    A low-rank momentum step (float32) holds the rebuilt momentum, its unit-norm copy, the sketch and its
    products, the new factors and the direction: 4(3kl + 2lw + 3kw + (m + n + 1) r).
    """
    k, long = min(m, n), max(m, n)
    e = 2 if config.dtype == "bfloat16" else 4
    gram_squares = 5 if getattr(config, "gram", False) else 2  # small square matrices of the Newton-Schulz core
    if isinstance(config, MomentumRank):
        r = config.rank
        w = min(r + MOMENTUM_OVERSAMPLE, k)
        elems = 4 * (3 * k * long + 2 * long * w + 3 * k * w + (m + n + 1) * r)
    elif config.method == "newton_schulz":
        elems = e * (3 * k * long + gram_squares * k * k)
    elif config.method == "svd":
        elems = 4 * (3 * k * long + 2 * k * k)
    elif config.method == "subset":
        # The gathered k x short rows, their Newton-Schulz workspace, the scattered update and the applied part.
        rows = subset_size((m, n), config.fraction or 1.0)
        elems = e * (4 * rows * k + gram_squares * k * k) + e * k * long + 4 * k * long
    else:
        r = config.rank or k
        w = r if config.range_finder == "columns" and config.method == "lowrank" else min(r + config.oversample, k)
        elems = 4 * (k * long + 2 * long * w + 3 * k * w) + e * (2 * k * long + 3 * r * long + gram_squares * r * r)
        if config.error_feedback:
            elems += 4 * k * long  # the applied part Q Q^T X
    return int(elems * batch)


@dataclass
class CostRecord:
    """The cost of ``config`` on the layers of one matrix shape (one row of the artifact's ``costs``)."""

    shape: tuple[int, int]
    label: str
    config: Candidate
    count: int  # benched layers of this shape
    batch: int  # matrices per timed call: 1 on CPU, ``count`` on accelerators
    timing: Timing | None = None
    peak_memory_bytes: int | None = None
    memory_source: str = MEMORY_ESTIMATE
    skipped: str | None = None
    shared_from: str | None = None  # the label whose timing this one reuses (Newton-Schulz schedules)

    @property
    def per_layer_s(self) -> float | None:
        """One layer's share of a step: the call time (CPU) or the batched call's time / batch."""
        return self.timing.figure_s / self.batch if self.timing is not None else None

    @property
    def bucket_s(self) -> float | None:
        """All ``count`` layers of this shape, per optimizer step."""
        per = self.per_layer_s
        return per * self.count if per is not None else None

    @property
    def state_bytes(self) -> int:
        """Muon optimizer state one layer of this shape holds under this candidate (float32 parameters).

        Derived from shape and candidate alone (``optim.state_memory``), so a bench file written before
        this field existed gets the same number on load."""
        return state_bytes(self.shape, self.config)

    def to_json(self) -> dict[str, Any]:
        t = self.timing
        return {
            "shape": list(self.shape),
            "label": self.label,
            "config": self.config.to_dict(),
            "count": self.count,
            "batch": self.batch,
            "time_s": t.time_s_json() if t is not None else None,
            # How sure the figure is (issue 16): optional on read, None/False for old files.
            "time_estimate_s": t.estimate_s if t is not None else None,
            "estimator": t.estimator if t is not None else None,
            "time_q1_s": t.q1_s if t is not None else None,
            "time_q3_s": t.q3_s if t is not None else None,
            "spread": t.spread if t is not None else None,
            "rounds": t.rounds if t is not None else None,
            "remeasured": t.remeasured if t is not None else False,
            "certainty": t.certainty if t is not None else None,
            "per_layer_s": self.per_layer_s,
            "bucket_s": self.bucket_s,
            "state_bytes": self.state_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_source": self.memory_source,
            "skipped": self.skipped,
            "shared_from": self.shared_from,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostRecord:
        t = data.get("time_s")
        return cls(
            shape=(int(data["shape"][0]), int(data["shape"][1])),
            label=str(data["label"]),
            config=candidate_from_dict(data["config"]),
            count=int(data["count"]),
            batch=int(data["batch"]),
            timing=_timing_from_json(t, data) if t is not None else None,
            peak_memory_bytes=data.get("peak_memory_bytes"),
            memory_source=str(data.get("memory_source", MEMORY_ESTIMATE)),
            skipped=data.get("skipped"),
            shared_from=data.get("shared_from"),
        )


def _timing_from_json(time_s: dict[str, Any], row: dict[str, Any]) -> Timing:
    """A row's ``time_s`` plus the optional certainty keys beside it; a bad value raises naming its key
    (the artifact turns it into a one-line BenchError)."""
    label = row.get("label", "?")
    extra: dict[str, Any] = {}
    for key, name in (("time_q1_s", "q1_s"), ("time_q3_s", "q3_s"), ("time_estimate_s", "estimate_s")):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise ValueError(f"{label}.{key} = {value!r}: must be a number >= 0")
        extra[name] = float(value) if value is not None else None
    rounds = row.get("rounds")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0):
        raise ValueError(f"{label}.rounds = {rounds!r}: must be a whole number >= 0")
    estimator = row.get("estimator")
    if estimator is not None and estimator not in ESTIMATORS:
        raise ValueError(f"{label}.estimator = {estimator!r}: not one of {', '.join(ESTIMATORS)}")
    remeasured = row.get("remeasured", False)
    if not isinstance(remeasured, bool):
        raise ValueError(f"{label}.remeasured = {remeasured!r}: must be true or false")
    return Timing(**time_s, **extra, estimator=estimator, rounds=rounds, remeasured=remeasured)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def measure_costs(
    shapes: dict[tuple[int, int], int],
    candidates: Sequence[Candidate],
    device: torch.device,
    *,
    timer: Timer | None = None,
    skip_dtypes: dict[str, str] | None = None,
    batched: bool | None = None,
    progress: Progress | None = None,
    **timing: Any,
) -> list[CostRecord]:
    """Time every candidate that fits each shape; ``shapes`` maps (m, n) to the number of layers.

    The candidates of one shape are timed together in interleaved rounds (``time_interleaved``; one shape's
    input alive at a time). ``skip_dtypes`` maps a dtype to the reason it is not timed (the device only
    emulates it); the baseline is timed regardless, since every speed-up is quoted against it. Out of memory
    on one candidate skips that candidate with the reason and goes on. ``timing`` goes to
    ``time_interleaved`` (``min_repeats``, ``max_repeats``, ``target_s``, ``slow_s``, ``remeasure_spread``,
    ``estimator``, ``seed``).
    """
    timer = timer or default_timer(device)
    skip_dtypes = skip_dtypes or {}
    batched = device.type != "cpu" if batched is None else batched
    total = sum(fits(c, shape) for shape in shapes for c in candidates)
    say = progress or (lambda _d, _i, _n: None)
    records: list[CostRecord] = []
    gen = torch.Generator(device=device)
    for shape, count in shapes.items():
        batch = count if batched else 1
        rows = [CostRecord(shape, candidate_label(c), c, count, batch) for c in candidates if fits(c, shape)]
        if not rows:
            continue
        if device.type == "cuda":
            for row in rows:
                row.memory_source = MEMORY_MEASURED
        say(f"timing {shape[0]}x{shape[1]} ({len(rows)} candidates, interleaved)", len(records), total)
        records.extend(rows)
        timed = _plan_shape(rows, skip_dtypes)
        G = torch.randn((batch, *shape) if batched else shape, device=device, dtype=torch.float32)
        ops: dict[str, Callable[[], Any]] = {}
        for row in timed:
            try:
                ops[row.label] = _operation(G, row.config, gen)
                row.peak_memory_bytes = _peak_memory(ops[row.label], device, shape, row.config, batch)
            except torch.OutOfMemoryError as err:
                ops.pop(row.label, None)
                _out_of_memory(row, err, device)
        timings, failed = time_interleaved(ops, timer, **timing)
        for row in timed:
            row.timing = timings.get(row.label)
            if row.label in failed:
                row.skipped = failed[row.label]
        if failed and device.type == "cuda":
            torch.cuda.empty_cache()
        for row in rows:  # the Newton-Schulz schedules that share a timed row's cost
            if row.shared_from is not None:
                source = next(r for r in timed if r.label == row.shared_from)
                row.timing, row.peak_memory_bytes, row.skipped = source.timing, source.peak_memory_bytes, source.skipped
        del G, ops
    say("timing done", total, total)
    return records


def timing_method(options: Mapping[str, Any]) -> dict[str, Any]:
    """The artifact's ``meta["timing"]``: how the figures were taken (``options``: measure_costs' ``timing``)."""
    settings = {
        "min_repeats": MIN_ROUNDS,
        "max_repeats": MAX_ROUNDS,
        "target_s": TARGET_S,
        "slow_s": SLOW_S,
        "remeasure_spread": REMEASURE_SPREAD,
        "estimator": DEFAULT_ESTIMATOR,
        "seed": 0,
        **options,
    }
    return {
        "method": "interleaved rounds per shape, order shuffled each round by a seeded RNG",
        **settings,
        "certainty": (
            f"high: >= {HIGH_ROUNDS} rounds with IQR/median <= {HIGH_SPREAD}; medium: >= {MEDIUM_ROUNDS} rounds "
            f"with IQR/median <= {REMEASURE_SPREAD}; low: otherwise"
        ),
    }


def _plan_shape(rows: list[CostRecord], skip_dtypes: dict[str, str]) -> list[CostRecord]:
    """Mark the rows not timed (an emulated dtype: ``skipped``; same cost as an earlier row: ``shared_from``)
    and return the rows to time, one per cost key."""
    owners: dict[str, CostRecord] = {}
    for row in rows:
        config = row.config
        if config.dtype in skip_dtypes and config.method != "svd" and config != BASELINE:
            row.skipped = skip_dtypes[config.dtype]
            continue
        key = cost_key(config)
        if key in owners:
            row.shared_from = owners[key].label
        else:
            owners[key] = row
    return list(owners.values())


def _out_of_memory(row: CostRecord, err: BaseException, device: torch.device) -> None:
    row.skipped = f"out of memory: {_one_line(err)}"
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _operation(G: torch.Tensor, config: Candidate, gen: torch.Generator) -> Callable[[], torch.Tensor]:
    """What one timed call runs for ``config`` on the input ``G`` (one matrix or a same-shape batch)."""
    if isinstance(config, MomentumRank):
        # The factors the step starts from: a compressed random momentum (set up once, not timed).
        factors = compress(G, config.rank, generator=gen.manual_seed(1))
        return lambda: momentum_rank_step(*factors, G, config.rank, generator=gen.manual_seed(0))
    if config.keeps_tail:
        # What ProfiledMuon runs for such a layer: the update and the applied part of the momentum (the
        # error-feedback projection Q Q^T X, or the selected rows), whose m x n decay is one pass more.
        return lambda: applied_update(G, G, config, generator=gen.manual_seed(0))
    return lambda: orthogonalize(G, config, generator=gen.manual_seed(0))


def _peak_memory(
    op: Callable[[], Any], device: torch.device, shape: tuple[int, int], config: Candidate, batch: int
) -> int:
    """Peak extra memory of one call: measured on CUDA (the call also warms it up), estimated elsewhere."""
    if device.type != "cuda":
        return workspace_bytes(*shape, config, batch)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    op()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)
