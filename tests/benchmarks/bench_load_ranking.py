"""Does bench rank a fixed grid the same on a busy machine as on a quiet one? Interleaved vs back-to-back timing.

Why this exists (issue 16): on a loaded 2-core machine the same ``muonprof tune`` priced the default at 127 ms
and 59.6 ms per step, and on one shape 3 Jordan steps measured 25 ms against 14 ms for 5 (back-to-back
medians): stage 1 chose from those numbers. Bench now times all candidates of a shape in interleaved rounds
(order shuffled by a seeded RNG), re-measures a high-spread candidate and reports a low quantile of the
rounds (``bench.cost``). This script measures whether that holds the ranking:

1. quiet: time the grid on every shape both ways, the new harness (``cost.interleaved_samples``) and the old
   one (``cost.time_op``: each candidate's repeats back to back, the median);
2. loaded: the same, while ``--hogs`` other processes keep the CPUs busy (``--load spin``: Python busy loops;
   ``--load matmul``: single-threaded torch matmuls, which also compete for cache and memory bandwidth);
3. per shape, Kendall's tau-b between the quiet and the loaded ranking of each method (1 = same order), and
   the mean over shapes; for the new harness once per statistic of the same rounds (min, p10, q1, median),
   which is the measurement behind ``cost.DEFAULT_ESTIMATOR``.

The grid (fp32, the dtype a CPU without native bf16 runs fastest): Jordan x3 and x5, Polar Express x8, cubic
x5, the Gram Newton-Schulz twins of Jordan x5 and Polar Express x4 (on the shapes where bench offers them),
low-rank r16 and r64 (power iteration 1). Every candidate has its own cost key (no shared timings, so no
forced ties). Shapes: GPT-2-small's at ``--scale`` (1/2 by default: 384x384, 384x1152, 384x1536).

Run from the repository root (not collected by pytest)::

    python -m tests.benchmarks.bench_load_ranking                 # ~2-3 min on 2 cores
    python -m tests.benchmarks.bench_load_ranking --scale 0.25 --json bench-out/load-ranking.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

from muonprof.bench.candidates import candidate_label, fits
from muonprof.bench.cost import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    MAX_ROUNDS,
    MIN_ROUNDS,
    TARGET_S,
    _operation,
    grade,
    interleaved_samples,
    relative_iqr,
    summarize,
    time_op,
)
from muonprof.device.load import LoadProbe
from muonprof.device.probe import Timer
from muonprof.ortho import OrthoConfig

GPT2_SHAPES = ((768, 768), (768, 2304), (768, 3072))


def grid() -> list[OrthoConfig]:
    """The fixed grid, one cost key per candidate."""
    f32 = "float32"
    return [
        OrthoConfig(ns_steps=3, dtype=f32),
        OrthoConfig(ns_steps=5, dtype=f32),
        OrthoConfig(ns_steps=8, coefficients="polar_express", dtype=f32),
        OrthoConfig(ns_steps=5, coefficients="cubic", dtype=f32),
        OrthoConfig(ns_steps=5, dtype=f32, gram=True),
        OrthoConfig(ns_steps=4, coefficients="polar_express", dtype=f32, gram=True),
        OrthoConfig(method="lowrank", rank=16, power_iters=1, dtype=f32),
        OrthoConfig(method="lowrank", rank=64, power_iters=1, dtype=f32),
    ]


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two paired lists (ties in either count as neither concordant nor discordant)."""
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom > 0 else 1.0


def hog(kind: str) -> None:
    """Keep one CPU busy until terminated."""
    if kind == "matmul":
        torch.set_num_threads(1)
        a = torch.randn(512, 512)
        while True:
            a = torch.tanh(a @ a)
    while True:
        pass


