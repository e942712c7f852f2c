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
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

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


@dataclass
class Timing:
    """Seconds per timed call over ``repeats`` samples (warm-up excluded)."""

    median_s: float
    min_s: float
    max_s: float
    p10_s: float
    p90_s: float
    repeats: int
    warmup_s: float

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the run-to-run noise to read a difference against."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else 0.0


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
    return Timing(
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        p10_s=_quantile(times, 0.1),
        p90_s=_quantile(times, 0.9),
        repeats=len(times),
        warmup_s=warmup,
    )


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
        return self.timing.median_s / self.batch if self.timing is not None else None

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
        return {
            "shape": list(self.shape),
            "label": self.label,
            "config": self.config.to_dict(),
            "count": self.count,
            "batch": self.batch,
            "time_s": asdict(self.timing) if self.timing is not None else None,
            "spread": self.timing.spread if self.timing is not None else None,
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
            timing=Timing(**t) if t is not None else None,
            peak_memory_bytes=data.get("peak_memory_bytes"),
            memory_source=str(data.get("memory_source", MEMORY_ESTIMATE)),
            skipped=data.get("skipped"),
            shared_from=data.get("shared_from"),
        )


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

    ``skip_dtypes`` maps a dtype to the reason it is not timed (the device only emulates it); the
    baseline is timed regardless, since every speed-up is quoted against it. Out of memory on one
    candidate skips that candidate with the reason and goes on. ``timing`` goes to ``time_op``.
    """
    timer = timer or default_timer(device)
    skip_dtypes = skip_dtypes or {}
    batched = device.type != "cpu" if batched is None else batched
    todo = [(shape, c) for shape in shapes for c in candidates if fits(c, shape)]
    say = progress or (lambda _d, _i, _n: None)
    shared: dict[tuple[tuple[int, int], str], CostRecord] = {}
    records: list[CostRecord] = []
    gen = torch.Generator(device=device)
    inputs: dict[tuple[int, int], torch.Tensor] = {}
    for done, (shape, config) in enumerate(todo):
        label = candidate_label(config)
        say(f"timing {shape[0]}x{shape[1]} {label}", done, len(todo))
        count = shapes[shape]
        batch = count if batched else 1
        record = CostRecord(shape, label, config, count, batch)
        if device.type == "cuda":
            record.memory_source = MEMORY_MEASURED
        records.append(record)
        if config.dtype in skip_dtypes and config.method != "svd" and config != BASELINE:
            record.skipped = skip_dtypes[config.dtype]
            continue
        key = (shape, cost_key(config))
        if key in shared:
            source = shared[key]
            record.timing, record.peak_memory_bytes = source.timing, source.peak_memory_bytes
            record.skipped, record.shared_from = source.skipped, source.label
            continue
        shared[key] = record
        if shape not in inputs:
            inputs.clear()  # one shape's input alive at a time
            full = (batch, *shape) if batched else shape
            inputs[shape] = torch.randn(full, device=device, dtype=torch.float32)
        G = inputs[shape]
        try:
            op = _operation(G, config, gen)
            measured = _timed_with_memory(op, timer, device, shape, config, batch, timing)
            record.timing, record.peak_memory_bytes = measured
        except torch.OutOfMemoryError as err:
            record.skipped = f"out of memory: {_one_line(err)}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    say("timing done", len(todo), len(todo))
    return records


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


def _timed_with_memory(
    op: Callable[[], Any],
    timer: Timer,
    device: torch.device,
    shape: tuple[int, int],
    config: Candidate,
    batch: int,
    timing: dict[str, Any],
) -> tuple[Timing, int]:
    if device.type != "cuda":
        return time_op(op, timer, **timing), workspace_bytes(*shape, config, batch)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    op()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    return time_op(op, timer, **timing), int(peak)
