"""``muonprof tune`` + ``muonprof validate`` end to end on built-in models: does the shipped profile hold?

Per model: run the whole tune pipeline (its race and its confirmation at twice the race horizon included, as
the CLI runs it) and time each stage; then validate the shipped profile against the default with 3 paired seeds
for four times the race horizon (beyond anything tune looked at), and judge it at the race horizon, twice and
four times it (paired Δ of val loss with its one-sided 95% bound, ``muonprof.stats``); report
steps-to-target and time-to-target (target: the default's final val loss at 4x the horizon, per seed), the
optimizer-step and training-step speedups measured interleaved in one process (``tune.timing``), and beside
the time-to-target speedup its bound: the speedup if orthogonalization cost nothing (Amdahl, from the
default's measured share of the training step).

    python -m tests.benchmarks.bench_race                       # gpt2-tiny, llama-20m, vit-tiny
    python -m tests.benchmarks.bench_race gpt2-tiny --out-dir profiles --json race.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from muonprof.profile import load_profile
from muonprof.stats import DEFAULT_MARGIN, first_reaching, geometric_mean, paired_comparison
from muonprof.tune.pipeline import TuneRequest, run_tune
from muonprof.tune.race import RaceOptions
from muonprof.tune.timing import interleaved_step_times
from muonprof.validate import validate
from muonprof.workload import build_workload

# Sized so one model's tune + validate fits ~15 minutes on 2 CPU cores (llama-20m and vit-tiny train at
# ~0.3-0.4 s a step there: a shorter race, and fewer LR trials).
MODELS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": {},
    "llama-20m": {
        "seq_len": 32,
        "batch_size": 4,
        "race_steps": 100,
        "race_candidates": 2,
        "lr_trials": 4,
        "lr_steps": 40,
    },
    "vit-tiny": {"race_steps": 100, "race_candidates": 2, "lr_trials": 4, "lr_steps": 40},
}


class StageClock:
    """A pipeline Reporter that only timestamps the stages."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def stage(self, text: str) -> None:
        self.marks.append((text.split(":", 1)[0], time.perf_counter()))
        print(f"  {text}", flush=True)

    @contextmanager
    def track(self, label: str, total: int) -> Any:
        yield lambda *args, **kwargs: None

    def durations(self, end: float) -> dict[str, float]:
        out = {}
        for (name, t0), (_, t1) in zip(self.marks, [*self.marks[1:], ("end", end)]):
            out[name] = t1 - t0
        return out


VALIDATE_FACTOR = 4  # validate for this many race horizons: past the confirmation (2x), what tune never saw


