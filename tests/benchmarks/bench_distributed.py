"""Time ``ProfiledMuon.step()`` under torch.distributed: the layer split vs every rank doing every layer.

Why this exists: under data parallelism every rank holds the same averaged gradient, so every rank
orthogonalizing every layer is the same work done N times. ProfiledMuon under an initialized process group
gives each Muon layer one owner rank and all-gathers the updates; ``distributed=False`` is the old way
(every rank, all layers), the baseline here. Both run side by side in one job on the same weights and
the same real gradients (one forward/backward pass of the model on real data, identical on every rank,
as DDP's averaged gradient would be), interleaved round by round so that drift in the machine's speed
hits both alike. A step's time is the slowest rank's (the ranks wait for each other in the all-gather,
and the training step cannot go on before the last rank is done); the report is the median per contender
and the ratio.

Ranks: ``--nproc`` processes started by ``muonprof.launch`` (torchrun's environment, gloo on CPU, nccl on
CUDA with one GPU per rank; default 2 on CPU, every visible GPU on CUDA). On CPU the cores are shared out:
each rank gets cores // N torch threads in both contenders, so the comparison is fair, but the baseline
is slower than a one-process run with all cores would be.

    python -m tests.benchmarks.bench_distributed                                 # llama-20m, 2 CPU ranks
    python -m tests.benchmarks.bench_distributed gpt2-small --device cuda --rounds 20 --json out.json
    python -m tests.benchmarks.bench_distributed llama-tiny --seq-len 32 --rounds 3   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from muonprof import ProfiledMuon
from muonprof.launch import LaunchError, WorkerContext, launch
from muonprof.workload import build_workload
from tests.benchmarks.bench_profile_step import timed_step as single_rank_step

FP32 = {"format": "muonprof.profile/1", "defaults": {"dtype": "float32"}}


def timed_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    """The one-process timing, started together (barrier) and reduced to the slowest rank's time."""
    dist.barrier()
    seconds = single_rank_step(opt, device)
    elapsed = torch.tensor([seconds], dtype=torch.float64, device=_reduce_device(device))
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def _reduce_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def _rank(ctx: WorkerContext, args: dict[str, Any]) -> dict[str, Any] | None:
    """One rank: two models with the same weights and gradients, one optimizer each, timed round by round."""
    device = ctx.device
    profile = FP32 if args["fp32"] else args["profile"]
    load = dict(batch_size=args["batch_size"], seq_len=args["seq_len"], device=device, seed=0)
    workload = build_workload(args["model"], **load)
    workload.loss(workload.train_batch(0)).backward()  # the same batch on every rank: DDP's averaged gradient
    grads = {n: p.grad.detach().clone() for n, p in workload.model.named_parameters() if p.grad is not None}
    del workload

    def fresh() -> torch.nn.Module:
        model = build_workload(args["model"], **load).model
        for n, p in model.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
        return model

    split_model, all_model = fresh(), fresh()
    split = ProfiledMuon(split_model, profile)  # under the initialized process group: split by layer
    try:
        every = ProfiledMuon(all_model, profile, distributed=False)
    except TypeError:
        raise RuntimeError("this ProfiledMuon has no distributed= argument (no layer split to compare)") from None
    owners = getattr(split, "owners", None)
    if not owners:
        raise RuntimeError("ProfiledMuon did not split the layers over the ranks (no owners assigned)")
    contenders = {"split": split, "all layers": every}

    # Warm-up (momentum buffers, lazy allocations); the first step also checks that the split gives the
    # same weights as doing every layer (it should: same kernels, exact all-gather).
    for opt in contenders.values():
        timed_step(opt, device)
    parity = max(
        float((a - b).abs().max()) for a, b in zip(split_model.parameters(), all_model.parameters())
    )
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args["rounds"]):
        for name, opt in contenders.items():
            times[name].append(timed_step(opt, device))
    if ctx.rank != 0:
        return None
    per_rank = [0] * ctx.world_size
    for owner in owners.values():
        per_rank[owner] += 1
    return {
        "times": times,
        "parity_max_abs_diff": parity,
        "layers_per_rank": per_rank,
        "cost_source": getattr(split, "cost_source", None),
        "threads_per_rank": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="llama-20m", help="built-in model (default llama-20m)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: 2 on CPU, every GPU on CUDA)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--profile", type=Path, default=None, help="a profile for both contenders")
    parser.add_argument("--fp32", action="store_true", help='both contenders with {"dtype": "float32"}')
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    nproc = args.nproc or (torch.cuda.device_count() if device.type == "cuda" else 2)
    options = {
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "profile": str(args.profile) if args.profile else None,
        "fp32": args.fp32,
    }
    start = time.perf_counter()
    try:
        out = launch(_rank, (options,), nproc=nproc, device=device)
    except LaunchError as err:
        print(f"error: {err.message}", file=sys.stderr)
        raise SystemExit(err.code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    wall = time.perf_counter() - start
    times = out["times"]
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    ratio = medians["all layers"] / medians["split"]
    backend = "nccl" if device.type == "cuda" else "gloo"
    recipe = "fp32 NS5" if args.fp32 else (str(args.profile) if args.profile else "default (bf16 NS5)")
    print(f"{args.model}: ProfiledMuon.step() over {nproc} ranks ({backend}, {device.type}, "
          f"{out['threads_per_rank']} threads per rank), recipe {recipe}, {args.rounds} rounds")  # fmt: skip
    print(f"  layers per rank: {out['layers_per_rank']} (costs from {out['cost_source']})")
    for name, samples in times.items():
        print(f"  {name:12s} {medians[name] * 1e3:9.1f} ms  (min {min(samples) * 1e3:.1f}, "
              f"max {max(samples) * 1e3:.1f})")  # fmt: skip
    print(f"  split is {ratio:.2f}x the speed of every rank doing all layers (ideal: {nproc}x)")
    print(f"  parity after the first step: max |split - all layers| = {out['parity_max_abs_diff']:.3g}")
    print(f"  whole run {wall:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "model": args.model,
            "device": device.type,
            "backend": backend,
            "nproc": nproc,
            "recipe": recipe,
            "rounds": args.rounds,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "torch": torch.__version__,
            "medians_s": medians,
            "speedup_split_vs_all": ratio,
            **out,
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
