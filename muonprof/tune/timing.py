"""Measured optimizer-step times of several profiles, side by side in one process, interleaved.

Bench prices a profile as the sum of its layers' orthogonalization times; what a user pays is the whole
``optimizer.step()`` (momentum, AdamW for the rest, the non-finite check, the update). On a shared machine
two separate runs can differ 2-10x, so speed ratios are only trusted when the contenders are timed in
the same process, round by round (A B C A B C ..., the order shuffled each round so no one always runs
after the same neighbour), and summarized by the median, which one slow round cannot move. A round's
spread is kept; when the interquartile range of any contender exceeds ``RETRY_SPREAD`` of its median the
rounds are extended (up to ``MAX_ROUND_FACTOR`` x), and the machine's load average before and after is
recorded, so a reader can tell a quiet measurement from a noisy one.

Each timed ``step()`` follows that contender's own forward/backward pass, as in training, so the caches are
as a training step leaves them. What a few rounds cannot show is what changes over a long run. On gpt2-tiny
(AMD EPYC, 2 cores) the default's own polynomial in fp32 timed 1.68x the bf16 default's step here; in two runs
trained alternately step by step in one process it was 1.71x over the first 30 steps, 1.36x over the first
150, and 1.68x over 150 with ``torch.set_flush_denormal(True)`` set before training (which also made both
runs' whole training step ~25% faster). Parameters, gradients and optimizer state held no subnormal values
at step 150, so the slow-down is in intermediates (attention probabilities are the likely place); not pinned
down.
The forward/backward passes are timed too, so the default's share of the training step — and with it the
Amdahl bound on any optimizer speedup, ``1 / (1 - share)`` — comes from the same measurement.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from ..device.load import load_average
from ..workload import Workload
from .stage2 import DEFAULT_LR

WARMUP_STEPS = 2
RETRY_SPREAD = 0.25
MAX_ROUND_FACTOR = 3
FWD_BWD = "forward+backward"


def interleaved_step_times(
    workload: Workload, profiles: Mapping[str, Any], *, rounds: int = 9, adamw_lr: float = 3e-4, seed: int = 0
) -> dict[str, Any]:
    """Median ``optimizer.step()`` time per profile (ms), interleaved; ``profiles`` maps name -> profile
    (None = ProfiledMuon's default). The first key is the reference for ``amdahl_bound``."""
    from ..optim import ProfiledMuon

    if not profiles:
        raise ValueError("no profiles to time")
    device = next(workload.model.parameters()).device
    batch = workload.train_batch(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward_backward(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        loss = workload.loss_fn(model, batch)
        loss.backward()

    base = workload.model
    base.train()
    models, optimizers = {}, {}
    for name, profile in profiles.items():
        models[name] = copy.deepcopy(base)
        optimizers[name] = ProfiledMuon(models[name], profile, lr=DEFAULT_LR, adamw_lr=adamw_lr, seed=seed)
    reference = next(iter(profiles))

    def timed(name: str) -> tuple[float, float]:
        """(forward/backward, step) of one training step of ``name``: the step timed where training runs it."""
        sync()
        start = time.perf_counter()
        forward_backward(models[name])
        sync()
        middle = time.perf_counter()
        optimizers[name].step()
        sync()
        return middle - start, time.perf_counter() - middle

    names = list(profiles)
    for _ in range(WARMUP_STEPS):
        for name in names:
            timed(name)
    samples: dict[str, list[float]] = {name: [] for name in [*names, FWD_BWD]}
    order = random.Random(seed)
    load_before = load_average()
    done = 0
    limit = rounds * MAX_ROUND_FACTOR
    while done < limit:
        for _ in range(rounds if done == 0 else max(1, rounds // 2)):
            shuffled = names[:]
            order.shuffle(shuffled)
            for name in shuffled:
                fwd_bwd, step = timed(name)
                samples[name].append(step)
                if name == reference:
                    samples[FWD_BWD].append(fwd_bwd)
            done += 1
        if all(_spread(v) <= RETRY_SPREAD for v in samples.values()):
            break
    median_ms = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    opt_ms = median_ms[reference]
    share = opt_ms / (opt_ms + median_ms[FWD_BWD]) if opt_ms + median_ms[FWD_BWD] > 0 else 0.0
    return {
        "median_ms": {n: v for n, v in median_ms.items() if n != FWD_BWD},
        "fwd_bwd_ms": median_ms[FWD_BWD],
        "spread": {name: _spread(v) for name, v in samples.items()},
        "rounds": done,
        "reference": reference,
        "optimizer_share": share,
        "amdahl_bound": 1 / (1 - share) if share < 1 else float("inf"),
        "load_before": load_before,
        "load_after": load_average(),
        "threads": torch.get_num_threads(),
        "method": (
            "one process, every profile on its own copy of the model: a training step (forward/backward on "
            "the same batch, then optimizer.step(), the step timed), interleaved in shuffled order each round "
            "after 2 warm-up steps; median per profile; rounds extended while any IQR/median > 0.25"
        ),
    }


def _spread(values: list[float]) -> float:
    """Interquartile range over median."""
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    mid = statistics.median(values)
    return (q[2] - q[0]) / mid if mid > 0 else 0.0


