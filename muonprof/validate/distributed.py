"""``muonprof validate --nproc N``: the same race as data-parallel training over N local ranks.

The parent process (the command) checks the options, starts N workers with ``muonprof.launch`` (one per
core share on CPU with gloo, one per GPU with nccl) and drives the progress bar from rank 0's events; every
rank runs ``validate()`` with the same arguments, so all build identical models (same seed; DDP also
broadcasts rank 0's weights) and the same batch sequence. Per step, each rank trains on its contiguous
shard of the *global* batch (``--batch-size`` rows split over the ranks, which must divide it), through
``DistributedDataParallel``, whose all-reduce averages the shard gradients: N ranks x (B/N) rows give the
gradient one process gets from B rows (each shard's loss is a mean over the same number of tokens), up to
float rounding. The recorded training loss is the mean over the ranks (the global batch's loss), and
evaluation is split over the ranks by batch and summed. Rank 0 returns the result; the parent writes the
results file, the plot and the JSON exactly as the single-process path does. ``meta["distributed"]``
records the world size, backend, per-rank batch and threads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..launch import LaunchError, WorkerContext, WorkerExit, check_nproc, launch
from ..train import RankSync
from ..workload import Workload, WorkloadError
from .results import ValidationResult
from .run import ProgressEvent, ValidationError, validate


@dataclass
class DistributedRun:
    """This rank's place in a ``validate --nproc N`` job (built in the worker, after init_process_group)."""

    rank: int
    world_size: int
    backend: str
    device: torch.device
    threads: int
    sync: RankSync

    def wrap(self, workload: Workload) -> Workload:
        """``workload`` trained data-parallel: this rank's shard of each batch, forward/backward through DDP.

        ``workload.model`` stays the bare module (the optimizer, state_dict and evaluation use it); only the
        training loss goes through the DDP wrapper, whose backward all-reduces (averages) the gradients.
        Evaluation (no grad) uses the bare module, so it runs no collective. Buffers are not broadcast
        each forward: every rank builds the same ones from the same seed, and DDP's constructor
        broadcasts rank 0's parameters and buffers once.
        """
        from torch.nn.parallel import DistributedDataParallel

        module = workload.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        inner_loss, inner_batch = workload.loss_fn, workload.train_batch
        rank, world = self.rank, self.world_size

        def loss_fn(_model: Any, batch: Any) -> Tensor:
            return inner_loss(ddp if torch.is_grad_enabled() else module, batch)

        def train_batch(step: int) -> Any:
            return shard_batch(inner_batch(step), rank, world)

        return dataclasses.replace(workload, loss_fn=loss_fn, train_batch=train_batch)

    def describe(self, global_batch: int | None) -> dict[str, Any]:
        return {
            "nproc": self.world_size,
            "world_size": self.world_size,
            "backend": self.backend,
            "launcher": "muonprof.launch (torch.multiprocessing.start_processes, spawn; torchrun environment)",
            "data_parallel": "torch.nn.parallel.DistributedDataParallel",
            "global_batch_size": global_batch,
            "per_rank_batch_size": None if global_batch is None else global_batch // self.world_size,
            "torch_threads_per_rank": self.threads,
            "train_loss": "mean over the ranks of each rank's shard loss (= the global batch's loss)",
            "evaluation": "val batches split over the ranks (rank r: r, r+N, ...), losses summed over ranks",
            "timings": "rank 0's clock; a time budget is judged on the slowest rank's",
        }


def shard_batch(batch: Any, rank: int, world: int) -> Any:
    """Rank ``rank``'s contiguous share of every tensor's rows in a (nested) batch."""
    if isinstance(batch, Tensor):
        rows = batch.shape[0] if batch.ndim else 0
        if rows % world:
            raise WorkloadError(f"a batch of {rows} rows does not split over {world} ranks (--nproc {world})")
        share = rows // world
        return batch[rank * share : (rank + 1) * share]
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(v, rank, world) for v in batch)
    return batch


def check_distributed(nproc: int, batch_size: int, device: torch.device) -> str:
    """Refuse what cannot run as ``--nproc`` ranks (ValidationError, one line); return the backend."""
    try:
        backend = check_nproc(nproc, device)
    except LaunchError as err:
        raise ValidationError(err.message) from None
    if batch_size % nproc:
        raise ValidationError(
            f"--batch-size {batch_size} does not split over --nproc {nproc} ranks: the global batch is shared "
            f"out evenly, so give a multiple of {nproc}"
        )
    return backend


def validate_distributed(
    spec: str,
    *,
    nproc: int,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: Any = None,
    timeout_s: float | None = None,
    **kwargs: Any,
) -> ValidationResult:
    """``validate(spec, ...)`` as ``nproc`` data-parallel ranks; returns rank 0's result.

    Raises ValidationError for options that cannot run this way, LaunchError (one line, exit code) when a
    worker fails, and KeyboardInterrupt after stopping the workers.
    """
    device = torch.device(device)
    check_distributed(nproc, batch_size, device)
    options = dict(kwargs, batch_size=batch_size)
    return launch(_worker, (spec, options), nproc=nproc, device=device, on_message=progress, timeout_s=timeout_s)


def _worker(ctx: WorkerContext, spec: str, options: dict[str, Any]) -> ValidationResult | None:
    """One rank: the whole validate() run; rank 0 forwards progress and returns the result."""
    from ..data import DataError
    from ..models import ModelSpecError
    from ..profile import ProfileError
    from .contenders import ContenderError

    run = DistributedRun(ctx.rank, ctx.world_size, ctx.backend, ctx.device, ctx.threads, RankSync())

    def forward(event: ProgressEvent) -> None:
        ctx.send(event)

    try:
        result = validate(spec, device=ctx.device, distributed=run, progress=forward if ctx.rank == 0 else None,
                          **options)  # fmt: skip
    except (ProfileError, ContenderError, ValidationError, ModelSpecError, DataError, WorkloadError) as err:
        raise WorkerExit(_one_line(err) + " (no results file written)", 2) from None
    except (ValueError, TypeError) as err:  # e.g. an lr ProfiledMuon refuses (as the single-process command)
        raise WorkerExit(_one_line(err) + " (no results file written)", 2) from None
    except torch.OutOfMemoryError:
        raise WorkerExit(
            f"out of memory on {ctx.device} (rank {ctx.rank}): try a smaller --batch-size or --seq-len "
            "(no results file written)",
            1,
        ) from None
    return result if ctx.rank == 0 else None


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


__all__ = [
    "DistributedRun",
    "check_distributed",
    "shard_batch",
    "validate_distributed",
]
