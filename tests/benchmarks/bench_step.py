"""Time one optimizer step on GPT-2-small's hidden matrices: ProfiledMuon's recipes vs torch.optim.Muon.

Why this exists: ProfiledMuon claims to be torch.optim.Muon when given no profile (bit for bit on CPU)
and at least as fast, faster on a GPU where it batches same-shape layers, and that a profile buys real
time (a rank-96 low-rank orthogonalizer, fewer Newton-Schulz steps). Those claims are only worth
something with numbers from the machine they were made on, next to what that machine can do at all:
every row is reported as a fraction of the dense matmul rate measured here in the dtype it computes in.

What is timed: ``optimizer.step()`` alone, on 12 GPT-2 blocks of bias-free ``nn.Linear`` layers
(c_attn 768->2304, attn c_proj 768->768, c_fc 768->3072, mlp c_proj 3072->768: 48 matrices, 85M
parameters) with fixed random gradients set once (no forward or backward pass). All contenders run in
one process, one after the other, on freshly built copies of the same weights and gradients.

CPUs differ wildly in bf16: with AMX or AVX512-BF16 it is faster than fp32, without either it can be a
hundred times slower. So the bf16 and fp32 matmul rates are probed first; if one torch.optim.Muon step
(always bf16) would take longer than ``--bf16-budget-s`` at the measured bf16 rate, the bf16 contenders
run on a narrower model with the same shape ratios, and the output says so. The fp32 rows always run at
the full width.

Run from the repository root (excluded from the default pytest run)::

    python -m tests.benchmarks.bench_step            # full run, ~3-4 min on 2 CPU cores
    python -m tests.benchmarks.bench_step --quick    # smoke test, well under a minute
    python -m tests.benchmarks.bench_step --device cuda --json bench-out/step.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
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

PROFILE_FORMAT = "muonprof.profile/1"
GPT2_WIDTH = 768
GPT2_BLOCKS = 12
LOWRANK_RANK = 96
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


def ortho_flops(shape: tuple[int, int], config: OrthoConfig) -> float:
    if config.method == "newton_schulz":
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


@dataclass
class Contender:
    key: str
    label: str
    dtype: str  # the dtype the orthogonalizer computes in
    group: str  # "bf16" (runs at the bf16 width) or "fp32" (always full width)
    make: Callable[[Blocks], torch.optim.Optimizer]
    note: str = ""


def contenders(has_torch_muon: bool, rank: int) -> list[Contender]:
    def pm(prof: dict[str, Any] | None) -> Callable[[Blocks], torch.optim.Optimizer]:
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
            )
        )
    rows += [
        Contender("pm_default", "ProfiledMuon default (NS5)", "bfloat16", "bf16", pm(None), "profile=None"),
        Contender("pm_ns3_bf16", "ProfiledMuon NS3", "bfloat16", "bf16", pm(profile(ns_steps=3))),
        Contender("pm_lowrank_bf16", f"ProfiledMuon lowrank r{rank}", "bfloat16", "bf16", pm(profile(**lowrank))),
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
    return rows


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
    speedup_vs_ns5_same_dtype: float | None = None
    note: str = ""


def check_all_muon(opt: torch.optim.Optimizer, expected: int) -> str:
    """Every matrix must be on the Muon path, else the row would time AdamW for part of the model."""
    if not isinstance(opt, ProfiledMuon):
        return "ns5-jordan-bf16 (torch)"
    rows = opt.describe()
    muon = [r for r in rows if r["optimizer"] == "muon"]
    if len(muon) != expected or len(rows) != expected:
        raise RuntimeError(f"expected {expected} Muon matrices, describe() says {len(muon)} of {len(rows)}")
    labels = sorted({r["ortho"] for r in muon})
    return ", ".join(labels)


def step_flops(opt: torch.optim.Optimizer, shapes: list[tuple[int, int]]) -> float:
    if not isinstance(opt, ProfiledMuon):
        return torch_muon_step_flops(shapes)
    return sum(ortho_flops(plan.matrix_shape, plan.ortho) for plan in opt.plans.values() if plan.ortho is not None)


def timed_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    """Seconds for one ``opt.step()``.

    CUDA: the step sits between a synchronize and a pair of events, so launch overhead counts (a
    launch-bound step is slow however idle the GPU) and no step overlaps the next.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    opt.step()
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


