"""Does compiling ProfiledMuon's hot path pay? Eager vs ``torch.compile`` of the functional core's pieces.

Why this exists: issue 14 asks for the bucket step to be compiled (``torch.compile``, or CUDA graphs on a GPU)
*where it pays*, keeping only what wins. The pieces that are not a matmul are memory-bound elementwise passes
(the EMA momentum and its Nesterov mix, the weight decay and the update, AdamW), so compiling can only win
by fusing passes or by cutting launch overhead, which is the GPU's problem more than the CPU's. This measures
each piece on GPT-2-small's 48 hidden matrices (and AdamW on llama-20m's embedding + head), eager against
compiled, interleaved in one process (``bench_step.run_interleaved``: shuffled rounds, medians, load recorded).

- ``momentum``: ``functional.ema_momentum`` (lerp_ of the buffer, lerp for the Nesterov input).
- ``apply``: ``functional.muon_apply`` (weight decay and the scaled add), from fixed updates.
- ``ns5``: one bf16 Newton-Schulz x5 on a 768 x 3072 matrix (matmul-bound: compiling should change nothing).
- ``adamw``: ``functional.adamw`` fused (torch's kernel; the eager column) against torch's own recipe for a
  compiled optimizer, ``torch.compile(torch.optim.AdamW(foreach=True).step)`` (the compiled column).

Run from the repository root (not part of the test suite)::

    python -m tests.benchmarks.bench_compile            # ~1-2 min on 2 CPU cores, most of it compiling
    python -m tests.benchmarks.bench_compile --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import muonprof  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from muonprof.optim import functional as F
from muonprof.ortho import OrthoConfig, orthogonalize

from .bench_step import Progress, Timed, cpu_info, gpt2_shapes, run_interleaved, summarize

MU, LR, WD = 0.95, 0.02, 0.01


def pieces(device: torch.device, quick: bool) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (eager step, compiled step), each on its own tensors."""
    gen = torch.Generator().manual_seed(0)
    width, blocks = (256, 2) if quick else (768, 12)
    shapes = [(o, i) for _, i, o in gpt2_shapes(width, blocks)]

    def mats() -> list[torch.Tensor]:
        return [torch.randn(s, generator=gen).to(device) for s in shapes]

    out: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
    compiled_momentum = torch.compile(F.ema_momentum, dynamic=False)
    compiled_apply = torch.compile(F.muon_apply, dynamic=False)
    bufs_e, grads_e, bufs_c, grads_c = mats(), mats(), mats(), mats()
    out["momentum"] = (
        lambda: F.ema_momentum(bufs_e, grads_e, MU, True, None),
        lambda: compiled_momentum(bufs_c, grads_c, MU, True, None),
    )
    params_e, params_c, updates = mats(), mats(), mats()
    factors = [1.0] * len(shapes)
    out["apply"] = (
        lambda: F.muon_apply(
            params_e, [u.clone() for u in updates], lr=LR, weight_decay=WD, lr_factors=factors, ok=None
        ),
        lambda: compiled_apply(
            params_c, [u.clone() for u in updates], lr=LR, weight_decay=WD, lr_factors=factors, ok=None
        ),
    )
    X = torch.randn(width, 4 * width, generator=gen).to(device)
    config = OrthoConfig()
    compiled_ns = torch.compile(lambda x: orthogonalize(x, config), dynamic=False)
    out["ns5"] = (lambda: orthogonalize(X, config), lambda: compiled_ns(X))
    vocab = 4000 if quick else 32000
    tables = [(vocab, 256), (vocab, 256), (256,)]

    def tables_with_grads() -> list[torch.Tensor]:
        ps = [torch.randn(s, generator=gen).to(device) for s in tables]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        return ps

    fused_params = tables_with_grads()
    fused_state = (
        fused_params,
        [p.grad for p in fused_params],
        [torch.zeros_like(p) for p in fused_params],
        [torch.zeros_like(p) for p in fused_params],
        [torch.zeros((), dtype=torch.float32, device=device) for _ in fused_params],
    )

    def fused() -> None:
        F.adamw(
            *fused_state,  # type: ignore[arg-type]
            lr=3e-4,
            lr_scales=[1.0] * len(tables),
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=WD,
            ok=None,
            impl="fused",
        )

    # torch's documented recipe for a compiled optimizer step (torch.compile of opt.step, foreach AdamW).
    reference = torch.optim.AdamW(tables_with_grads(), lr=3e-4, betas=(0.9, 0.95), weight_decay=WD, foreach=True)
    out["adamw"] = (fused, torch.compile(reference.step))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    progress = Progress(not args.quiet)
    results: dict[str, Any] = {"device": str(device), "cpu": cpu_info(), "torch": torch.__version__, "pieces": {}}
    for name, (eager, compiled) in pieces(device, args.quick).items():
        entries = [
            Timed(f"{name}-eager", f"{name} eager", eager),
            Timed(f"{name}-compiled", f"{name} compiled", compiled),
        ]
        meta = run_interleaved(
            entries, device, warmup=2, repeats=args.repeats, max_mean_s=30.0, seed=0, progress=progress
        )
        medians = {e.key: summarize(e.times_s) for e in entries}
        eager_ms = medians[f"{name}-eager"]["median_s"] * 1e3
        compiled_ms = medians[f"{name}-compiled"]["median_s"] * 1e3
        results["pieces"][name] = {
            "eager_ms": eager_ms,
            "compiled_ms": compiled_ms,
            "compiled_over_eager": compiled_ms / eager_ms,
            "compile_s": entries[1].warmup_s[0] if entries[1].warmup_s else None,
            **meta,
        }
        print(
            f"{name:9s} eager {eager_ms:9.2f} ms   compiled {compiled_ms:9.2f} ms   "
            f"compiled/eager {compiled_ms / eager_ms:5.2f}   "
            f"(first compiled call {results['pieces'][name]['compile_s']:.1f} s)"
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke test")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
