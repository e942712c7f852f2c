"""Time one optimizer step on GPT-2-small's hidden matrices: ProfiledMuon's recipes vs torch.optim.Muon.

Why this exists: ProfiledMuon claims to be torch.optim.Muon when given no profile (bit for bit on CPU)
and at least as fast, faster on a GPU where it batches same-shape layers, and that a profile buys real
time (a rank-96 low-rank orthogonalizer, fewer Newton-Schulz steps). Those claims are only worth
something with numbers from the machine they were made on, next to what that machine can do at all:
every row is reported as a fraction of the dense matmul rate measured here in the dtype it computes in.

What is timed: ``optimizer.step()`` alone, on 12 GPT-2 blocks of bias-free ``nn.Linear`` layers
(c_attn 768->2304, attn c_proj 768->768, c_fc 768->3072, mlp c_proj 3072->768: 48 matrices, 85M
parameters) with fixed random gradients set once (no forward or backward pass). All contenders run in
one process, on freshly built copies of the same weights and gradients, in interleaved rounds whose
order is shuffled every round (``run_interleaved``, shared with ``bench_lm_step``).

Besides ProfiledMuon's recipes, the other Muon implementations a user could pick instead are timed on the
same shapes (``peers.py``: optimuon's default and fastest configuration, HeavyBall's Muon, Keller Jordan's
muon-optimizer; each skipped with an install line when missing), and, once muonprof has Gram
Newton-Schulz (an ``OrthoConfig.gram`` field), ProfiledMuon's gram rows. Every row is reported as a
ratio to torch.optim.Muon and as a share of the matmul rate in its dtype.

CPUs differ wildly in bf16: with AMX or AVX512-BF16 it is faster than fp32, without either it can be a
hundred times slower. So the bf16 and fp32 matmul rates are probed first; if one torch.optim.Muon step
(always bf16) would take longer than ``--bf16-budget-s`` at the measured bf16 rate, the bf16 contenders
run on a narrower model with the same shape ratios, and the output says so. The fp32 rows always run at
the full width.

Run from the repository root (excluded from the default pytest run)::

    python -m tests.benchmarks.bench_step            # full run, ~10-15 min on 2 CPU cores (15 rows)
    python -m tests.benchmarks.bench_step --quick    # smoke test, well under a minute
    python -m tests.benchmarks.bench_step --device cuda --json bench-out/step.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import muonprof
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import muonprof

from muonprof import ProfiledMuon
from muonprof.ortho.config import OrthoConfig
from muonprof.ortho.lowrank import lowrank_flops
from muonprof.ortho.newton_schulz import newton_schulz_flops
from muonprof.ortho.spectral import predict

try:
    from tests.benchmarks import peers as peer_defs
except ImportError:  # run as a script: this folder is sys.path[0]
    import peers as peer_defs  # type: ignore[no-redef]

PROFILE_FORMAT = "muonprof.profile/1"
GPT2_WIDTH = 768
GPT2_BLOCKS = 12
LOWRANK_RANK = 96
PE_STEPS = (3, 4, 5)  # the "gram + polar_express x k" rows
GRAM_TARGET = 0.6  # the issue's full-rank target: <= 0.6x torch.optim.Muon's step
# One set of hyper-parameters for every contender, so that the default ProfiledMuon and torch.optim.Muon
# can be compared parameter for parameter after a step (weight decay on, to exercise that path too;
# --weight-decay changes it for all rows).
HPARAMS: dict[str, Any] = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.01)
CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


# --------------------------------------------------------------------------- the device


def cpu_info() -> dict[str, Any]:
    """CPU model and the vector/matrix extensions that decide how fast bf16 can be (Linux only)."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": {}}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            info["model"] = value.strip()
        elif key == "flags":
            flags = set(value.split())
    info["flags"] = {f: f in flags for f in CPU_FLAGS_OF_INTEREST}
    info["logical_cpus"] = os.cpu_count()
    with contextlib.suppress(AttributeError):  # torch < 2.1
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["mkldnn"] = torch.backends.mkldnn.is_available()
    return info


def git_state() -> dict[str, Any]:
    """HEAD and uncommitted changes to muonprof/: a number is only meaningful with the code it measured."""
    root = Path(__file__).resolve().parents[2]

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "muonprof")
    return {"commit": git("rev-parse", "--short", "HEAD"), "muonprof_changes": dirty.splitlines() if dirty else []}


