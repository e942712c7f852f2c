"""How long do per-layer spectrum statistics keep moving? The measurement behind the capture burn-in default.

Why this exists: ``muonprof tune`` once scored recipes on the first 10-20 steps' spectra, which are far
lower-rank than later ones, and so chose aggressive low-rank recipes. ``capture_spectra`` now trains a
burn-in first; its default (``capture.run.DEFAULT_WARMUP_STEPS``) should be the step after which the
statistics stop moving. This script trains each model from step 1 (no burn-in), captures every ``--every``
steps, and prints, per capture step, the median over the Muon-routed layers of each momentum statistic
as a share of min(m, n):

- ``r90N``: nuclear-90 rank (smallest r holding 90% of the nuclear norm), what low-rank alignment tracks;
- ``eff``: effective rank (entropy of s / sum(s));
- ``stable``: stable rank (||M||_F^2 / ||M||_2^2).

Settle step: the first capture step after which the statistic stays within ``--tol`` (relative) of its
end value, the end value being the mean of the last three captures (one capture is a noisy reference).
``median-layer`` is that for the median-over-layers curve; ``layers p50/p75`` are the 50th/75th
percentiles of each layer's own settle step (``>N`` means it never settled within the run).

Run from the repository root (not collected by pytest)::

    python -m tests.benchmarks.bench_spectra_drift                      # the three built-ins, ~10 min on 2 cores
    python -m tests.benchmarks.bench_spectra_drift --models gpt2-tiny --steps 60 --every 10   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

from muonprof.capture import Spectra, capture_spectra, stats_row
from muonprof.workload import build_workload

STATS = {"r90N": "nuclear_rank_90", "eff": "effective_rank", "stable": "stable_rank"}
REFERENCE_CAPTURES = 3


def shares(spectra: Spectra) -> dict[str, dict[str, list[float]]]:
    """statistic -> layer -> its share of min(m, n) at every capture (Muon-routed layers only)."""
    out: dict[str, dict[str, list[float]]] = {short: {} for short in STATS}
    for layer in spectra.layers:
        if layer.optimizer != "muon":
            continue
        k = min(layer.matrix_shape)
        rows = [stats_row(c.momentum[layer.name]) for c in spectra.captures]
        for short, key in STATS.items():
            out[short][layer.name] = [float(r[key]) / k for r in rows]
    return out


def settle_index(curve: list[float], tol: float) -> int | None:
    """First index after which ``curve`` stays within ``tol`` of its end value (None: not even at the end)."""
    end = statistics.fmean(curve[-REFERENCE_CAPTURES:])
    band = tol * abs(end)
    outside = [i for i, v in enumerate(curve) if abs(v - end) > band]
    if not outside:
        return 0
    last = outside[-1]
    return last + 1 if last + 1 < len(curve) else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(model: str, args: argparse.Namespace) -> dict[str, Any]:
    seq_len = None if model.startswith("vit") else args.seq_len
    workload = build_workload(model, batch_size=args.batch_size, seq_len=seq_len, seed=args.seed)
    start = time.perf_counter()

    def progress(step: int, _loss: float) -> None:
        if step % 25 == 0:
            elapsed = time.perf_counter() - start
            print(f"  {model}: step {step}/{args.steps}, {elapsed:.0f} s", file=sys.stderr, flush=True)

    spectra = capture_spectra(
        workload, steps=args.steps, every=args.every, warmup_steps=0, seed=args.seed, on_step=progress
    )
    wall = time.perf_counter() - start
    steps = spectra.steps
    per = shares(spectra)
    curves = {short: [statistics.median(v[i] for v in layers.values()) for i in range(len(steps))]
              for short, layers in per.items()}  # fmt: skip
    never = f">{steps[-1]}"
    settle: dict[str, Any] = {}
    for short, layers in per.items():
        idx = settle_index(curves[short], args.tol)
        own = [settle_index(curve, args.tol) for curve in layers.values()]
        own_steps = [steps[i] if i is not None else steps[-1] + args.every for i in own]
        settle[short] = {
            "median_layer": steps[idx] if idx is not None else never,
            "layers_p50": percentile(own_steps, 0.5),
            "layers_p75": percentile(own_steps, 0.75),
            "never": sum(i is None for i in own),
        }
    losses = {s: spectra.losses[s - 1] for s in steps}
    return {"model": model, "wall_s": round(wall, 1), "steps": steps, "losses": losses, "curves": curves,
            "settle": settle, "layers": len(next(iter(per.values())))}  # fmt: skip


def print_result(r: dict[str, Any]) -> None:
    print(f"\n{r['model']}: {r['layers']} Muon layers, {r['wall_s']} s")
    print(f"{'step':>5} {'loss':>7} " + " ".join(f"{k:>7}" for k in STATS))
    for i, step in enumerate(r["steps"]):
        print(f"{step:>5} {r['losses'][step]:>7.3f} " + " ".join(f"{r['curves'][k][i]:>7.3f}" for k in STATS))
    for k, s in r["settle"].items():
        print(f"settle {k:>6}: median-layer curve at step {s['median_layer']}; per layer p50 {s['layers_p50']}, "
              f"p75 {s['layers_p75']} ({s['never']} never within the run)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-tiny", "llama-20m", "vit-tiny"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--tol", type=float, default=0.1, help="relative band around the end value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # An LM head's AdamW second moments of never-seen tokens fall below 1e-38 within a few dozen steps, and
    # subnormal arithmetic is 10-100x slower on x86: without this, llama-20m's steps slow down as it trains.
    # Values that small change no statistic printed here.
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
          f"batch {args.batch_size}, seq-len {args.seq_len}, tol {args.tol}")  # fmt: skip
    results = []
    for model in args.models:
        results.append(measure(model, args))
        print_result(results[-1])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
