"""What a ladder's quality signal costs: ``optimizer.step()`` with the signal measured vs the same static recipe.

Why this exists: issue 17 asks that measuring the signals cost at most 3% of the optimizer step at the
default K (``every`` = 50). A ladder that never moves (floor 0, margin 1, so no decision can change the
rung) measured at every step (``every`` = 1) is timed against the static profile of the same recipe, on a
built-in model's real gradients (one forward/backward pass), interleaved round by round in one process so
the machine's drift hits both alike. The per-measurement overhead is (ladder - static) / static; the
overhead at K steps is that divided by K (one measurement, including its one host read, every K steps).

    python -m tests.benchmarks.bench_ladder_overhead llama-20m --seq-len 32 --rounds 7
    python -m tests.benchmarks.bench_ladder_overhead gpt2-tiny --json bench-out/ladder-overhead.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from muonprof import ProfiledMuon
from muonprof.workload import build_workload

RECIPES: dict[str, dict[str, Any]] = {
    "ns5-bf16 (default)": {},
    "ns5-fp32": {"dtype": "float32"},
    "lowrank-r32": {"method": "lowrank", "rank": 32},
}
TOP = {"method": "newton_schulz", "ns_steps": 10, "dtype": "float32"}  # never reached: a second rung to have a ladder


def static_profile(recipe: dict[str, Any]) -> dict[str, Any]:
    return {"format": "muonprof.profile/1", "defaults": dict(recipe)}


def measuring_profile(recipe: dict[str, Any], every: int) -> dict[str, Any]:
    ladder = {"rungs": [dict(recipe), TOP], "floor": 0.0, "margin": 1.0, "every": every}
    return {"format": "muonprof.profile/1", "defaults": {"ladder": ladder}}


def timed_steps(opt: torch.optim.Optimizer, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` consecutive steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def signal_parts(opt: ProfiledMuon, repeats: int) -> list[dict[str, Any]]:
    """Per Muon matrix: the orthogonalization alone vs the signal computation alone on its output / input
    (the extra work a measurement step does), timed interleaved, median of ``repeats``: a less noisy view
    of the same overhead than whole steps on a shared machine."""
    from muonprof.ortho import orthogonalize
    from muonprof.ortho.lowrank import lowrank_with_basis
    from muonprof.ortho.signals import captured_energy, orthogonality_quality

    rows = []
    for plan in opt.plans.values():
        if plan.optimizer != "muon" or plan.ortho is None:
            continue
        m, n = plan.matrix_shape
        X = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
        ortho = plan.ortho
        O = orthogonalize(X, ortho, generator=torch.Generator().manual_seed(0))
        Q = lowrank_with_basis(X, ortho, torch.Generator().manual_seed(0))[1] if ortho.method == "lowrank" else None
        gen = torch.Generator().manual_seed(1)
        if ortho.method == "lowrank":
            signal = functools.partial(captured_energy, X, Q)
        else:
            signal = functools.partial(orthogonality_quality, O, gen)

        base, extra = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            orthogonalize(X, ortho, generator=torch.Generator().manual_seed(0))
            base.append(time.perf_counter() - start)
            start = time.perf_counter()
            signal()
            extra.append(time.perf_counter() - start)
        rows.append({"layer": plan.name, "ortho_ms": statistics.median(base) * 1e3,
                     "signal_ms": statistics.median(extra) * 1e3})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=50, help="the every (K) to amortize the measurement over")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--part-repeats", type=int, default=15, help="repeats of the per-matrix part timing")
    args = parser.parse_args()

    device = torch.device(args.device)
    workload = build_workload(args.model, batch_size=args.batch_size, seq_len=args.seq_len, device=device)
    workload.loss(workload.train_batch(0)).backward()
    grads = {n: p.grad.detach().clone() for n, p in workload.model.named_parameters() if p.grad is not None}

    def fresh(profile: dict[str, Any]) -> ProfiledMuon:
        model = build_workload(args.model, batch_size=args.batch_size, seq_len=args.seq_len, device=device).model
        for n, p in model.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
        return ProfiledMuon(model, profile=profile)

    contenders: dict[tuple[str, str], ProfiledMuon] = {}
    for name in args.recipes:
        contenders[(name, "static")] = fresh(static_profile(RECIPES[name]))
        contenders[(name, "measured")] = fresh(measuring_profile(RECIPES[name], every=1))
    for opt in contenders.values():  # warm-up (first-step allocations, lazy kernels)
        timed_steps(opt, 2, device)
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in contenders}
    for _ in range(args.rounds):
        for key, opt in contenders.items():
            samples[key].append(timed_steps(opt, args.steps, device))

    rows = []
    for name in args.recipes:
        static = statistics.median(samples[(name, "static")])
        measured = statistics.median(samples[(name, "measured")])
        # Paired per round: the same round's static sample is the reference for the measured one.
        ratios = [m / s for m, s in zip(samples[(name, "measured")], samples[(name, "static")])]
        per_measurement = statistics.median(ratios) - 1
        parts = signal_parts(contenders[(name, "static")], args.part_repeats)
        ortho_ms = sum(p["ortho_ms"] for p in parts)
        signal_ms = sum(p["signal_ms"] for p in parts)
        rows.append(
            {
                "ortho_sum_ms": ortho_ms,
                "signal_sum_ms": signal_ms,
                "signal_over_ortho": signal_ms / ortho_ms,
                "signal_over_step_at_k": signal_ms / (static * 1e3) / args.k,
                "recipe": name,
                "static_ms": static * 1e3,
                "measured_every_step_ms": measured * 1e3,
                "overhead_per_measurement": per_measurement,
                "overhead_at_k": per_measurement / args.k,
                "k": args.k,
            }
        )
    load = os.getloadavg()
    result = {
        "model": args.model,
        "device": str(device),
        "rounds": args.rounds,
        "steps_per_sample": args.steps,
        "load_avg": load,
        "torch": torch.__version__,
        "rows": rows,
    }
    print(f"{args.model} on {device}, {args.rounds} rounds x {args.steps} steps, load avg {load[0]:.2f}")
    for r in rows:
        print(
            f"  {r['recipe']:<20} static {r['static_ms']:8.2f} ms  measured {r['measured_every_step_ms']:8.2f} ms  "
            f"per measurement {100 * r['overhead_per_measurement']:+6.2f}%  at K={r['k']}: "
            f"{100 * r['overhead_at_k']:+.3f}%"
        )
        print(
            f"  {'':<20} parts: orthogonalization {r['ortho_sum_ms']:.2f} ms, signals {r['signal_sum_ms']:.3f} ms "
            f"({100 * r['signal_over_ortho']:.2f}% of it; {100 * r['signal_over_step_at_k']:.4f}% of the step at K)"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