def device_info(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell later which machine (and which torch) a set of numbers came from."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "muonprof": getattr(muonprof, "__version__", "?"),
        "python": platform.python_version(),
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_info(),
        "git": git_state(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_matmul(a: Tensor, b: Tensor, device: torch.device, reps: int) -> float:
    """Seconds for one ``a @ b`` (best of ``reps``; the best is the rate the hardware can reach)."""
    best = math.inf
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def probe_matmul(dtype: torch.dtype, device: torch.device, *, max_n: int, target_s: float = 0.2) -> dict[str, Any]:
    """Dense square matmul rate in ``dtype``, growing n from 256 until one product takes ~``target_s``/4.

    Adaptive because bf16 on a CPU without AVX512-BF16/AMX can be 100x slower than fp32: a fixed large
    size would take minutes there, a fixed small one underrates a GPU by an order of magnitude.
    """
    sizes: list[dict[str, float]] = []
    n = 256
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        first = _time_matmul(a, b, device, 1)  # also the warm-up (oneDNN/cuBLAS pick their kernels here)
        reps = max(2, min(20, int(target_s / max(first, 1e-6))))
        seconds = _time_matmul(a, b, device, reps)
        sizes.append({"n": n, "seconds": seconds, "flops_per_s": 2.0 * n**3 / seconds})
        if n * 2 > max_n or seconds * 8 > target_s:
            break
        n *= 2
    best = max(sizes, key=lambda s: s["flops_per_s"])
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "flops_per_s": best["flops_per_s"],
        "best_n": best["n"],
        "sizes": sizes,
    }


# --------------------------------------------------------------------------- the model


def gpt2_shapes(width: int, blocks: int) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of GPT-2's hidden Linears; shapes are given as in x out."""
    shapes = []
    for i in range(blocks):
        shapes += [
            (f"h.{i}.attn.c_attn.weight", width, 3 * width),
            (f"h.{i}.attn.c_proj.weight", width, width),
            (f"h.{i}.mlp.c_fc.weight", width, 4 * width),
            (f"h.{i}.mlp.c_proj.weight", 4 * width, width),
        ]
    return shapes


class Block(nn.Module):
    """One GPT-2 block's matrices (no attention or activation: only the optimizer step is timed)."""

    def __init__(self, width: int, device: torch.device) -> None:
        super().__init__()
        make = lambda i, o: nn.utils.skip_init(nn.Linear, i, o, bias=False, device=device)  # noqa: E731
        self.attn = nn.ModuleDict({"c_attn": make(width, 3 * width), "c_proj": make(width, width)})
        self.mlp = nn.ModuleDict({"c_fc": make(width, 4 * width), "c_proj": make(4 * width, width)})


class Blocks(nn.Module):
    def __init__(self, width: int, blocks: int, device: torch.device) -> None:
        super().__init__()
        self.h = nn.ModuleList(Block(width, device) for _ in range(blocks))


@dataclass
class Fixture:
    """Weights and gradients for one width, made once and copied into each contender's fresh model."""

    width: int
    blocks: int
    weights: dict[str, Tensor]
    grads: dict[str, Tensor]

    @classmethod
    def make(cls, width: int, blocks: int, device: torch.device, seed: int) -> Fixture:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        weights, grads = {}, {}
        for name, fan_in, fan_out in gpt2_shapes(width, blocks):
            weights[name] = (torch.randn(fan_out, fan_in, generator=gen) * 0.02).to(device)
            grads[name] = torch.randn(fan_out, fan_in, generator=gen).to(device)
        return cls(width, blocks, weights, grads)

    def model(self, device: torch.device) -> Blocks:
        model = Blocks(self.width, self.blocks, device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.weights[name])
                p.grad = self.grads[name].clone()
        return model

    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(w.shape) for w in self.weights.values()]  # type: ignore[misc]


def torch_muon_step_flops(shapes: list[tuple[int, int]]) -> float:
    """torch.optim.Muon: 5 quintic Newton-Schulz steps per matrix."""
    return sum(newton_schulz_flops(m, n, 5) for m, n in shapes)


def has_gram() -> bool:
    """Whether this muonprof's OrthoConfig has the ``gram`` field (Gram Newton-Schulz): the gram rows need it."""
    return "gram" in {f.name for f in dataclasses.fields(OrthoConfig)}


def gram_flops(shape: tuple[int, int], config: OrthoConfig) -> float:
    """muonprof's own Gram Newton-Schulz flop count for ``config`` (restarts included), NaN where it has none.

    The count lives with the implementation (``muonprof.ortho.gram.configured_newton_schulz_flops``), so
    the benchmark counts what the code does rather than a second opinion of it.
    """
    try:
        from muonprof.ortho.gram import configured_newton_schulz_flops  # type: ignore[import-not-found]
    except ImportError:
        return math.nan
    return float(configured_newton_schulz_flops(*shape, config))


def ortho_flops(shape: tuple[int, int], config: OrthoConfig) -> float:
    if config.method == "newton_schulz":
        if getattr(config, "gram", False):
            return gram_flops(shape, config)
        return newton_schulz_flops(*shape, config.ns_steps)
    if config.method in ("lowrank", "rsvd"):
        return lowrank_flops(*shape, config)
    return math.nan  # svd: no meaningful matmul count


def pick_bf16_width(full_width: int, blocks: int, bf16_rate: float, budget_s: float) -> tuple[int, float]:
    """The widest multiple of 64 (at least 128) whose torch.optim.Muon step fits ``budget_s`` at ``bf16_rate``.

    Returns (width, estimated seconds at full width). 128 is the floor because rank 96 must fit.
    """
    estimate = torch_muon_step_flops([(o, i) for _, i, o in gpt2_shapes(full_width, blocks)]) / bf16_rate
    if estimate <= budget_s:
        return full_width, estimate
    width = full_width
    while width > 128:
        width -= 64
        flops = torch_muon_step_flops([(o, i) for _, i, o in gpt2_shapes(width, blocks)])
        if flops / bf16_rate <= budget_s:
            break
    return max(width, 128), estimate


# --------------------------------------------------------------------------- contenders


def profile(**defaults: Any) -> dict[str, Any]:
    return {"format": PROFILE_FORMAT, "defaults": defaults, "layers": {}}


MakeOptimizer = Callable[[Blocks], torch.optim.Optimizer]


@dataclass
class Contender:
    key: str
    label: str
    dtype: str  # the dtype the orthogonalizer computes in
    group: str  # "bf16" (runs at the bf16 width) or "fp32" (always full width)
    make: MakeOptimizer
    note: str = ""
    # Not ProfiledMuon: what it computes (ProfiledMuon rows read it from describe() and their plans).
    ortho: str | None = None
    matrix_flops: Callable[[int, int], float] | None = None
    spectral: OrthoConfig | None = None  # its update as a spectral polynomial (descent share), if it is one
    resets_grads: bool = False  # its step consumes/overwrites .grad: re-set the fixed grads before each step
    # A row that depends on another library or on a muonprof feature still landing (peers, gram): if it
    # cannot be built, it is skipped with its one-line reason instead of ending the run.
    optional: bool = False


