"""What in-loop spectrum capture costs a training run: ``SpectrumRecorder`` at a capture every K steps.

Issue 15's target: <= 10% of training time at a capture every 10 steps on a built-in LM. Two copies of the same
model train side by side in one process on the same batches, one step each in turn (A B A B ..., the order
flipped every step so neither always runs second), one plain and one calling ``recorder.record`` after
``backward()``; the overhead is the ratio of their total times over the run (captures are spikes every K steps,
so a median would hide them), with the load average before and after, and the time spent inside ``record()``
over the plain run's (the direct cost: on a shared machine the end-to-end ratio is noisier than it).

Run from the repository root (not part of the test suite)::

    python -m tests.benchmarks.bench_recorder                       # gpt2-tiny and llama-20m, ~2-3 min
    python -m tests.benchmarks.bench_recorder --model gpt2-tiny --steps 60 --every 10 --window 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    import muonprof  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from muonprof import ProfiledMuon, SpectrumRecorder
from muonprof.workload import build_workload


def measure(model_name: str, *, steps: int, every: int, window: int, batch_size: int, seq_len: int) -> dict[str, Any]:
    plain = build_workload(model_name, batch_size=batch_size, seq_len=seq_len, seed=0)
    recorded = build_workload(model_name, batch_size=batch_size, seq_len=seq_len, seed=0)
    opts = {"plain": ProfiledMuon(plain.model), "recorded": ProfiledMuon(recorded.model)}
    recorder = SpectrumRecorder(
        recorded.model, opts["recorded"], every=every, window=window, total_steps=steps if window else None
    )
    runs = {"plain": plain, "recorded": recorded}
    totals = {"plain": 0.0, "recorded": 0.0}
    load_before = os.getloadavg()
    for step in range(1, steps + 1):
        batch = plain.train_batch(step - 1)
        order = ["plain", "recorded"] if step % 2 else ["recorded", "plain"]
        for key in order:
            workload, opt = runs[key], opts[key]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = workload.loss(batch)
            loss.backward()
            if key == "recorded":
                recorder.record(step, loss)
            opt.step()
            totals[key] += time.perf_counter() - start
    return {
        "model": model_name,
        "steps": steps,
        "every": every,
        "window": window,
        "captures": len(recorder.records),
        "plain_s": totals["plain"],
        "recorded_s": totals["recorded"],
        "overhead": totals["recorded"] / totals["plain"] - 1,
        "record_s": recorder.record_s,
        # The recorder's own time over the plain run's: the direct cost, which the noisy end-to-end ratio
        # brackets on a shared machine.
        "record_share": recorder.record_s / totals["plain"],
        "capture_s": recorder.capture_s,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=["gpt2-tiny", "llama-20m"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--window", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    for name in args.model:
        r = measure(
            name,
            steps=args.steps,
            every=args.every,
            window=args.window,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
        )
        results.append(r)
        print(
            f"{name}: {r['steps']} steps, a capture every {r['every']} "
            f"({r['captures']} captures, window {r['window']}): "
            f"plain {r['plain_s']:.2f} s, recorded {r['recorded_s']:.2f} s -> overhead {100 * r['overhead']:+.1f}% "
            f"(inside record(): {r['record_s']:.2f} s = {100 * r['record_share']:.1f}% of the plain run, "
            f"of it capturing {r['capture_s']:.2f} s); "
            f"load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}, {r['threads']} threads"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
