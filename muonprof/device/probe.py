"""Measured matmul rates per dtype, so other figures can be read as a fraction of what this device really does.

Newton-Schulz is a chain of matmuls, and whether to run it in bf16 depends on the hardware: GPUs run bf16 several
times faster than fp32, but CPUs without native bf16/fp16 (e.g. AVX2-only EPYC) emulate them ~100x slower. So
each dtype is first timed on a small instance, the cost of each larger shape is extrapolated from the last measured
rate, and a shape whose runs would not fit the per-shape budget is skipped with the reason recorded instead of
hanging the command for minutes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

Shape = tuple[int, int, int]  # (m, n, k): an (m x k) @ (k x n) product, 2*m*n*k FLOPs

GPU_SHAPES: tuple[Shape, ...] = ((1024, 1024, 1024), (4096, 4096, 4096))
GPU_QUICK_SHAPES: tuple[Shape, ...] = ((1024, 1024, 1024), (2048, 2048, 2048))
CPU_SHAPES: tuple[Shape, ...] = ((512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048))
CPU_QUICK_SHAPES: tuple[Shape, ...] = ((256, 256, 256), (512, 512, 512))
PROBE_SHAPE: Shape = (256, 256, 256)

Op = Callable[[], Any]
MakeOp = Callable[[str, int, int, int], Op]


def default_shapes(device: torch.device, quick: bool = False) -> tuple[Shape, ...]:
    """Shapes that take seconds, not minutes, on this kind of device."""
    if device.type == "cpu":
        return CPU_QUICK_SHAPES if quick else CPU_SHAPES
    return GPU_QUICK_SHAPES if quick else GPU_SHAPES


def default_budget(device: torch.device, quick: bool = False) -> float:
    """Seconds one (dtype, shape) may take, warm-up included."""
    return 0.5 if quick else 2.0


def flops(m: int, n: int, k: int) -> int:
    """Floating-point operations of an (m x k) @ (k x n) matmul (one multiply and one add per term)."""
    return 2 * m * n * k


@dataclass
class MatmulResult:
    """One (dtype, shape) measurement, or the reason it was skipped."""

    dtype: str
    m: int
    n: int
    k: int
    seconds: float | None = None  # median seconds per matmul
    tflops: float | None = None  # at the median
    repeats: int = 0  # timed samples (each of `inner` back-to-back matmuls)
    inner: int = 1
    spread: float | None = None  # (max - min) / median over the samples
    skipped: str | None = None
    estimated_s: float | None = None  # extrapolated seconds per matmul, for skipped rows
    estimated_tflops: float | None = None  # the rate the estimate used

    @property
    def flops(self) -> int:
        return flops(self.m, self.n, self.k)

    @property
    def shape(self) -> str:
        return f"{self.m}x{self.n}x{self.k}"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


class Timer:
    """Wall-clock timer around ``inner`` calls, with a device sync after them; ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None):
        self.clock = clock
        self.sync = sync or (lambda: None)

    def measure(self, op: Op, inner: int = 1) -> float:
        """Seconds for ``inner`` back-to-back calls of ``op``, finished on the device."""
        self.sync()
        start = self.clock()
        for _ in range(inner):
            op()
        self.sync()
        return self.clock() - start


class CudaEventTimer(Timer):
    """CUDA (and ROCm) events: measures device time, not the host's launch loop."""

    def __init__(self, device: torch.device):
        super().__init__(sync=lambda: torch.cuda.synchronize(device))
        self.device = device

    def measure(self, op: Op, inner: int = 1) -> float:
        with torch.cuda.device(self.device):  # events on the stream of the device the tensors live on
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                op()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0


def default_timer(device: torch.device) -> Timer:
    """Events on CUDA/ROCm, perf_counter with a sync on MPS, plain perf_counter on CPU."""
    if device.type == "cuda":
        return CudaEventTimer(device)
    if device.type == "mps":
        return Timer(sync=torch.mps.synchronize)
    return Timer()