def contenders(
    has_torch_muon: bool, rank: int, *, pe_steps: tuple[int, ...] = (), heavyball_compiled: bool = True
) -> tuple[list[Contender], list[tuple[str, str]]]:
    """Every row, and (key, one line) per peer row that is skipped because its library is not installed."""

    def pm(prof: dict[str, Any] | None) -> MakeOptimizer:
        # named_parameters(), not the module: given a module, routing sends the last Linear to AdamW as an
        # "output head"; as (name, param) pairs every matrix goes to Muon, which is what we time.
        return lambda model: ProfiledMuon(model.named_parameters(), prof, **HPARAMS)

    lowrank = dict(method="lowrank", rank=rank, range_finder="power")
    rows = []
    if has_torch_muon:
        rows.append(
            Contender(
                "torch_muon",
                "torch.optim.Muon",
                "bfloat16",
                "bf16",
                lambda model: torch.optim.Muon(model.parameters(), **HPARAMS),  # type: ignore[attr-defined]
                ortho="ns5-jordan-bf16 (torch)",
                matrix_flops=lambda m, n: newton_schulz_flops(m, n, 5),
                spectral=OrthoConfig(),
            )
        )
    rows += [
        Contender("pm_default", "ProfiledMuon default (NS5)", "bfloat16", "bf16", pm(None), "profile=None"),
        Contender("pm_ns3_bf16", "ProfiledMuon NS3", "bfloat16", "bf16", pm(profile(ns_steps=3))),
        Contender("pm_lowrank_bf16", f"ProfiledMuon lowrank r{rank}", "bfloat16", "bf16", pm(profile(**lowrank))),
    ]
    if has_gram():  # Gram Newton-Schulz landed in muonprof: its rows appear by themselves
        rows.append(
            Contender("pm_gram", "ProfiledMuon gram (NS5)", "bfloat16", "bf16", pm(profile(gram=True)), optional=True)
        )
        for k in pe_steps:
            rows.append(
                Contender(
                    f"pm_gram_pe{k}",
                    f"ProfiledMuon gram + polar_express x{k}",
                    "bfloat16",
                    "bf16",
                    pm(profile(gram=True, coefficients="polar_express", ns_steps=k)),
                    optional=True,
                )
            )
    skipped = []
    for peer in peer_defs.peers(heavyball_compiled):
        why = peer_defs.missing(peer)
        if why is not None:
            skipped.append((peer.key, why))
            continue
        rows.append(
            Contender(
                peer.key,
                peer.label,
                peer.dtype,
                "bf16",
                lambda model, make=peer.make: make(list(model.parameters()), dict(HPARAMS)),
                peer.note,
                ortho=peer.ortho,
                matrix_flops=peer.matrix_flops,
                spectral=peer.spectral,
                resets_grads=peer.resets_grads,
                optional=True,
            )
        )
    rows += [
        Contender("pm_ns5_fp32", "ProfiledMuon NS5", "float32", "fp32", pm(profile(dtype="float32"))),
        Contender("pm_ns3_fp32", "ProfiledMuon NS3", "float32", "fp32", pm(profile(ns_steps=3, dtype="float32"))),
        Contender(
            "pm_lowrank_fp32",
            f"ProfiledMuon lowrank r{rank}",
            "float32",
            "fp32",
            pm(profile(**lowrank, dtype="float32")),
        ),
    ]
    return rows, skipped


@dataclass
class Row:
    key: str
    label: str
    dtype: str
    width: int
    ortho: str
    times_s: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    flops: float = math.nan
    median_s: float = math.nan
    min_s: float = math.nan
    max_s: float = math.nan
    iqr_s: float = math.nan
    achieved_flops_per_s: float = math.nan
    fraction_of_matmul: float = math.nan
    time_vs_torch: float | None = None
    # The median of the per-round ratios to torch.optim.Muon's step in the same round, and their quartiles:
    # rounds are interleaved, so a round's ratio cancels the machine's drift between rounds (the robust
    # statistic on a shared machine, where the medians of the raw times can move by 20-40%).
    paired_vs_torch: float | None = None
    paired_vs_torch_q: tuple[float, float] | None = None
    speedup_vs_ns5_same_dtype: float | None = None
    # Predicted alignment <G, O> / (||G||_* ||O||_op) of the row's update on the fixture gradients' spectra
    # (block 0), from the spectral model; None where the update is not a pure polynomial of the spectrum.
    descent_share: float | None = None
    # ||dW - dW_torch||_F / ||dW_torch||_F after the first step from the same weights: how far the row's
    # update is from torch.optim.Muon's (0 for the same recipe; a different polynomial gives ~0.1-0.5).
    update_vs_torch: float | None = None
    note: str = ""


def check_all_muon(opt: torch.optim.Optimizer, expected: int, contender: Contender) -> str:
    """Every matrix must be on the Muon path, else the row would time AdamW for part of the model."""
    if not isinstance(opt, ProfiledMuon):
        return contender.ortho or "?"
    rows = opt.describe()
    muon = [r for r in rows if r["optimizer"] == "muon"]
    if len(muon) != expected or len(rows) != expected:
        raise RuntimeError(f"expected {expected} Muon matrices, describe() says {len(muon)} of {len(rows)}")
    labels = sorted({r["ortho"] for r in muon})
    return ", ".join(labels)