def run_model(
    model: str, opts: dict[str, Any], out_dir: Path, seeds: int, margin: float, untuned_too: bool = False
) -> dict[str, Any]:
    out = out_dir / f"{model}.cpu.json"
    steps = opts.get("race_steps", RaceOptions.steps)
    race = RaceOptions(
        margin=margin,
        steps=steps,
        candidates=opts.get("race_candidates", RaceOptions.candidates),
        confirm_steps=2 * steps,  # the CLI's defaults
        confirm_seeds=2 * RaceOptions.seeds,
    )
    request = TuneRequest(
        source=model,
        out=out,
        seq_len=opts.get("seq_len"),
        batch_size=opts.get("batch_size", 8),
        lr_trials=opts.get("lr_trials", 12),
        lr_steps=opts.get("lr_steps", 60),
        race=race,
        command=f"muonprof tune {model}"
        + (f" --seq-len {opts['seq_len']}" if "seq_len" in opts else "")
        + (f" --batch-size {opts['batch_size']}" if "batch_size" in opts else "")
        + (f" --race-steps {opts['race_steps']}" if "race_steps" in opts else "")
        + (f" --race-candidates {opts['race_candidates']}" if "race_candidates" in opts else "")
        + (f" --lr-trials {opts['lr_trials']} --lr-steps {opts['lr_steps']}" if "lr_trials" in opts else "")
        + f" --max-loss-increase {margin:g} --out {out}",
    )
    clock = StageClock()
    t0 = time.perf_counter()
    outcome = run_tune(request, clock)
    tune_s = time.perf_counter() - t0
    stages = clock.durations(time.perf_counter())
    horizon = race.steps
    every = math.gcd(race.eval_interval, horizon)  # every judged horizon (h, 2h, 4h) is an evaluation step
    # The reference is the default recipe with the profile's own tuned learning rates (validate's default-lr,
    # the race's reference); against the untuned default a tuned profile would win by its LR alone.
    result = validate(
        model,
        profile=out,
        contenders="default-lr,default" if untuned_too else "default-lr",
        steps=VALIDATE_FACTOR * horizon,
        seeds=seeds,
        eval_every=every,
        seq_len=opts.get("seq_len"),
        batch_size=opts.get("batch_size", 8),
    )
    prof, ref = result.contenders["profile"], result.contenders["default-lr"]
    untuned = result.contenders.get("default")
    seed_list = result.seeds
    judged = {}
    for h in (horizon, 2 * horizon, VALIDATE_FACTOR * horizon):
        cand = [_val_at(prof.runs[s], h) for s in seed_list]
        base = [_val_at(ref.runs[s], h) for s in seed_list]
        judged[h] = paired_comparison(cand, base, margin)
    vs_untuned = None
    if untuned is not None:
        vs_untuned = paired_comparison(
            [prof.runs[s].final_val_loss for s in seed_list],
            [untuned.runs[s].final_val_loss for s in seed_list],
            margin,
        )
    targets = {s: ref.runs[s].final_val_loss for s in seed_list}
    steps_to, speedups_measured = [], []
    for s in seed_list:
        mine = first_reaching(prof.runs[s].evals, targets[s])
        theirs = first_reaching(ref.runs[s].evals, targets[s])
        steps_to.append((mine.step if mine else None, theirs.step if theirs else None))
        if mine and theirs and mine.wall_s > 0:
            speedups_measured.append(theirs.wall_s / mine.wall_s)
    # Speed, interleaved in one process: the optimizer step and the forward/backward of the same batch.
    workload = build_workload(model, seed=0, seq_len=opts.get("seq_len"), batch_size=opts.get("batch_size", 8))
    shipped = load_profile(out)
    reference = shipped.provenance.model_dump()["race"]["reference_profile"] if outcome.race else None
    timing = interleaved_step_times(workload, {"default": reference, "profile": shipped}, rounds=15)
    opt_default, opt_profile = timing["median_ms"]["default"], timing["median_ms"]["profile"]
    fb = timing["fwd_bwd_ms"]
    step_speedup = (fb + opt_default) / (fb + opt_profile)
    # time-to-target at interleaved step costs: (steps the default needs x its step) / (steps the profile needs x its)
    tt = [(theirs * (fb + opt_default)) / (mine * (fb + opt_profile)) for mine, theirs in steps_to if mine and theirs]
    row = {
        "model": model,
        "shipped": outcome.shipped,
        "fallback": outcome.race.fell_back if outcome.race else None,
        "race_reason": outcome.race.reason if outcome.race else None,
        "tune_s": tune_s,
        "stages_s": stages,
        "race_share": stages.get("5/5 race", 0.0) / tune_s if tune_s else None,
        "horizon": horizon,
        "equal_steps": {str(h): c.to_json() for h, c in judged.items()},
        "vs_untuned_default": vs_untuned.to_json() if vs_untuned is not None else None,
        "steps_to_target": steps_to,
        "time_to_target_speedup_interleaved": geometric_mean(tt) if len(tt) == len(seed_list) else None,
        "time_to_target_speedup_runs": geometric_mean(speedups_measured) if speedups_measured else None,
        "optimizer_step_speedup": opt_default / opt_profile,
        "training_step_speedup": step_speedup,
        "amdahl_bound": timing["amdahl_bound"],
        "timing": timing,
    }
    _print_row(row)
    return row


def _val_at(run: Any, step: int) -> float:
    for point in run.evals:
        if point.step == step and point.val_loss is not None:
            return point.val_loss
    raise SystemExit(f"no evaluation at step {step}")


def _print_row(row: dict[str, Any]) -> None:
    h = row["horizon"]
    judged = "; ".join(
        f"Δ@{k} {c['mean_diff']:+.4f} (bound {c['upper_bound']:+.4f}, {c['verdict']})"
        for k, c in row["equal_steps"].items()
    )
    tt = row["time_to_target_speedup_interleaved"]
    print(
        f"{row['model']}: shipped {row['shipped']}; tune {row['tune_s']:.0f} s (race {row['race_share']:.0%}); "
        f"race horizon {h}: {judged}; "
        f"time-to-target {'-' if tt is None else f'{tt:.2f}x'} (Amdahl bound {row['amdahl_bound']:.2f}x, half its "
        f"gain {1 + (row['amdahl_bound'] - 1) / 2:.2f}x); "
        f"opt step {row['optimizer_step_speedup']:.2f}x; train step {row['training_step_speedup']:.2f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--out-dir", type=Path, default=Path("race-bench"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--vs-untuned", action="store_true", help="also validate against the untuned default")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; load {os.getloadavg()}")
    rows = []
    for m in args.models:
        rows.append(run_model(m, MODELS.get(m, {}), args.out_dir, args.seeds, args.margin, args.vs_untuned))
        if args.json:  # after every model: a long run interrupted keeps what it finished
            args.json.write_text(json.dumps({"cpu": _cpu(), "rows": rows}, indent=2, default=str))
    print(f"load after: {os.getloadavg()}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
