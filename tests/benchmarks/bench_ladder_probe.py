"""Why an adaptive profile moves (or not), and what its ladders cost, on the real model (issue 17).

Given a profile written by ``muonprof tune MODEL --ladders``:

1. **Signals vs floors.** Train MODEL for ``--steps`` steps with the profile and print, per laddered layer, the
   rung it started on and ended on, its floor and margin, and every measured signal: a layer whose signal never
   drops below the floor does not climb, and one whose signal never reaches floor + margin cannot descend.
2. **Paired step time.** The same gradients stepped by the adaptive optimizer and by its static twin (the same
   profile without ladders) in one process, alternating which goes first (A B / B A), ``--rounds`` times: the
   median of the per-round ratios and its quartiles, with the machine's load.

    python -m tests.benchmarks.bench_ladder_probe gpt2-tiny gpt2-tiny.adaptive.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from muonprof import ProfiledMuon
from muonprof.profile import load_profile, without_ladders
from muonprof.workload import build_workload

from .bench_step import paired_ratio


def signals_against_floors(model: str, profile_path: str, steps: int, batch_size: int, lr: float) -> None:
    workload = build_workload(model, batch_size=batch_size, seed=0)
    profile = load_profile(profile_path)
    opt = ProfiledMuon(workload.model, profile=profile, lr=lr)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        workload.loss(workload.train_batch(step)).backward()
        opt.step()
    for name, status in opt.ladder_status().items():
        ladder = profile.layers[name].ladder or profile.defaults.ladder
        assert ladder is not None
        signals = " ".join(f"{s:.3f}" for _, s, _ in status["history"])
        print(
            f"{name}: rung {ladder.start} -> {status['rung']} of {len(ladder.rungs)} ({status['recipe']}), "
            f"floor {ladder.floor:.3f}, descend at >= {ladder.floor + ladder.margin:.3f}; signals {signals}"
        )


def paired_step_ratio(model: str, profile_path: str, rounds: int, batch_size: int, lr: float) -> None:
    workload = build_workload(model, batch_size=batch_size, seed=0)
    profile = load_profile(profile_path)
    twin_model = copy.deepcopy(workload.model)
    adaptive = ProfiledMuon(workload.model, profile=profile, lr=lr)
    static = ProfiledMuon(twin_model, profile=without_ladders(profile), lr=lr)
    workload.loss(workload.train_batch(0)).backward()
    for p, q in zip(workload.model.parameters(), twin_model.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    load_before = os.getloadavg()
    times_a: list[float] = []
    times_s: list[float] = []
    for r in range(rounds):
        seconds = {}
        for name, opt in (("a", adaptive), ("s", static)) if r % 2 == 0 else (("s", static), ("a", adaptive)):
            t0 = time.perf_counter()
            opt.step()
            seconds[name] = time.perf_counter() - t0
        times_a.append(seconds["a"])
        times_s.append(seconds["s"])
    ratio, quartiles = paired_ratio(times_a, times_s)
    spread = f"IQR {quartiles[0]:.3f}-{quartiles[1]:.3f}, " if quartiles else ""
    print(
        f"{model}: adaptive / static optimizer step {ratio:.3f}x ({spread}"
        f"{rounds} interleaved rounds); medians {statistics.median(times_a) * 1e3:.2f} vs "
        f"{statistics.median(times_s) * 1e3:.2f} ms; load {load_before} -> {os.getloadavg()}, "
        f"{torch.get_num_threads()} torch threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("profile", help="a profile with ladders (muonprof tune MODEL --ladders)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()
    signals_against_floors(args.model, args.profile, args.steps, args.batch_size, args.lr)
    paired_step_ratio(args.model, args.profile, args.rounds, args.batch_size, args.lr)


if __name__ == "__main__":
    main()
