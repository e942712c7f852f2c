"""Worker functions for the multi-process tests (spawned processes import them by module name).

Each worker initializes a gloo group over a file rendezvous (no ports), runs the scenario, and writes
what it found to ``<out>/rank<r>.pt`` so the test can compare ranks with a single-process reference.
"""

from __future__ import annotations

import copy
import gc
import itertools
import os
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from muonprof import ProfiledMuon

LAYERS = {
    "0.weight": {"method": "newton_schulz", "ns_steps": 5},
    "2.weight": {"method": "rsvd", "rank": 8, "dtype": "float32"},
    "4.weight": {"method": "lowrank", "rank": 8},
    "6.weight": {"method": "svd"},
    "8.weight": {"momentum_rank": 6},
    "10.weight": {"momentum": "storm"},
    "12.weight": {"momentum": "storm", "momentum_rank": 4},
}


def build_model(seed: int = 0) -> nn.Sequential:
    """Hidden matrices of several shapes, tall and wide, plus a bias-carrying head for AdamW."""
    torch.manual_seed(seed)
    dims = [24, 40, 40, 32, 48, 40, 40, 24, 32, 32, 48, 40, 24, 32]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b, bias=False), nn.Tanh()]
    layers.append(nn.Linear(dims[-1], 5))
    return nn.Sequential(*layers)


def profile(layers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format": "muonprof.profile/1", "layers": layers if layers is not None else LAYERS}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 24, generator=g), torch.randn(16, 5, generator=g)


def train(model: nn.Module, opt: ProfiledMuon, steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        x, y = batch(step)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure)))
    return losses


def _quiesce() -> None:
    """Before ``destroy_process_group``: drop the DDP/FSDP wrappers' pending gloo work and wait for the other rank.
    Gloo's worker threads still holding work objects when the process tears down abort it ("terminate called
    without an active exception", SIGABRT: seen once in CI after a passing run; pytorch/pytorch#179291)."""
    gc.collect()
    dist.barrier()


def _init(rank: int, world: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def ddp_equivalence(rank: int, world: int, rendezvous: str, out: str, steps: int, kwargs: dict[str, Any]) -> None:
    """Train the same model on the same batches with the layer split under DDP and, in the same
    process, without any distribution; save both final parameter sets and the optimizer's owners."""
    _init(rank, world, rendezvous)
    try:
        reference = build_model()
        batch_kwargs = {k: v for k, v in kwargs.items() if k == "batch"}
        plain = ProfiledMuon(reference, profile(), distributed=False, weight_decay=0.01, **batch_kwargs)
        ref_losses = train(reference, plain, steps)

        kwargs = dict(kwargs)
        if kwargs.pop("own_group", False):
            kwargs["process_group"] = dist.new_group(ranks=list(range(world)))
        model = build_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = ProfiledMuon(model, profile(), weight_decay=0.01, **kwargs)
        losses = train(ddp, opt, steps)
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "reference": {n: p.detach().clone() for n, p in reference.named_parameters()},
                "losses": losses,
                "ref_losses": ref_losses,
                "owners": dict(opt.owners),
                "cost_source": opt.cost_source,
                "state": copy.deepcopy(opt.state_dict()),
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
        del ddp, opt
        _quiesce()
    finally:
        dist.destroy_process_group()


LADDER_LAYERS = {
    # Newton-Schulz rungs: the probe signal of 2 steps is below 0.9, so it climbs.
    "0.weight": {"ladder": {"rungs": [{"ns_steps": 2, "dtype": "float32"}, {"ns_steps": 5}], "floor": 0.9, "every": 2}},
    # Range-finder rungs on a 40 x 40 momentum: rank 4 captures too little energy.
    "2.weight": {
        "ladder": {
            "rungs": [{"method": "lowrank", "rank": r, "dtype": "float32"} for r in (4, 8, 16)],
            "floor": 0.99,
            "every": 2,
        }
    },
    # Started on its top rung with a floor of 0: it steps down after its patience.
    "4.weight": {
        "ladder": {"rungs": [{"ns_steps": 3}, {"ns_steps": 5}], "floor": 0.0, "patience": 1, "every": 2, "start": 1}
    },
}


def ladder_equivalence(rank: int, world: int, rendezvous: str, out: str, steps: int) -> None:
    """Ladders under DDP with the layer split (only each layer's owner measures its signal; the decision is
    taken from the all-reduced table) against one process: save both ladder states, traces and weights."""
    _init(rank, world, rendezvous)
    try:
        reference = build_model()
        plain = ProfiledMuon(
            reference, profile(LADDER_LAYERS), distributed=False, ladder_trace=os.path.join(out, f"ref{rank}.jsonl")
        )
        train(reference, plain, steps)
        model = build_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = ProfiledMuon(model, profile(LADDER_LAYERS), ladder_trace=os.path.join(out, "ddp.jsonl"))
        train(ddp, opt, steps)
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "reference": {n: p.detach().clone() for n, p in reference.named_parameters()},
                "status": opt.ladder_status(),
                "ref_status": plain.ladder_status(),
                "owners": dict(opt.owners),
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
        del ddp, opt
        _quiesce()
    finally:
        dist.destroy_process_group()


FSDP_LAYERS = {
    "0.weight": {"method": "newton_schulz"},
    "2.weight": {"method": "rsvd", "rank": 6, "dtype": "float32"},
    "4.weight": {"method": "svd"},
    "6.weight": {"momentum": "storm"},
}


def build_fsdp_model(seed: int = 0) -> nn.Sequential:
    """Odd row counts (33, 17) so that FSDP2's shards are uneven."""
    torch.manual_seed(seed)
    dims = [24, 33, 40, 17, 24]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b, bias=False), nn.Tanh()]
    layers.append(nn.Linear(dims[-1], 5))
    return nn.Sequential(*layers)