def step_flops(opt: torch.optim.Optimizer, shapes: list[tuple[int, int]], contender: Contender) -> float:
    if isinstance(opt, ProfiledMuon):
        plans = [plan for plan in opt.plans.values() if plan.ortho is not None]
        return sum(ortho_flops(plan.matrix_shape, plan.ortho) for plan in plans)  # type: ignore[arg-type]
    if contender.matrix_flops is None:
        return math.nan
    return sum(contender.matrix_flops(m, n) for m, n in shapes)


def spectral_configs(opt: torch.optim.Optimizer, names: list[str], contender: Contender) -> list[OrthoConfig] | None:
    """The config whose spectral polynomial is the row's update, per matrix in ``names`` (None: not modelled)."""
    if isinstance(opt, ProfiledMuon):
        configs = [opt.plans[name].ortho for name in names]
        return None if any(c is None for c in configs) else configs  # type: ignore[return-value]
    return None if contender.spectral is None else [contender.spectral] * len(names)


def descent_share(spectra: list[Tensor], configs: list[OrthoConfig] | None) -> float | None:
    """Mean predicted alignment over the given matrices (see ``Row.descent_share``)."""
    if configs is None:
        return None
    return statistics.fmean(predict(s, c)["alignment"] for s, c in zip(spectra, configs))


def timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for one ``fn()`` (an optimizer step).

    CUDA: the call sits between a synchronize and a pair of events, so launch overhead counts (a
    launch-bound step is slow however idle the GPU) and no step overlaps the next.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Progress:
    """One line per event on stderr, so a long CPU run shows it is alive without touching stdout."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.prefix = ""

    def start(self, prefix: str) -> None:
        self.prefix = prefix

    def tick(self, message: str) -> None:
        if self.enabled:
            print(f"  [{self.prefix}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- interleaved timing


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: a reader can tell a quiet measurement from a noisy one."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


@dataclass
class Timed:
    """One contender of an interleaved measurement: a step to time and what to do, untimed, before it."""

    key: str
    label: str
    step: Callable[[], Any]
    before: Callable[[], None] | None = None  # e.g. re-set gradients a step consumed
    times_s: list[float] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)


def run_interleaved(
    entries: list[Timed],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    max_mean_s: float,
    seed: int,
    progress: Progress,
    after_first: Callable[[Timed], None] | None = None,
) -> dict[str, Any]:
    """Step every entry once per round, in an order shuffled each round; fill ``times_s`` / ``warmup_s``.

    Round by round rather than one contender after the other because a shared or throttled machine
    drifts over minutes: interleaving spreads the drift over every contender instead of biasing a ratio,
    and shuffling keeps one contender from always running after the same neighbour (cache, allocator,
    turbo state). The first warm-up round runs in the given order and calls ``after_first`` after each
    entry's step (a parity check can then compare against the entry listed first). Timing stops after
    ``repeats`` rounds, or once the entries spent ``max_mean_s`` each on average and 3 rounds are done
    (0: no cap). Returns the load averages before and after and the number of timed rounds.
    """
    order = random.Random(seed)
    load_before = load_average()

    def one(entry: Timed, sink: list[float], what: str) -> None:
        progress.start(entry.label)
        if entry.before is not None:
            entry.before()
        sink.append(timed_call(entry.step, device))
        progress.tick(f"{what} {len(sink)} {sink[-1] * 1e3:,.1f} ms")

    for i in range(max(warmup, 1)):
        shuffled = entries[:]
        if i:
            order.shuffle(shuffled)
        for entry in shuffled:
            one(entry, entry.warmup_s, "warm-up")
            if i == 0 and after_first is not None:
                after_first(entry)
    spent, rounds = 0.0, 0
    budget = max_mean_s * len(entries)
    while rounds < repeats and not (rounds >= min(3, repeats) and spent >= budget > 0):
        shuffled = entries[:]
        order.shuffle(shuffled)
        for entry in shuffled:
            one(entry, entry.times_s, "step")
            spent += entry.times_s[-1]
        rounds += 1
    return {"load_before": load_before, "load_after": load_average(), "rounds": rounds, "order_seed": seed}


def summarize(times: list[float]) -> dict[str, float]:
    """Median, min, max and interquartile range (NaN with fewer than 4 samples) of ``times``."""
    t = sorted(times)
    iqr = math.nan
    if len(t) >= 4:
        q = statistics.quantiles(t, n=4)
        iqr = q[2] - q[0]
    return {"median_s": statistics.median(t), "min_s": t[0], "max_s": t[-1], "iqr_s": iqr}


# --------------------------------------------------------------------------- parity


def paired_ratio(times: list[float], reference: list[float]) -> tuple[float | None, tuple[float, float] | None]:
    """Median and quartiles of times[i] / reference[i] over the rounds both were timed in (None if fewer
    than 3 rounds pair up; quartiles need 4)."""
    ratios = [a / b for a, b in zip(times, reference) if b > 0]
    if len(ratios) < 3 or len(times) != len(reference):
        return None, None
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else None
    return statistics.median(ratios), (quartiles[0], quartiles[2]) if quartiles else None


def compare_params(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Any]:
    """Max |a - b| and how many matrices differ; bitwise equality is the expectation on CPU."""
    max_abs, max_rel, differing = 0.0, 0.0, 0
    for name, x in a.items():
        y = b[name]
        if not torch.equal(x, y):
            differing += 1
            diff = (x.float() - y.float()).abs().max().item()
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / max(x.float().abs().max().item(), 1e-30))
    return {"exact": differing == 0, "differing_matrices": differing, "max_abs_diff": max_abs, "max_rel_diff": max_rel}


def update_distance(before: dict[str, Tensor], after: dict[str, Tensor], ref_after: dict[str, Tensor]) -> float:
    """||dW - dW_ref||_F / ||dW_ref||_F over all matrices, with dW = after - before (see ``Row.update_vs_torch``)."""
    num = den = 0.0
    for name, w0 in before.items():
        d_ref = ref_after[name].double() - w0.double()
        num += float((after[name].double() - w0.double() - d_ref).square().sum())
        den += float(d_ref.square().sum())
    return math.sqrt(num / den) if den > 0 else math.nan


# --------------------------------------------------------------------------- run


def fmt_paired(median: float | None, quartiles: tuple[float, float] | list[float] | None) -> str:
    if median is None:
        return "-"
    return f"{median:.2f}" + ("" if quartiles is None else f" ({quartiles[0]:.2f}-{quartiles[1]:.2f})")


def fmt_rate(flops_per_s: float, unit: str) -> str:
    if not math.isfinite(flops_per_s):
        return "-"
    return f"{flops_per_s / (1e12 if unit == 'TFLOP/s' else 1e9):,.1f}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    HPARAMS["weight_decay"] = args.weight_decay
    on_gpu = device.type == "cuda"
    if args.quick:
        width, blocks = args.width or 256, args.blocks or 2
        repeats, warmup = args.repeats or 2, args.warmup if args.warmup is not None else 1
        max_n = 1024
    else:
        width, blocks = args.width or GPT2_WIDTH, args.blocks or GPT2_BLOCKS
        repeats = args.repeats or (20 if on_gpu else 5)
        warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
        max_n = 8192 if on_gpu else 2048
    if width % 64:
        raise SystemExit(f"--width must be a multiple of 64, got {width}")
    if any(k < 1 or k > 8 for k in args.pe_steps):
        raise SystemExit(f"--pe-steps: polar_express has 8 steps; got {args.pe_steps}")
    heavyball_compiled = {"on": True, "off": False, "auto": not args.quick}[args.heavyball_compile]
    progress = Progress(not args.silent)

    info = device_info(device)
    info["peers"] = {m: peer_defs.installed_version(m) for m in ("optimuon", "heavyball", "muon")}
    progress.start("probe")
    probes = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        probes[name] = probe_matmul(dtype, device, max_n=max_n)
        progress.tick(f"{name} matmul {probes[name]['flops_per_s'] / 1e9:,.1f} GFLOP/s at n={probes[name]['best_n']}")
    ratio = probes["bfloat16"]["flops_per_s"] / probes["float32"]["flops_per_s"]
    bf16_native = ratio >= 0.5

    bf16_width, torch_estimate_s = pick_bf16_width(width, blocks, probes["bfloat16"]["flops_per_s"], args.bf16_budget_s)
    shrunk = bf16_width != width
    rank = min(LOWRANK_RANK, bf16_width)
    has_torch_muon = hasattr(torch.optim, "Muon")
    chosen, missing = contenders(
        has_torch_muon, rank, pe_steps=tuple(args.pe_steps), heavyball_compiled=heavyball_compiled
    )
    chosen = [c for c in chosen if not args.only or c.key in args.only]
    skipped = [line for key, line in missing if not args.only or key in args.only]
    if any(c.dtype == "float16" for c in chosen):
        probes["float16"] = probe_matmul(torch.float16, device, max_n=max_n)
        progress.tick(f"float16 matmul {probes['float16']['flops_per_s'] / 1e9:,.1f} GFLOP/s")
        chosen, slow = drop_slow_fp16(chosen, bf16_width, blocks, probes["float16"]["flops_per_s"], args.bf16_budget_s)
        skipped += slow
    unit = "TFLOP/s" if max(p["flops_per_s"] for p in probes.values()) >= 1e12 else "GFLOP/s"

    rows: list[Row] = []
    parity: dict[str, Any] | None = None
    timing: dict[str, Any] = {}
    for group in ("bf16", "fp32"):
        members = [c for c in chosen if c.group == group]
        if members:
            w = bf16_width if group == "bf16" else width
            group_rows, group_parity, timing[group], failed = time_group(
                members, w, blocks, device, args, repeats, warmup, progress
            )
            rows += group_rows
            skipped += failed
            parity = group_parity or parity
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    # Statistics first, then ratios (a row's reference may come after it).
    by_key = {r.key: r for r in rows}
    for r in rows:
        for k, v in summarize(r.times_s).items():
            setattr(r, k, v)
        r.achieved_flops_per_s = r.flops / r.median_s
        r.fraction_of_matmul = r.achieved_flops_per_s / probes[r.dtype]["flops_per_s"]
    for r in rows:
        ref = by_key.get("torch_muon")
        if ref is not None and ref.width == r.width:
            r.time_vs_torch = r.median_s / ref.median_s
            r.paired_vs_torch, r.paired_vs_torch_q = paired_ratio(r.times_s, ref.times_s)
        ns5 = by_key.get("pm_ns5_fp32" if r.dtype == "float32" else "pm_default")
        if ns5 is not None and ns5.width == r.width and ns5.dtype == r.dtype:
            r.speedup_vs_ns5_same_dtype = ns5.median_s / r.median_s

    targets = evaluate_targets(by_key, on_gpu)
    return {
        "info": info,
        "probes": probes,
        "bf16_over_fp32": ratio,
        "bf16_native": bf16_native,
        "unit": unit,
        "config": {
            "width": width,
            "blocks": blocks,
            "bf16_width": bf16_width,
            "bf16_shrunk": shrunk,
            "torch_muon_estimate_s_full_width": torch_estimate_s,
            "bf16_budget_s": args.bf16_budget_s,
            "repeats": repeats,
            "warmup": warmup,
            "max_row_s": args.max_row_s,
            "lowrank_rank": rank,
            "pe_steps": list(args.pe_steps),
            "heavyball_compiled": heavyball_compiled,
            "has_gram": has_gram(),
            "hparams": HPARAMS,
            "quick": args.quick,
            "has_torch_muon": has_torch_muon,
        },
        "skipped": skipped,
        "timing": timing,
        "rows": [asdict(r) for r in rows],
        "parity": parity,
        "targets": targets,
    }


def drop_slow_fp16(
    chosen: list[Contender], width: int, blocks: int, fp16_rate: float, budget_s: float
) -> tuple[list[Contender], list[str]]:
    """Drop float16 rows whose step, estimated from its flops at the probed fp16 rate, exceeds ``budget_s``.

    fp16 on a CPU without AVX512-FP16 / AMX-FP16 can run at a few GFLOP/s: one optimuon-default step at
    GPT-2 size would then take minutes. The skip line says so instead.
    """
    shapes = [(o, i) for _, i, o in gpt2_shapes(width, blocks)]
    keep, skipped = [], []
    for c in chosen:
        est = sum(c.matrix_flops(m, n) for m, n in shapes) / fp16_rate if c.matrix_flops else 0.0
        if c.dtype == "float16" and est > budget_s:
            skipped.append(
                f"{c.label}: skipped, one step would take ~{est:.0f} s at the probed fp16 rate "
                f"({fp16_rate / 1e9:.1f} GFLOP/s) > --bf16-budget-s {budget_s:g}"
            )
        else:
            keep.append(c)
    return keep, skipped


def time_group(
    members: list[Contender],
    width: int,
    blocks: int,
    device: torch.device,
    args: argparse.Namespace,
    repeats: int,
    warmup: int,
    progress: Progress,
) -> tuple[list[Row], dict[str, Any] | None, dict[str, Any], list[str]]:
    """Time the contenders of one width with ``run_interleaved``; parity and update distance on the way;
    the last item lists the optional rows that could not be built.

    The first (warm-up) step of each starts from the same weights and gradients; torch.optim.Muon, when
    present, is listed first, so every other row's first update can be compared with its update right
    after that step (then dropped: keeping every row's weights would cost a model copy each).
    """
    fx = Fixture.make(width, blocks, device, args.seed)
    members = sorted(members, key=lambda c: c.key != "torch_muon")  # torch first: the reference
    names0 = [name for name, *_ in gpt2_shapes(width, blocks)[:4]]  # block 0: the descent-share sample
    spectra = [torch.linalg.svdvals(fx.grads[n].double().cpu()) for n in names0]
    built: dict[str, tuple[Contender, Blocks, torch.optim.Optimizer, Row]] = {}
    entries = []
    skipped: list[str] = []
    for c in members:
        model = fx.model(device)
        try:
            opt = c.make(model)
        except Exception as err:
            if not c.optional:
                raise
            skipped.append(f"{c.label}: skipped, could not be built: {type(err).__name__}: {err}".splitlines()[0])
            continue
        row = Row(c.key, c.label, c.dtype, width, check_all_muon(opt, 4 * blocks, c), note=c.note)
        row.flops = step_flops(opt, fx.shapes(), c)
        row.descent_share = descent_share(spectra, spectral_configs(opt, names0, c))
        built[c.key] = (c, model, opt, row)
        before = functools.partial(reset_grads, model, fx.grads) if c.resets_grads else None
        entries.append(Timed(c.key, f"{c.label} {c.dtype} d={width}", opt.step, before))

    reference: dict[str, dict[str, Tensor]] = {}
    parity: dict[str, Any] | None = None

    def after_first(entry: Timed) -> None:
        nonlocal parity
        c, model, _, row = built[entry.key]
        after = {n: p.detach() for n, p in model.named_parameters()}
        if c.key == "torch_muon":
            reference.update({n: w.clone() for n, w in after.items()})
            return
        if reference:
            row.update_vs_torch = update_distance(fx.weights, after, reference)
            if c.key == "pm_default":
                parity = {"width": width, **compare_params(reference, after)}
        moved = any(not torch.equal(after[n], fx.weights[n]) for n in names0)
        if not moved:
            raise RuntimeError(f"{c.label}: its first step left the weights unchanged: it did no work")

    timing = run_interleaved(
        entries,
        device,
        warmup=warmup,
        repeats=repeats,
        max_mean_s=args.max_row_s,
        seed=args.seed,
        progress=progress,
        after_first=after_first,
    )
    reference.clear()
    rows = []
    for entry in entries:
        row = built[entry.key][3]
        row.times_s, row.warmup_s = entry.times_s, entry.warmup_s
        rows.append(row)
    return rows, parity, timing, skipped


def reset_grads(model: nn.Module, grads: dict[str, Tensor]) -> None:
    """Put the fixed gradients back (for peers whose step consumes or overwrites ``.grad``); untimed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is None:
                p.grad = grads[name].clone()
            else:
                p.grad.copy_(grads[name])


def evaluate_targets(by_key: dict[str, Row], on_gpu: bool) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met."""
    out = []
    default, torch_row = by_key.get("pm_default"), by_key.get("torch_muon")
    if default and torch_row and default.width == torch_row.width:
        ratio = vs_torch(default, torch_row)
        out.append(
            {"target": "ProfiledMuon default / torch.optim.Muon time <= 1.0", "value": ratio, "met": ratio <= 1.0}
        )
        if on_gpu:
            speedup = 1 / ratio
            out.append(
                {"target": "GPU: torch.optim.Muon / ProfiledMuon default >= 2x", "value": speedup, "met": speedup >= 2}
            )
    for dtype, ns5_key, lr_key in (
        ("bf16", "pm_default", "pm_lowrank_bf16"),
        ("fp32", "pm_ns5_fp32", "pm_lowrank_fp32"),
    ):
        ns5, lr = by_key.get(ns5_key), by_key.get(lr_key)
        if ns5 and lr and ns5.width == lr.width:
            speedup = ns5.median_s / lr.median_s
            out.append({"target": f"{dtype}: lowrank r96 >= 4x faster than NS5", "value": speedup, "met": speedup >= 4})
    gram = gram_target(by_key)
    if gram is not None:
        out.append(gram)
    return out


def vs_torch(row: Row, torch_row: Row) -> float:
    """The paired per-round ratio where the rounds pair up, else the ratio of the medians."""
    return row.paired_vs_torch if row.paired_vs_torch is not None else row.median_s / torch_row.median_s


def gram_target(by_key: dict[str, Row]) -> dict[str, Any] | None:
    """Full-rank target: the fewest-step gram + Polar Express row that reaches the default's predicted descent
    share must take <= GRAM_TARGET x torch.optim.Muon's step."""
    default, torch_row = by_key.get("pm_default"), by_key.get("torch_muon")
    if default is None or torch_row is None or default.descent_share is None:
        return None
    pe = sorted(
        (r for r in by_key.values() if r.key.startswith("pm_gram_pe") and r.width == torch_row.width),
        key=lambda r: int(r.key.removeprefix("pm_gram_pe")),
    )
    reaching = [r for r in pe if r.descent_share is not None and r.descent_share >= default.descent_share - 1e-9]
    if not reaching:
        return (
            None
            if not pe
            else {
                "target": f"gram + polar_express at the default's descent share ({default.descent_share:.3f}) "
                f"<= {GRAM_TARGET}x torch.optim.Muon",
                "value": math.nan,
                "met": False,
                "row": None,
            }
        )
    r = reaching[0]
    ratio = vs_torch(r, torch_row)
    return {
        "target": f"{r.label} (descent share {r.descent_share:.3f} >= default's {default.descent_share:.3f}) "
        f"<= {GRAM_TARGET}x torch.optim.Muon",
        "value": ratio,
        "met": ratio <= GRAM_TARGET,
        "row": r.key,
    }


# --------------------------------------------------------------------------- output


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    info, probes, cfg, unit = result["info"], result["probes"], result["config"], result["unit"]
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    cpu = info["cpu"]
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu.get("flags", {}).items())
    git = info["git"]
    changed = (
        f" + uncommitted changes to {len(git['muonprof_changes'])} muonprof file(s)" if git["muonprof_changes"] else ""
    )
    console.print(
        f"[bold]torch[/bold] {info['torch']}  muonprof {info['muonprof']} (git {git['commit'] or '?'}{changed})  "
        f"device {info['device']}"
    )
    if "gpu" in info:
        g = info["gpu"]
        console.print(
            f"[bold]GPU[/bold] {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB, CUDA {g['cuda']}, "
            f"tf32 matmul {g['allow_tf32_matmul']})"
        )
    console.print(
        f"[bold]CPU[/bold] {cpu['model']}  threads {info['threads']}  capability {cpu.get('cpu_capability', '?')}"
    )
    console.print(f"    flags: {flags}")
    for name in ("float32", "bfloat16"):
        p = probes[name]
        console.print(f"[bold]matmul {name}[/bold]: {p['flops_per_s'] / scale:,.1f} {unit} (square n={p['best_n']})")
    native = "native (>= 0.5x fp32)" if result["bf16_native"] else "NOT native (< 0.5x fp32)"
    console.print(f"bf16/fp32 matmul rate: {result['bf16_over_fp32']:.2f} -> bf16 {native}")
    est = cfg["torch_muon_estimate_s_full_width"]
    est_text = f"{est:.1f} s" if est >= 1 else f"{est * 1e3:.1f} ms"
    console.print(
        f"model: {cfg['blocks']} blocks x 4 Linears at d={cfg['width']} ({4 * cfg['blocks']} matrices); "
        f"torch.optim.Muon step estimated {est_text} at the bf16 rate (budget {cfg['bf16_budget_s']:g} s)"
    )
    if cfg["bf16_shrunk"]:
        console.print(
            f"[bold yellow]bf16 rows run at REDUCED width d={cfg['bf16_width']}[/bold yellow] (same shape ratios; "
            f"bf16 is {'' if result['bf16_native'] else 'not '}native here and a full-width torch.optim.Muon step "
            f"would take ~{est:.0f} s > {cfg['bf16_budget_s']:g} s): "
            "their absolute times are NOT comparable with the fp32 rows at full width; ratios between rows "
            "of the same width are valid."
        )
    if not cfg["has_torch_muon"]:
        console.print("[yellow]torch.optim.Muon is missing (torch < 2.9): no torch row, no ratios against it.[/yellow]")
    peers_text = ", ".join(f"{m} {v or 'not installed'}" for m, v in info.get("peers", {}).items())
    console.print(
        f"peers: {peers_text}; HeavyBall compiled: {cfg['heavyball_compiled']}; gram in muonprof: {cfg['has_gram']}"
    )
    for line in result["skipped"]:
        console.print(f"[yellow]{line}[/yellow]")
    for group, t in result["timing"].items():
        console.print(
            f"timing {group}: {t['rounds']} interleaved rounds (order shuffled per round, seed {t['order_seed']}); "
            f"load average before {t['load_before']}, after {t['load_after']}"
        )

    table = Table(title="one optimizer step (medians)", show_lines=False)
    for col, kw in (
        ("contender", {"no_wrap": True}),
        ("dtype", {}),
        ("d", {"justify": "right"}),
        ("n", {"justify": "right"}),
        ("median ms", {"justify": "right"}),
        ("IQR ms", {"justify": "right"}),
        ("min-max ms", {"justify": "right"}),
        ("GFLOP/step", {"justify": "right"}),
        (unit, {"justify": "right"}),
        ("% matmul", {"justify": "right"}),
        ("t / t_torch", {"justify": "right"}),
        ("paired (IQR)", {"justify": "right"}),
        ("x vs NS5 same dtype", {"justify": "right"}),
        ("descent", {"justify": "right"}),
        ("dW vs torch", {"justify": "right"}),
    ):
        table.add_column(col, **kw)
    for r in result["rows"]:
        dt = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[r["dtype"]]
        table.add_row(
            r["label"],
            dt,
            str(r["width"]),
            str(len(r["times_s"])),
            f"{r['median_s'] * 1e3:,.1f}",
            "-" if not math.isfinite(r["iqr_s"]) else f"{r['iqr_s'] * 1e3:,.1f}",
            f"{r['min_s'] * 1e3:,.0f}-{r['max_s'] * 1e3:,.0f}",
            "-" if not math.isfinite(r["flops"]) else f"{r['flops'] / 1e9:,.1f}",
            fmt_rate(r["achieved_flops_per_s"], unit),
            "-" if not math.isfinite(r["fraction_of_matmul"]) else f"{100 * r['fraction_of_matmul']:.0f}%",
            "-" if r["time_vs_torch"] is None else f"{r['time_vs_torch']:.2f}",
            fmt_paired(r["paired_vs_torch"], r["paired_vs_torch_q"]),
            "-" if r["speedup_vs_ns5_same_dtype"] is None else f"{r['speedup_vs_ns5_same_dtype']:.2f}x",
            "-" if r["descent_share"] is None else f"{r['descent_share']:.3f}",
            "-" if r["update_vs_torch"] is None else f"{r['update_vs_torch']:.3f}",
        )
    console.print(table)
    console.print(
        "t / t_torch: median time over torch.optim.Muon's on the same shapes (< 1 is faster). "
        "paired: the median (quartiles) of the per-round ratios to torch.optim.Muon's step in the same round. "
        "x vs NS5: how many times faster than 5-step Newton-Schulz in the same dtype and width. "
        "% matmul: counted matmul FLOP/s (newton_schulz_flops / lowrank_flops) over the probed dense rate "
        "in that dtype. "
        "torch.optim.Muon always computes in bf16, so it has no fp32 counterpart. "
        "IQR: interquartile range of the timed steps (- below 4 steps). "
        "descent: the spectral model's predicted <G, O> / (||G||_* ||O||_op) on block 0's gradient spectra "
        "(random Gaussian gradients: a fixture, not a training spectrum; - where the update is not a pure "
        "polynomial, e.g. NorMuon). dW vs torch: ||dW - dW_torch|| / ||dW_torch|| after the first step."
    )
    parity = result["parity"]
    if parity is None:
        console.print("parity: not checked (needs both the torch and the default ProfiledMuon row)")
    elif parity["exact"]:
        console.print(f"parity (one step from identical weights and grads, d={parity['width']}): [green]exact[/green]")
    else:
        console.print(
            f"parity (d={parity['width']}): [red]differs[/red] in {parity['differing_matrices']} matrices, "
            f"max |diff| {parity['max_abs_diff']:.3g} (relative {parity['max_rel_diff']:.3g})"
        )
    if cfg["quick"] or cfg["width"] != GPT2_WIDTH or cfg["blocks"] != GPT2_BLOCKS:
        console.print("[yellow]targets below are for GPT-2 small; at this model size they are not meaningful[/yellow]")
    for t in result["targets"]:
        mark = "[green]met[/green]" if t["met"] else "[red]NOT met[/red]"
        console.print(f"target {t['target']}: {t['value']:.2f} -> {mark}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 5 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 3 on GPU; >= 1)")
    p.add_argument(
        "--max-row-s",
        type=float,
        default=20.0,
        help="stop timing a group once its rows spent this many seconds each on average and 3 rounds are done "
        "(0: never); default 20",
    )
    p.add_argument(
        "--bf16-budget-s",
        type=float,
        default=20.0,
        help="if one torch.optim.Muon step would take longer at the probed bf16 rate, run the bf16 rows narrower",
    )
    p.add_argument("--width", type=int, default=None, help="model width (default 768; --quick: 256)")
    p.add_argument("--blocks", type=int, default=None, help="number of blocks (default 12; --quick: 2)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--only", nargs="+", default=None, help="run only these rows (keys as in the JSON)")
    p.add_argument(
        "--pe-steps",
        type=int,
        nargs="+",
        default=list(PE_STEPS),
        help="steps k of the 'ProfiledMuon gram + polar_express xk' rows (need gram in OrthoConfig); default 3 4 5",
    )
    p.add_argument(
        "--heavyball-compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="HeavyBall's torch.compile (its default; minutes of warm-up on a CPU): auto = on, off with --quick",
    )
    p.add_argument("--weight-decay", type=float, default=0.01, help="for every row (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small model and 2 repeats: a smoke test, < 30 s")
    p.add_argument("--json", type=Path, default=None, help="write every number (and the machine's details) here")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def run_and_report(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any]], None],
) -> None:
    """Run a benchmark, print its tables and total wall time, and write ``--json`` if asked (shared by the
    benchmarks in this folder)."""
    t0 = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - t0
    render(result)
    print(f"total {result['wall_s']:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_args(argv), run, render)


if __name__ == "__main__":
    main()
