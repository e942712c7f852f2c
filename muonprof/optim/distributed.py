"""Splitting ProfiledMuon's orthogonalization across torch.distributed ranks.

Under DDP every rank holds the same averaged gradient, so every rank orthogonalizing every layer is
the same work done world-size times. Instead each Muon layer gets one owner rank (greedy
longest-processing-time assignment on the layer's cost: the profile's measured time when it has one
for every layer, else a flop estimate), the owner computes the layer's update, and one all_gather per
step hands every rank every update. The momentum buffers stay replicated (they are cheap elementwise
work and keep ``state_dict`` identical on all ranks); only the expensive part is split.

The result is bit-identical to a single process on the same device: the same kernels run on the same
inputs (randomized methods draw from a per-layer generator, so the sketch does not depend on which rank
or batch computes it), and the all_gather copies values exactly (bf16/fp32 outputs travel as fp32).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..ortho.config import OrthoConfig
from ..ortho.exact import svd_flops
from ..ortho.lowrank import lowrank_flops
from ..ortho.newton_schulz import newton_schulz_flops
from ..profile import LayerPlan, Profile
from .lowrank_momentum import compression_flops


class DistributedSetupError(RuntimeError):
    """The distributed setup cannot give a correct update (unsupported sharding, ranks disagreeing...)."""


def resolve_group(distributed: bool | None, process_group: Any) -> Any | None:
    """The process group to split over, or None for no split.

    ``distributed=None`` (default): split when ``process_group`` is given or a default group is
    initialized. ``False``: never (every rank does all layers). ``True``: require a group.
    """
    if distributed is False:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if process_group is not None:
        if not initialized:
            raise DistributedSetupError("process_group= was given but torch.distributed is not initialized")
        return process_group
    if initialized:
        return dist.group.WORLD
    if distributed:
        raise DistributedSetupError(
            "distributed=True but no process group is initialized: call torch.distributed.init_process_group first"
        )
    return None


def ortho_flops(shape: tuple[int, int], ortho: OrthoConfig | None, momentum_rank: int | None = None) -> float:
    """A device-independent cost of one layer's update, for balancing when nothing was measured."""
    m, n = shape
    if momentum_rank is not None:
        return compression_flops(m, n, momentum_rank)
    ortho = ortho or OrthoConfig()
    if ortho.method == "newton_schulz":
        cost = newton_schulz_flops(m, n, ortho.ns_steps)
        # bf16 and fp32 run at different rates; only relative costs matter, and NS dominates either way.
        return cost
    if ortho.method == "svd":
        return svd_flops(m, n)
    return lowrank_flops(m, n, ortho)


def layer_costs(plans: Sequence[LayerPlan], profile: Profile | None) -> tuple[list[float], str]:
    """Cost per layer and where it came from ("profile" measured time_ms, or "flops").

    Measured times are used only when every layer has one: mixing milliseconds with flops would make
    the balance meaningless.
    """
    measured: list[float] = []
    if profile is not None:
        for plan in plans:
            entry = profile.layers.get(plan.name)
            time_ms = entry.measured.time_ms if entry is not None and entry.measured is not None else None
            if time_ms is None or time_ms <= 0:
                break
            measured.append(float(time_ms))
        else:
            if plans:
                return measured, "profile"
    return [ortho_flops(p.matrix_shape, p.ortho, p.momentum_rank) for p in plans], "flops"


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank per layer: greedy LPT (largest cost first, to the least-loaded rank; ties to the lower
    index and rank), deterministic so every rank computes the same assignment without talking."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0.0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    owners = [0] * len(costs)
    for i in order:
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


def plans_digest(plans: Mapping[str, LayerPlan], hyper: Mapping[str, Any]) -> str:
    """A short hash of everything that must agree across ranks: every layer's resolved plan and the
    optimizer's hyper-parameters."""
    rows = [
        [
            p.name,
            list(p.shape),
            p.optimizer,
            p.ortho.to_json() if p.ortho else None,
            p.lr_rule,
            p.lr_scale,
            p.momentum,
            p.momentum_rank,
        ]
        for p in plans.values()
    ]
    text = json.dumps({"plans": rows, "hyper": {k: hyper[k] for k in sorted(hyper)}}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_everywhere(digest: str, group: Any) -> None:
    """Refuse to start when ranks resolved different plans (another profile file, another model...)."""
    world = dist.get_world_size(group)
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) > 1:
        listing = ", ".join(f"rank {r}: {d}" for r, d in enumerate(digests))
        raise DistributedSetupError(
            "ranks disagree on the profile or the optimizer settings (plan hashes "
            f"{listing}); every rank must load the same profile for the same model"
        )


def exchange(
    owned: Mapping[int, list[Tensor]],
    layout: Sequence[tuple[int, int, list[tuple[tuple[int, ...], torch.dtype]]]],
    group: Any,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, list[Tensor]]:
    """All-gather every rank's owned results; returns every layer's tensors on every rank.

    ``layout`` lists, in the same order on all ranks, ``(layer key, owner rank, [(shape, dtype), ...])``;
    ``owned`` holds this rank's tensors for the layers it owns. Everything travels in one flat
    ``dtype`` buffer per rank (padded to the largest share), so a step costs one collective.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sizes = [0] * world
    for _, owner, parts in layout:
        sizes[owner] += sum(_numel(shape) for shape, _ in parts)
    width = max(sizes) if sizes else 0
    if width == 0:
        return {}
    send = torch.zeros(width, device=device, dtype=dtype)
    offset = 0
    for key, owner, parts in layout:
        if owner != rank:
            continue
        for tensor, (shape, _) in zip(owned[key], parts):
            count = _numel(shape)
            send[offset : offset + count].copy_(tensor.reshape(-1))
            offset += count
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=group)
    offsets = [0] * world
    out: dict[int, list[Tensor]] = {}
    for key, owner, parts in layout:
        tensors = []
        for shape, part_dtype in parts:
            count = _numel(shape)
            start = offsets[owner]
            tensors.append(received[owner][start : start + count].view(shape).to(part_dtype))
            offsets[owner] += count
        out[key] = tensors
    return out


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