def fsdp_equivalence(rank: int, world: int, rendezvous: str, out: str, steps: int) -> None:
    """FSDP2 (fully_shard per layer and at the root) against one process, same batches on every rank."""
    from torch.distributed.fsdp import fully_shard

    _init(rank, world, rendezvous)
    try:
        reference = build_fsdp_model()
        plain = ProfiledMuon(reference, profile(FSDP_LAYERS), distributed=False, weight_decay=0.01)
        ref_losses = train(reference, plain, steps)

        model = build_fsdp_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = ProfiledMuon(model, profile(FSDP_LAYERS), weight_decay=0.01)
        losses = train(model, opt, steps)
        full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        torch.save(
            {
                "params": full,
                "reference": {n: p.detach().clone() for n, p in reference.named_parameters()},
                "losses": losses,
                "ref_losses": ref_losses,
                "owners": dict(opt.owners),
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
        del model, opt
        _quiesce()
    finally:
        dist.destroy_process_group()


def expect_error(rank: int, world: int, rendezvous: str, out: str, scenario: str) -> None:
    """Run a scenario that must raise; record the error message (or that none came)."""
    _init(rank, world, rendezvous)
    try:
        message = "no error"
        try:
            _scenarios[scenario](rank)
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
        except BaseException:
            message = traceback.format_exc()
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as fh:
            fh.write(message)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _disagreeing_profiles(rank: int) -> None:
    layers = {"0.weight": {"ns_steps": 5 if rank == 0 else 4}}
    ProfiledMuon(build_model(), profile(layers))


def _disagreeing_lr(rank: int) -> None:
    ProfiledMuon(build_model(), profile({}), lr=0.02 if rank == 0 else 0.03)


def _storm_without_closure(rank: int) -> None:
    model = build_model()
    opt = ProfiledMuon(model, profile({"0.weight": {"momentum": "storm"}}))
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _fsdp_low_rank_momentum(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model = build_fsdp_model()
    fully_shard(model)
    ProfiledMuon(model, profile({"2.weight": {"momentum_rank": 4}}))


def _column_sharded(rank: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    weight = nn.Parameter(distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)]))
    ProfiledMuon([("tp.weight", weight)])


def _partly_sharded(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model = build_fsdp_model()
    fully_shard(model[0])
    ProfiledMuon(model)


def _ddp_error_feedback(rank: int) -> None:
    ProfiledMuon(build_model(), profile({"0.weight": {"method": "lowrank", "rank": 4, "error_feedback": True}}))


def _fsdp_subset(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model = build_fsdp_model()
    fully_shard(model)
    ProfiledMuon(model, profile({"2.weight": {"method": "subset", "fraction": 0.5}}))


_scenarios = {
    "ddp_error_feedback": _ddp_error_feedback,
    "fsdp_subset": _fsdp_subset,
    "fsdp_low_rank_momentum": _fsdp_low_rank_momentum,
    "column_sharded": _column_sharded,
    "partly_sharded": _partly_sharded,
    "disagreeing_profiles": _disagreeing_profiles,
    "disagreeing_lr": _disagreeing_lr,
    "storm_without_closure": _storm_without_closure,
}