def tensor_op(device: torch.device) -> MakeOp:
    """Factory of real matmuls on ``device`` writing into a preallocated output, so allocation is not timed."""

    def make(dtype: str, m: int, n: int, k: int) -> Op:
        dt = DTYPES[dtype]
        a = torch.randn(m, k, device=device, dtype=dt)
        b = torch.randn(k, n, device=device, dtype=dt)
        c = torch.empty(m, n, device=device, dtype=dt)
        return lambda: torch.matmul(a, b, out=c)

    return make


def _gflops(rate: float) -> str:
    """Rate in FLOP/s as a short GFLOP/s figure."""
    g = rate / 1e9
    return f"{g:.2g}" if g < 10 else f"{g:.0f}"


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` for a skipped row's reason."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def measure_matmul(
    device: torch.device,
    dtypes: Sequence[str] = ("bf16", "fp16", "fp32"),
    shapes: Sequence[Shape] | None = None,
    budget_s: float | None = None,
    *,
    quick: bool = False,
    min_repeats: int = 3,
    max_repeats: int = 20,
    target_s: float | None = None,
    min_sample_s: float = 1e-3,
    probe_shape: Shape = PROBE_SHAPE,
    clock: Callable[[], float] | None = None,
    timer: Timer | None = None,
    make_op: MakeOp | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[MatmulResult]:
    """Time ``dtypes`` x ``shapes`` matmuls on ``device``; results in the order dtypes x shapes were given.

    Per dtype: a small ``probe_shape`` run gives a first rate; each shape (smallest first) is then predicted from
    the fastest sample of the last measured shape and skipped if warm-up plus ``min_repeats`` runs would exceed
    ``budget_s``. Measured shapes take ``min_repeats`` to ``max_repeats`` samples, stopping once ``target_s``
    (default budget/8) is spent; each sample is ``inner`` back-to-back matmuls, enough to last ``min_sample_s``
    (launch overhead hides small GPU ones).
    ``clock``/``timer``/``make_op`` replace the real clock and matmuls in tests.
    """
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    shapes = tuple(shapes) if shapes is not None else default_shapes(device, quick)
    budget = budget_s if budget_s is not None else default_budget(device, quick)
    target = target_s if target_s is not None else budget / 8
    if timer is None:
        timer = Timer(clock=clock) if clock is not None else default_timer(device)
    make = make_op or tensor_op(device)
    say = progress or (lambda _msg: None)

    results: dict[tuple[str, Shape], MatmulResult] = {}
    for dtype in dtypes:
        say(f"{dtype}: probing {'x'.join(map(str, probe_shape))}")
        try:
            op = make(dtype, *probe_shape)
            timer.measure(op)  # warm-up: library init, kernel selection
            probe_times = [timer.measure(op) for _ in range(3)]
            # the fastest sample: noise from other processes only ever slows a run, and a too-slow estimate
            # would skip shapes that fit
            rate = flops(*probe_shape) / max(min(probe_times), 1e-12)
            source = "small probe"
            failure: str | None = None
        except (RuntimeError, TypeError, NotImplementedError) as err:
            rate, source = 0.0, ""
            failure = f"unsupported: {_one_line(err)}"
        finally:
            op = None  # free the probe tensors before the big ones
        for shape in sorted(shapes, key=lambda s: flops(*s)):
            row = MatmulResult(dtype, *shape)
            results[(dtype, shape)] = row
            if failure is not None:
                row.skipped = failure
                continue
            est = row.flops / rate
            row.estimated_s, row.estimated_tflops = est, rate / 1e12
            runs = 1 + min_repeats
            if est * runs > budget:
                row.skipped = (
                    f"est. {est * runs:.2g} s > {budget:g} s budget ({runs} runs at {_gflops(rate)} GFLOP/s, {source})"
                )
                continue
            say(f"{dtype}: {row.shape}")
            inner = max(1, min(1000, math.ceil(min_sample_s / max(est, 1e-12))))
            try:
                op = make(dtype, *shape)
                warm = timer.measure(op, inner) / inner  # warm-up; an upper bound on the real per-call time
                if warm > 0:
                    inner = max(inner, min(1000, math.ceil(min_sample_s / warm)))
                times: list[float] = []
                while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < target):
                    times.append(timer.measure(op, inner) / inner)
            except (RuntimeError, TypeError, NotImplementedError) as err:  # incl. torch.OutOfMemoryError
                row.skipped = f"failed: {_one_line(err)}"
                continue
            finally:
                op = None
            median = statistics.median(times)
            row.seconds, row.repeats, row.inner = median, len(times), inner
            row.spread = (max(times) - min(times)) / median if median > 0 else None
            row.tflops = row.flops / median / 1e12 if median > 0 else None
            row.estimated_s = row.estimated_tflops = None
            if min(times) > 0:
                rate, source = row.flops / min(times), row.shape
    return [results[(d, s)] for d in dtypes for s in shapes]


@dataclass
class DeviceRates:
    """Peak measured matmul TFLOP/s per dtype (falling back to the probe's estimate where every shape was skipped)."""

    peak_tflops: dict[str, float] = field(default_factory=dict)
    peak_shape: dict[str, str] = field(default_factory=dict)
    estimated: list[str] = field(default_factory=list)  # dtypes whose figure is only the small-probe estimate

    @classmethod
    def from_results(cls, results: Sequence[MatmulResult]) -> DeviceRates:
        rates = cls()
        for r in results:
            if r.tflops is not None and r.tflops > rates.peak_tflops.get(r.dtype, -1.0):
                rates.peak_tflops[r.dtype], rates.peak_shape[r.dtype] = r.tflops, r.shape
        for r in results:
            if r.dtype in rates.peak_tflops and r.dtype not in rates.estimated:
                continue
            if r.estimated_tflops is not None and r.estimated_tflops > rates.peak_tflops.get(r.dtype, -1.0):
                rates.peak_tflops[r.dtype], rates.peak_shape[r.dtype] = r.estimated_tflops, "probe"
                if r.dtype not in rates.estimated:
                    rates.estimated.append(r.dtype)
        return rates

    def ratio(self, dtype: str, reference: str = "fp32") -> float | None:
        """``dtype``'s peak over ``reference``'s, None if either is unknown."""
        a, b = self.peak_tflops.get(dtype), self.peak_tflops.get(reference)
        return a / b if a is not None and b else None

    def best_dtype(self) -> str | None:
        """The fastest dtype measured here."""
        return max(self.peak_tflops, key=self.peak_tflops.__getitem__) if self.peak_tflops else None

    def fraction(self, tflops: float, dtype: str) -> float | None:
        """A figure in TFLOP/s as a fraction of this device's measured ``dtype`` peak."""
        peak = self.peak_tflops.get(dtype)
        return tflops / peak if peak else None

    def ns_advice(self) -> str:
        """One line on which dtype to run Newton-Schulz in: bf16 only pays where it is clearly faster than fp32."""
        bf16 = self.ratio("bf16")
        if bf16 is None:
            known = ", ".join(f"{d} {t:.3g} TFLOP/s" for d, t in self.peak_tflops.items()) or "no rates"
            return f"cannot compare bf16 with fp32 here ({known})"
        est = " (estimate from the small probe)" if {"bf16", "fp32"} & set(self.estimated) else ""
        if bf16 >= 1.1:
            line = f"bf16 matmul runs at {bf16:.2g}x fp32 here: prefer bf16 for Newton-Schulz"
        else:
            line = f"bf16 matmul runs at {bf16:.2g}x fp32 here: prefer fp32 for Newton-Schulz"
        fp16 = self.ratio("fp16")
        if fp16 is not None and fp16 >= 1.1 and fp16 > 1.1 * bf16:
            line += f" (fp16 runs at {fp16:.2g}x fp32)"
        return line + est

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dict, with the best dtype and the bf16/fp32 ratio spelled out."""
        return {**asdict(self), "best_dtype": self.best_dtype(), "bf16_over_fp32": self.ratio("bf16")}


def best_dtype(results: Sequence[MatmulResult]) -> str | None:
    """The dtype with the highest measured matmul rate in ``results``."""
    return DeviceRates.from_results(results).best_dtype()
