"""Splitting ProfiledMuon's orthogonalization across torch.distributed ranks.

Under DDP every rank holds the same averaged gradient, so every rank orthogonalizing every layer is
the same work done world-size times. Instead each Muon layer gets one owner rank (greedy
longest-processing-time assignment on the layer's cost: the profile's measured time when it has one
for every layer, else a flop estimate), the owner computes the layer's update, and one all_gather per
step hands every rank every update. The momentum buffers stay replicated (they are cheap elementwise
work and keep ``state_dict`` identical on all ranks); only the expensive part is split.

The result is bit-identical to a single process on the same device: the same kernels run on the same
inputs (randomized methods draw from a per-layer generator, so the sketch does not depend on which rank
or batch computes it), and the all_gather copies values exactly (each output travels in its own dtype).
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
from ..ortho.feedback import feedback_flops, subset_flops
from ..ortho.gram import configured_newton_schulz_flops
from ..ortho.lowrank import lowrank_flops
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


def check_sharding(
    named: Sequence[tuple[str, Tensor]],
    plans: Mapping[str, LayerPlan],
    distributed: bool | None,
    process_group: Any,
) -> Any | None:
    """The FSDP2 mesh group when the parameters are FSDP2 DTensors (None for plain tensors); refuses every
    sharding whose update this optimizer would get wrong, naming the layer and what to do instead."""
    flat = [name for name, p in named if type(p).__name__ == "FlatParameter" or "_flat_param" in name]
    if flat:
        raise DistributedSetupError(
            f"{flat[0]} is an FSDP1 FlatParameter: FullyShardedDataParallel flattens weight matrices into 1-D "
            "buffers, so Muon cannot orthogonalize them. Use FSDP2 (torch.distributed.fsdp.fully_shard) or DDP"
        )
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without DTensor: nothing can be sharded
        return None
    sharded = [(name, p) for name, p in named if isinstance(p, DTensor)]
    if not sharded:
        return None
    if len(sharded) != len(named):
        plain = [name for name, p in named if not isinstance(p, DTensor)]
        raise DistributedSetupError(
            f"{len(plain)} parameter(s) are plain tensors while others are FSDP2 DTensors (first: {plain[0]}); "
            "apply fully_shard to the root module too, so that every parameter is sharded the same way"
        )
    if distributed is False:
        raise DistributedSetupError(
            "distributed=False cannot update FSDP2-sharded parameters: each rank holds only its rows of a "
            "matrix, and Muon needs the whole matrix"
        )
    mesh = sharded[0][1].device_mesh
    for name, p in sharded:
        if p.device_mesh != mesh:
            raise DistributedSetupError(f"{name} lives on another device mesh than {sharded[0][0]}")
        if mesh.ndim != 1:
            raise DistributedSetupError(
                f"{name} is on a {mesh.ndim}-D device mesh (HSDP or tensor parallelism): only FSDP2 on a 1-D "
                "mesh is supported yet"
            )
        if tuple(p.placements) != (Shard(0),):
            raise DistributedSetupError(
                f"{name} is sharded as {tuple(p.placements)}: only FSDP2 row sharding (Shard(0)) is supported "
                "yet (tensor-parallel column sharding, replication or partial placements are not)"
            )
        plan = plans[name]
        if plan.optimizer == "muon" and plan.momentum_rank is not None:
            raise DistributedSetupError(
                f"{name}: momentum_rank (low-rank momentum) with FSDP2 is not supported yet; "
                "use it with DDP or one process, or drop momentum_rank for sharded runs"
            )
    group = mesh.get_group()
    if process_group is not None and process_group != group:
        raise DistributedSetupError("process_group= differs from the FSDP2 device mesh's group; pass neither")
    return group


def _chunk_rows(rows: int, world: int) -> int:
    """Rows per rank in FSDP2's Shard(0) layout (torch.chunk: ceil(rows / world), the last ranks short)."""
    return -(-rows // world)


def gather_rows(local: Tensor | None, shape: tuple[int, int], owner: int, group: Any) -> Tensor | None:
    """The whole (m, n) matrix on ``owner`` from every rank's rows (None elsewhere)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    m, n = shape
    chunk = _chunk_rows(m, world)
    assert local is not None
    rows = local.reshape(local.shape[0], n)
    padded = torch.zeros(chunk, n, dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]].copy_(rows)
    pieces = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
    dist.gather(padded, pieces, dst=dist.get_global_rank(group, owner), group=group)
    if pieces is None:
        return None
    return torch.cat(pieces)[:m]


def scatter_rows(
    full: Tensor | None, local: Tensor, shape: tuple[int, int], dtype: torch.dtype, owner: int, group: Any
) -> Tensor:
    """Every rank's rows of the (m, n) ``full`` held by ``owner``, shaped like this rank's ``local`` rows."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    m, n = shape
    chunk = _chunk_rows(m, world)
    pieces = None
    if rank == owner:
        assert full is not None
        padded = torch.zeros(chunk * world, n, dtype=dtype, device=full.device)
        padded[:m].copy_(full.reshape(m, n))
        pieces = list(padded.split(chunk))
    out = torch.empty(chunk, n, dtype=dtype, device=local.device)
    dist.scatter(out, pieces, src=dist.get_global_rank(group, owner), group=group)
    return out[: local.shape[0]].reshape(local.shape)


def ortho_flops(shape: tuple[int, int], ortho: OrthoConfig | None, momentum_rank: int | None = None) -> float:
    """A device-independent cost of one layer's update, for balancing when nothing was measured."""
    m, n = shape
    if momentum_rank is not None:
        return compression_flops(m, n, momentum_rank)
    ortho = ortho or OrthoConfig()
    if ortho.method == "newton_schulz":
        # Flops ignore that bf16 and fp32 run at different rates: the balance only needs relative costs.
        return configured_newton_schulz_flops(m, n, ortho)
    if ortho.method == "svd":
        return svd_flops(m, n)
    if ortho.method == "subset":
        return subset_flops(m, n, ortho)
    return lowrank_flops(m, n, ortho) + feedback_flops(m, n, ortho)


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
        + ([p.ladder.to_json()] if p.ladder is not None else [])  # absent without a ladder: hashes as before
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
    workspace: dict[Any, tuple[Tensor, list[Tensor]]] | None = None,
) -> dict[int, list[Tensor]]:
    """All-gather every rank's owned results; returns every layer's tensors on every rank.

    ``layout`` lists, in the same order on all ranks, ``(layer key, owner rank, [(shape, dtype), ...])``;
    ``owned`` holds this rank's tensors for the layers it owns. Results travel in one flat buffer per
    dtype and rank (padded to the largest share): one collective per dtype, and a bf16 Newton-Schulz
    output crosses the wire as bf16, half the bytes of fp32. ``workspace`` keeps those buffers between
    steps: freshly allocated ones cost page faults that made the all_gather 3x slower on CPU (measured,
    GPT-2 small over 2 gloo ranks: 2.4 s with fresh buffers, 0.75 s reused).
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sizes: dict[torch.dtype, list[int]] = {}
    for _, owner, parts in layout:
        for shape, dtype in parts:
            sizes.setdefault(dtype, [0] * world)[owner] += _numel(shape)
    received: dict[torch.dtype, list[Tensor]] = {}
    for dtype, per_rank in sizes.items():
        width = max(per_rank)
        key = (dtype, width, device)
        if workspace is not None and key in workspace:
            send, recv = workspace[key]
        else:
            send = torch.zeros(width, device=device, dtype=dtype)
            recv = [torch.empty_like(send) for _ in range(world)]
            if workspace is not None:
                for stale in [k for k in workspace if k[0] == dtype and k[2] == device]:
                    del workspace[stale]
                workspace[key] = (send, recv)
        offset = 0
        for layer, owner, parts in layout:
            if owner != rank:
                continue
            for tensor, (shape, part_dtype) in zip(owned[layer], parts):
                if part_dtype == dtype:
                    count = _numel(shape)
                    send[offset : offset + count].copy_(tensor.reshape(-1))
                    offset += count
        dist.all_gather(recv, send, group=group)
        received[dtype] = recv
    offsets = {dtype: [0] * world for dtype in sizes}
    out: dict[int, list[Tensor]] = {}
    for layer, owner, parts in layout:
        tensors = []
        for shape, dtype in parts:
            count, start = _numel(shape), offsets[dtype][owner]
            # Views into the workspace: valid until the next exchange, and the caller may scale them in place.
            tensors.append(received[dtype][owner][start : start + count].view(shape))
            offsets[dtype][owner] += count
        out[layer] = tensors
    return out


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