# --------------------------------------------------------------------------- parity


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


# --------------------------------------------------------------------------- run


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
    progress = Progress(not args.silent)

    info = device_info(device)
    progress.start("probe")
    probes = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        probes[name] = probe_matmul(dtype, device, max_n=max_n)
        progress.tick(f"{name} matmul {probes[name]['flops_per_s'] / 1e9:,.1f} GFLOP/s at n={probes[name]['best_n']}")
    ratio = probes["bfloat16"]["flops_per_s"] / probes["float32"]["flops_per_s"]
    bf16_native = ratio >= 0.5
    unit = "TFLOP/s" if max(p["flops_per_s"] for p in probes.values()) >= 1e12 else "GFLOP/s"

    bf16_width, torch_estimate_s = pick_bf16_width(width, blocks, probes["bfloat16"]["flops_per_s"], args.bf16_budget_s)
    shrunk = bf16_width != width
    rank = min(LOWRANK_RANK, bf16_width)
    has_torch_muon = hasattr(torch.optim, "Muon")

    chosen = [c for c in contenders(has_torch_muon, rank) if not args.only or c.key in args.only]
    rows: list[Row] = []
    parity: dict[str, Any] | None = None
    for group in ("bf16", "fp32"):
        members = [c for c in chosen if c.group == group]
        if members:
            w = bf16_width if group == "bf16" else width
            group_rows, group_parity = time_group(members, w, blocks, device, args, repeats, warmup, progress)
            rows += group_rows
            parity = group_parity or parity
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    # Statistics first, then ratios (a row's reference may come after it).
    by_key = {r.key: r for r in rows}
    for r in rows:
        t = sorted(r.times_s)
        r.median_s = statistics.median(t)
        r.min_s, r.max_s = t[0], t[-1]
        if len(t) >= 4:
            q = statistics.quantiles(t, n=4)
            r.iqr_s = q[2] - q[0]
        r.achieved_flops_per_s = r.flops / r.median_s
        r.fraction_of_matmul = r.achieved_flops_per_s / probes[r.dtype]["flops_per_s"]
    for r in rows:
        ref = by_key.get("torch_muon")
        if ref is not None and ref.width == r.width:
            r.time_vs_torch = r.median_s / ref.median_s
        ns5 = by_key.get("pm_default" if r.dtype == "bfloat16" else "pm_ns5_fp32")
        if ns5 is not None and ns5.width == r.width:
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
            "hparams": HPARAMS,
            "quick": args.quick,
            "has_torch_muon": has_torch_muon,
        },
        "rows": [asdict(r) for r in rows],
        "parity": parity,
        "targets": targets,
    }


