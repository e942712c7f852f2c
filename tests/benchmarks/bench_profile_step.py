"""Time ``optimizer.step()`` on a built-in model: a tuned profile vs the default vs torch.optim.Muon.

Why this exists: ``muonprof tune`` predicts a profile's orthogonalization time from per-layer bench
numbers; this measures what a training step's optimizer call really costs with the profile loaded, on
the real model and real gradients (one forward/backward pass on the real data: real momentum spectra
matter, e.g. tiny singular values make bf16/fp32 arithmetic hit subnormals on x86). Contenders run in
one process, interleaved round by round so that drift in the machine's speed hits all of them alike,
and the report is the median per contender and the ratio to the default.

    python -m tests.benchmarks.bench_profile_step gpt2-tiny profiles/gpt2-tiny.cpu.json
    python -m tests.benchmarks.bench_profile_step llama-20m profiles/llama-20m.cpu.json --seq-len 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from muonprof import ProfiledMuon
from muonprof.optim.routing import route_module
from muonprof.workload import build_workload


def timed_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def torch_muon(model: torch.nn.Module) -> torch.optim.Optimizer | None:
    """torch.optim.Muon on the same hidden 2-D matrices ProfiledMuon gives to Muon (timing only)."""
    if not hasattr(torch.optim, "Muon"):
        return None
    routes = route_module(model)
    params = [p for n, p in model.named_parameters() if routes[n][0] == "muon" and p.ndim == 2]
    return torch.optim.Muon(params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("profiles", nargs="*", type=Path, help="profiles to time (each its own row)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    workload = build_workload(args.model, batch_size=args.batch_size, seq_len=args.seq_len, device=device)
    workload.loss(workload.train_batch(0)).backward()
    grads = {n: p.grad.detach().clone() for n, p in workload.model.named_parameters() if p.grad is not None}

    contenders: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}

    def fresh() -> torch.nn.Module:
        model = build_workload(args.model, batch_size=args.batch_size, seq_len=args.seq_len, device=device).model
        for n, p in model.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
        return model

    m = fresh()
    contenders["default"] = (m, ProfiledMuon(m))
    for path in args.profiles:
        m = fresh()
        contenders[path.stem] = (m, ProfiledMuon(m, profile=path))
    if not args.no_torch:
        m = fresh()
        opt = torch_muon(m)
        if opt is not None:
            contenders["torch.optim.Muon"] = (m, opt)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _name, (_, opt) in contenders.items():  # warm-up (momentum buffers, lazy allocations)
        timed_step(opt, device)
    for _ in range(args.rounds):
        for name, (_, opt) in contenders.items():
            times[name].append(timed_step(opt, device))
    base = statistics.median(times["default"])
    rows: list[dict[str, Any]] = []
    print(f"{args.model}: optimizer.step() on {device} ({torch.get_num_threads()} threads), {args.rounds} rounds")
    for name, samples in times.items():
        med = statistics.median(samples)
        row = {"contender": name, "median_s": med, "min_s": min(samples), "max_s": max(samples)}
        row["vs_default"] = base / med
        rows.append(row)
        print(f"  {name:28s} {med * 1e3:9.1f} ms  (min {min(samples) * 1e3:.1f}, max {max(samples) * 1e3:.1f})  "
              f"{base / med:5.2f}x vs default")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
