"""Paired-seed evidence for the seeds' own claims (and for any hand-written recipe) against the default.

Every contender trains from the same initial weights on the same batches per seed (``build_workload`` with
that seed), seeds outermost and contenders interleaved inside a seed, so a drift in the machine's speed hits
all of them alike. The verdict is ``muonprof validate``'s paired rule (``validate.results.summarize``): per
seed the difference of final validation loss to the default, its mean, the one-sided 95% bound, the verdict
at the margin; steps- and time-to-target (target: the default's final loss in that seed).

Beside each Newton-Schulz contender it prints the spectral model's *descent share* on the model's own
momentum spectra (captured after a burn-in): the fraction of the exact-polar first-order descent that q
steps deliver, the scalar that seed 001's "rate constant" is about (its constant tends to 1 as q grows;
1 / share is the factor on the exact-polar rate).

    python -m tests.benchmarks.bench_evidence gpt2-tiny --steps 300 --seeds 3
    python -m tests.benchmarks.bench_evidence llama-20m --seq-len 64 --steps 200 --contenders ns3,lowrank_he2025
    python -m tests.benchmarks.bench_evidence gpt2-tiny --contenders fp32 --seeds 5   # the noise floor
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from muonprof import ProfiledMuon
from muonprof.train import train
from muonprof.validate.contenders import adamw_lr_for
from muonprof.validate.results import ContenderRuns, summarize
from muonprof.workload import build_workload

RANK = "{rank}"  # replaced by --rank (default: a quarter of the smallest Muon layer's short side)
RECIPES: dict[str, dict[str, Any] | None] = {
    "default": None,
    "fp32": {"dtype": "float32"},  # same math, other rounding: the chaotic noise floor of a paired comparison
    **{f"ns{q}": {"ns_steps": q} for q in (1, 2, 3, 4)},
    "polar_express5": {"coefficients": "polar_express"},
    # seed 000 (He et al.'s low-rank Muon) as its reference code runs it: full NS below a 500 short side, so
    # on small models it *is* the default; the rank-r rows below switch that gate off to test the method itself
    "lowrank_he2025": {"preset": "lowrank_he2025"},
    "lowrank_he2025_r": {"preset": "lowrank_he2025", "rank": RANK, "full_below": 0},
    "lowrank_he2025_r+ef": {"preset": "lowrank_he2025", "rank": RANK, "full_below": 0, "error_feedback": True},
    "limuon_rank_r": {"momentum_rank": RANK},  # seed 002's low-rank momentum
    "storm": {"momentum": "storm"},  # seed 002's STORM momentum (two gradients per step)
}
DEFAULT_SET = "fp32,ns1,ns2,ns3,ns4,lowrank_he2025_r,lowrank_he2025_r+ef,limuon_rank_r,storm"


def profile_for(name: str, rank: int) -> dict[str, Any] | None:
    """A recipe name (``RECIPES``, with ``rank`` filled in) or a profile file path."""
    if name in RECIPES:
        settings = RECIPES[name]
        if settings is None:
            return None
        filled = {k: rank if v == RANK else v for k, v in settings.items()}
        return {"format": "muonprof.profile/1", "defaults": filled}
    path = Path(name)
    if path.is_file():
        return json.loads(path.read_text())
    raise SystemExit(f"unknown contender {name!r}: one of {', '.join(RECIPES)} or a profile file")


def descent_shares(spec: str, load: dict[str, Any], names: list[str], warmup: int) -> dict[str, float]:
    """The spectral model's descent share of each NS contender on the model's momentum spectra after a burn-in."""
    from muonprof.capture import capture_spectra
    from muonprof.ortho import OrthoConfig
    from muonprof.ortho.spectral import predict
    from muonprof.tune.run import momentum_weights

    workload = build_workload(spec, seed=0, **load)
    spectra = capture_spectra(workload, steps=warmup, every=warmup)
    weights = momentum_weights(spectra)
    momentum = spectra.captures[-1].momentum
    out = {}
    for name in ["default", *names]:
        settings = RECIPES.get(name)
        if name != "default" and (settings is None or set(settings) - {"ns_steps", "coefficients", "dtype"}):
            continue
        config = OrthoConfig(**(settings or {}))
        total = sum(weights.values()) or 1.0
        out[name] = sum(weights[n] * predict(s, config)["alignment"] for n, s in momentum.items()) / total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--contenders", default=DEFAULT_SET)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--margin", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=50, help="burn-in steps before the spectra of the model")
    parser.add_argument("--rank", type=int, default=None, help="rank of the low-rank rows (default: short/4)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    names = [n for n in args.contenders.split(",") if n and n != "default"]
    load = {"batch_size": args.batch_size, "seq_len": args.seq_len}
    every = args.eval_every or max(1, args.steps // 20)
    first = build_workload(args.model, seed=0, **load)
    adamw_lr = adamw_lr_for(sum(p.numel() for p in first.model.parameters()))
    muon = [plan for plan in ProfiledMuon(first.model).plans.values() if plan.optimizer == "muon"]
    rank = args.rank or max(1, min(min(plan.matrix_shape) for plan in muon) // 4)
    del first
    profiles = {"default": None, **{n: profile_for(n, rank) for n in names}}
    runs = {name: ContenderRuns(name, {"profile": profiles[name]}) for name in profiles}
    load_before = os.getloadavg()
    started = time.time()
    for seed in range(args.seeds):
        for name, profile in profiles.items():
            workload = build_workload(args.model, seed=seed, **load)
            opt = ProfiledMuon(workload.model, profile, adamw_lr=adamw_lr, seed=seed)
            runs[name].runs[seed] = train(workload, opt, steps=args.steps, eval_every=every)
            r = runs[name].runs[seed]
            print(
                f"seed {seed} {name:>18}: val {r.final_val_loss:.4f}  opt step {r.median_optimizer_step_s * 1e3:.2f} ms"
                f"  step {r.median_step_s * 1e3:.1f} ms",
                flush=True,
            )
    summary = summarize(runs, list(range(args.seeds)), reference="default", margin=args.margin)
    shares = descent_shares(args.model, load, names, args.warmup)
    pairs = summary["verdicts"]["final_val_loss"]["pairs"]
    target = summary["to_target"]["contenders"]
    cpu = _cpu_model()
    print(
        f"\n{args.model}, {args.steps} steps, batch {args.batch_size}, seq {args.seq_len}, {args.seeds} paired seeds, "
        f"margin {args.margin}; {cpu}, {torch.get_num_threads()} threads; load {load_before} -> {os.getloadavg()}"
    )
    print(
        "| contender | val loss (mean) | paired Δ | 95% bound | verdict | steps to target | time-to-target speedup |"
        " opt step vs default | descent share (model) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = summary["rows"]
    table = []
    for name in profiles:
        row = rows[name]
        pair = pairs.get(name) or {}
        tt = target.get(name) or {}
        speed = (tt.get("speedup") or {}).get("geomean")
        ratio = row.get("optimizer_step_ratio")
        val = (row.get("final_val_loss") or {}).get("mean")
        entry = {
            "contender": name,
            "val_loss": val,
            "paired_delta": pair.get("mean_diff"),
            "bound": pair.get("upper_bound"),
            "verdict": pair.get("verdict", "reference" if name == "default" else None),
            "reached": f"{tt.get('reached')}/{tt.get('n')}",
            "steps_to_target": tt.get("steps_median"),
            "time_to_target_speedup": speed,
            "optimizer_step_ratio": ratio,
            "descent_share": shares.get(name),
        }
        table.append(entry)
        print(
            f"| {name} | {_f(val)} | {_f(entry['paired_delta'], '+.4f')} | {_f(entry['bound'], '+.4f')} | "
            f"{entry['verdict']} | {entry['reached']} at {_f(entry['steps_to_target'], '.0f')} | {_f(speed, '.2f')}x |"
            f" {_f(ratio, '.2f')}x | {_f(shares.get(name), '.3f')} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "model": args.model,
                    "rank": rank,
                    "steps": args.steps,
                    "seeds": args.seeds,
                    "batch_size": args.batch_size,
                    "seq_len": args.seq_len,
                    "margin": args.margin,
                    "cpu": cpu,
                    "load_before": load_before,
                    "load_after": os.getloadavg(),
                    "wall_s": time.time() - started,
                    "table": table,
                    "summary": summary,
                },
                indent=2,
                default=str,
            )
        )


def _f(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