def time_group(
    members: list[Contender],
    width: int,
    blocks: int,
    device: torch.device,
    args: argparse.Namespace,
    repeats: int,
    warmup: int,
    progress: Progress,
) -> tuple[list[Row], dict[str, Any] | None]:
    """Time the contenders of one width round-robin: step each once per round.

    Round-robin rather than one row after the other because a shared or thermally throttled machine
    drifts over minutes; interleaving spreads that drift over every row instead of biasing the ratios.
    The first (warm-up) step of each starts from the same weights and gradients, which is what the
    parity check between torch.optim.Muon and the default ProfiledMuon compares.
    """
    fx = Fixture.make(width, blocks, device, args.seed)
    built: list[tuple[Contender, Blocks, torch.optim.Optimizer, Row]] = []
    for c in members:
        model = fx.model(device)
        opt = c.make(model)
        row = Row(c.key, c.label, c.dtype, width, check_all_muon(opt, 4 * blocks), note=c.note)
        row.flops = step_flops(opt, fx.shapes())
        built.append((c, model, opt, row))
    del fx

    after_first: dict[str, dict[str, Tensor]] = {}
    for i in range(max(warmup, 1)):
        for c, model, opt, row in built:
            progress.start(f"{c.label} {c.dtype} d={width}")
            synchronize(device)
            t0 = time.perf_counter()
            opt.step()
            synchronize(device)
            row.warmup_s.append(time.perf_counter() - t0)
            progress.tick(f"warm-up {row.warmup_s[-1] * 1e3:.0f} ms")
            if i == 0 and c.key in ("torch_muon", "pm_default"):
                after_first[c.key] = {n: p.detach().clone() for n, p in model.named_parameters()}
    parity = None
    if len(after_first) == 2:
        parity = {"width": width, **compare_params(after_first["torch_muon"], after_first["pm_default"])}
    del after_first

    spent = 0.0
    budget = args.max_row_s * len(built)
    rounds = 0
    while rounds < repeats and not (rounds >= min(3, repeats) and spent >= budget > 0):
        for c, _, opt, row in built:
            progress.start(f"{c.label} {c.dtype} d={width}")
            seconds = timed_step(opt, device)
            row.times_s.append(seconds)
            spent += seconds
            progress.tick(f"step {len(row.times_s)} {seconds * 1e3:.0f} ms")
        rounds += 1
    return [row for *_, row in built], parity


def evaluate_targets(by_key: dict[str, Row], on_gpu: bool) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it was met."""
    out = []
    default, torch_row = by_key.get("pm_default"), by_key.get("torch_muon")
    if default and torch_row and default.width == torch_row.width:
        ratio = default.median_s / torch_row.median_s
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
    return out


# --------------------------------------------------------------------------- output


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
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

    table = Table(title="one optimizer step (medians)", show_lines=False)
    for col, kw in (
        ("contender", {}),
        ("dtype", {}),
        ("d", {"justify": "right"}),
        ("n", {"justify": "right"}),
        ("median ms", {"justify": "right"}),
        ("min-max ms", {"justify": "right"}),
        ("GFLOP/step", {"justify": "right"}),
        (unit, {"justify": "right"}),
        ("% matmul", {"justify": "right"}),
        ("t / t_torch", {"justify": "right"}),
        ("x vs NS5 same dtype", {"justify": "right"}),
    ):
        table.add_column(col, **kw)
    for r in result["rows"]:
        dt = "bf16" if r["dtype"] == "bfloat16" else "fp32"
        table.add_row(
            r["label"],
            dt,
            str(r["width"]),
            str(len(r["times_s"])),
            f"{r['median_s'] * 1e3:,.1f}",
            f"{r['min_s'] * 1e3:,.0f}-{r['max_s'] * 1e3:,.0f}",
            f"{r['flops'] / 1e9:,.1f}",
            fmt_rate(r["achieved_flops_per_s"], unit),
            f"{100 * r['fraction_of_matmul']:.0f}%",
            "-" if r["time_vs_torch"] is None else f"{r['time_vs_torch']:.2f}",
            "-" if r["speedup_vs_ns5_same_dtype"] is None else f"{r['speedup_vs_ns5_same_dtype']:.2f}x",
        )
    console.print(table)
    console.print(
        "t / t_torch: median time over torch.optim.Muon's on the same shapes (< 1 is faster). "
        "x vs NS5: how many times faster than 5-step Newton-Schulz in the same dtype and width. "
        "% matmul: counted matmul FLOP/s (newton_schulz_flops / lowrank_flops) over the probed dense rate "
        "in that dtype. "
        "torch.optim.Muon always computes in bf16, so it has no fp32 counterpart."
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
    p.add_argument("--weight-decay", type=float, default=0.01, help="for every row (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small model and 2 repeats: a smoke test, < 30 s")
    p.add_argument("--json", type=Path, default=None, help="write every number (and the machine's details) here")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - t0
    render(result)
    print(f"total {result['wall_s']:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