def measure(shapes: list[tuple[int, int]], seed: int) -> dict[str, Any]:
    """Both harnesses on every shape: new (interleaved rounds) samples and old (back-to-back) medians."""
    timer = Timer()
    gen = torch.Generator()
    new: dict[str, dict[str, list[float]]] = {}
    remeasured: dict[str, list[str]] = {}
    old: dict[str, dict[str, float]] = {}
    probe = LoadProbe()
    start = time.perf_counter()
    for shape in shapes:
        key = f"{shape[0]}x{shape[1]}"
        G = torch.randn(shape)
        ops = {candidate_label(c): _operation(G, c, gen) for c in grid() if fits(c, shape)}
        got = interleaved_samples(ops, timer, seed=seed)
        new[key], remeasured[key] = got.times, sorted(got.remeasured)
        old[key] = {label: time_op(op, timer).median_s for label, op in ops.items()}
    return {"new": new, "remeasured": remeasured, "old": old, "load": probe.record(),
            "wall_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def figures(run: dict[str, Any], statistic: str) -> dict[str, dict[str, float]]:
    """shape -> label -> seconds: the old medians, or a quantile of the new rounds."""
    if statistic == "old":
        return run["old"]
    return {s: {lbl: summarize(t, 0.0, estimator=statistic).figure_s for lbl, t in rows.items()}
            for s, rows in run["new"].items()}  # fmt: skip


def taus(quiet: dict[str, dict[str, float]], loaded: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per-shape Kendall tau between two figure tables, and their mean."""
    out = {}
    for shape, rows in quiet.items():
        labels = sorted(rows)
        out[shape] = kendall_tau([rows[lbl] for lbl in labels], [loaded[shape][lbl] for lbl in labels])
    out["mean"] = statistics.fmean(out.values())
    return out


def certainty_counts(run: dict[str, Any]) -> dict[str, int]:
    counts = {"high": 0, "medium": 0, "low": 0}
    for rows in run["new"].values():
        for t in rows.values():
            counts[grade(len(t), relative_iqr(t))] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.5, help="shapes: GPT-2 small's x this")
    parser.add_argument("--load", choices=("spin", "matmul"), default="spin")
    parser.add_argument("--hogs", type=int, default=None, help="load processes (default: usable CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quiet-twice", action="store_true", help="a second unloaded run: tau between the two")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [(max(16, round(m * args.scale)), max(16, round(n * args.scale))) for m, n in GPT2_SHAPES]
    hogs = args.hogs if args.hogs is not None else len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} CPUs, "
          f"load {os.getloadavg()}; shapes {shapes}; new harness: {MIN_ROUNDS}-{MAX_ROUNDS} rounds, "
          f"target {TARGET_S} s, default estimator {DEFAULT_ESTIMATOR}")  # fmt: skip

    quiet = measure(shapes, args.seed)
    print(f"quiet: {quiet['wall_s']} s, load {quiet['load']['loadavg_before']} -> {quiet['load']['loadavg_after']}, "
          f"busy {quiet['load']['busy_fraction']}")  # fmt: skip
    again = None
    if args.quiet_twice:  # the noise floor: how well two unloaded runs agree
        again = measure(shapes, args.seed + 1)
        print(f"quiet again: {again['wall_s']} s, load {again['load']['loadavg_before']} -> "
              f"{again['load']['loadavg_after']}")  # fmt: skip
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=hog, args=(args.load,), daemon=True) for _ in range(hogs)]
    for p in procs:
        p.start()
    try:
        time.sleep(2.0)  # let the hogs start (spawn imports torch)
        loaded = measure(shapes, args.seed)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)
    print(f"loaded ({hogs} x {args.load}): {loaded['wall_s']} s, load {loaded['load']['loadavg_before']} -> "
          f"{loaded['load']['loadavg_after']}, busy {loaded['load']['busy_fraction']}")  # fmt: skip

    statistics_ = ["old", *ESTIMATORS]
    result: dict[str, Any] = {"shapes": [f"{m}x{n}" for m, n in shapes], "load_kind": args.load, "hogs": hogs,
                              "quiet": quiet, "loaded": loaded, "tau": {}, "slowdown": {}}  # fmt: skip
    names = {"old": "back-to-back median (old)", **{k: f"interleaved {k}" for k in ESTIMATORS}}
    print("\nKendall tau, quiet vs loaded ranking per shape")
    print(f"{'statistic':<28}" + "".join(f"{s:>12}" for s in result["shapes"]) + f"{'mean tau':>10}{'slowdown':>10}")
    for stat in statistics_:
        q, lo = figures(quiet, stat), figures(loaded, stat)
        tau = taus(q, lo)
        ratios = [lo[s][lbl] / q[s][lbl] for s in q for lbl in q[s] if q[s][lbl] > 0]
        result["tau"][stat], result["slowdown"][stat] = tau, statistics.median(ratios)
        mark = " *" if stat == DEFAULT_ESTIMATOR else ""
        print(f"{names[stat] + mark:<28}" + "".join(f"{tau[s]:>12.3f}" for s in result["shapes"])
              + f"{tau['mean']:>10.3f}{statistics.median(ratios):>9.2f}x")  # fmt: skip
    print("(* bench's estimator; slowdown: median loaded/quiet figure)")
    if again is not None:
        result["quiet_again"], result["tau_quiet_again"] = again, {}
        print("Kendall tau, quiet vs quiet again (the noise floor)")
        for stat in statistics_:
            tau = taus(figures(quiet, stat), figures(again, stat))
            result["tau_quiet_again"][stat] = tau
            cells = "".join(f"{tau[s]:>12.3f}" for s in result["shapes"])
            print(f"{names[stat]:<28}{cells}{tau['mean']:>10.3f}")
    for name, run in (("quiet", quiet), ("loaded", loaded)):
        counts = certainty_counts(run)
        again = sum(len(v) for v in run["remeasured"].values())
        print(f"{name}: certainty {counts}, re-measured {again}")
        result[f"certainty_{name}"] = counts
    print("\nper shape, quiet -> loaded (ms): old median | interleaved " + DEFAULT_ESTIMATOR)
    old_q, old_l = figures(quiet, "old"), figures(loaded, "old")
    new_q, new_l = figures(quiet, DEFAULT_ESTIMATOR), figures(loaded, DEFAULT_ESTIMATOR)
    for shape in result["shapes"]:
        print(f"  {shape}")
        for lbl in sorted(new_q[shape], key=new_q[shape].get):
            print(f"    {lbl:<38} {old_q[shape][lbl] * 1e3:8.2f} -> {old_l[shape][lbl] * 1e3:8.2f} | "
                  f"{new_q[shape][lbl] * 1e3:8.2f} -> {new_l[shape][lbl] * 1e3:8.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
