"""A model together with the batches and the loss that train it: what spectrum, tune and validate run.

``build_workload`` turns a MODEL spec and the data options into one, by the convention README documents:
a model that reads token ids (built-in LM, a module starting with ``nn.Embedding``, ``hf:``) is trained as a
causal language model on the text corpus; one starting with a Conv2d gets images; an MLP gets vectors; a
factory may return its own batches and loss. The model's initial weights and every batch are functions of
the seed alone, so two contenders built with the same arguments start equal and see the same data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DataError, ImageBatches, TokenBatches, VectorBatches, load_corpus
from .models import load_spec
from .models.task import TaskInfo

DEFAULT_SEQ_LEN = 256


class WorkloadError(ValueError):
    """Options that do not fit the model (sequence too long, data of the wrong kind, no way to train it)."""


@dataclass
class Workload:
    """Everything a training loop needs; ``train_batch(step)`` is the same batch on every run."""

    spec: str
    model: nn.Module
    task: TaskInfo | None
    train_batch: Callable[[int], Any]
    val_batches: Callable[[], list[Any]]
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batch_size: int | None
    seq_len: int | None
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)
    data_option: str | None = None  # the --data value this was built from (to rebuild it later)

    def loss(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)

    def describe(self) -> dict[str, Any]:
        """JSON-ready metadata: what was trained on what (goes into every artifact)."""
        task = None if self.task is None else {k: v for k, v in vars(self.task).items() if v is not None}
        return {
            "spec": self.spec,
            "overrides": self.overrides,
            "data_option": self.data_option,
            "config": self.config,
            "task": task,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "data": self.data,
        }


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, a Hugging Face ``ModelOutput`` or a tuple led by them."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise WorkloadError(f"the model returned {type(output).__name__}; expected logits (a tensor or .logits)")


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Next-token cross entropy, computed in float32 whatever the model's dtype."""
    x, y = batch
    logits = logits_of(model(x))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(logits_of(model(x)).float(), y)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def build_workload(
    spec: str,
    *,
    overrides: dict[str, Any] | None = None,
    data: str | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Workload:
    """The model for ``spec`` (initialized from ``seed``) on ``device``, with its batches and loss.

    ``data``: for language models None/"stdlib" (the Python standard library's source), a text file or
    folder, or "random"; for image models None/"synthetic" or "digits". Raises ModelSpecError,
    DataError or WorkloadError with a one-line message.
    """
    if batch_size < 1:
        raise WorkloadError(f"--batch-size must be at least 1, got {batch_size}")
    if seq_len is not None and seq_len < 1:
        raise WorkloadError(f"--seq-len must be at least 1, got {seq_len}")
    device = torch.device(device)
    overrides = dict(overrides or {})
    # The model's init is a function of the seed only, without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loaded = load_spec(spec, **overrides)
    model = loaded.model.to(device)
    task = loaded.task

    if loaded.batches is not None and loaded.loss is not None:
        user_batches, user_val = loaded.batches, loaded.val_batches
        return Workload(
            spec=spec,
            model=model,
            task=task,
            train_batch=lambda step: to_device(user_batches(step), device),
            val_batches=(lambda: [to_device(b, device) for b in user_val()]) if user_val else (lambda: []),
            loss_fn=loaded.loss,
            batch_size=None,
            seq_len=seq_len,
            data={"source": "factory", "description": "batches supplied by the factory"},
            config=loaded.config,
            overrides=overrides,
            data_option=data,
        )
    if task is None:
        raise WorkloadError(
            f"model {spec!r}: cannot tell what data it takes (it does not start with an nn.Embedding, a Conv2d "
            "or a Linear); return {'model': ..., 'batches': ..., 'loss': ...} from the factory"
        )

    if task.kind == "lm":
        limit = task.max_seq_len
        if seq_len is None:
            seq_len = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
        elif limit is not None and seq_len > limit:
            raise WorkloadError(f"--seq-len {seq_len} exceeds model {spec!r}'s maximum of {limit} positions")
        if data in ("synthetic", "digits"):
            raise WorkloadError(f"--data {data} is image data; model {spec!r} is a language model")
        corpus = load_corpus(data)
        batches = TokenBatches(corpus, batch_size=batch_size, seq_len=seq_len, seed=seed, vocab_size=task.vocab_size)
        loss_fn: Callable[[nn.Module, Any], Tensor] = lm_loss
        described = {"source": corpus.source, "description": corpus.description, "sha": getattr(corpus, "sha", None)}
    elif task.kind == "image":
        if seq_len is not None:
            raise WorkloadError(f"--seq-len does not apply to model {spec!r} (it takes images)")
        source = data or "synthetic"
        if source not in ("synthetic", "digits"):
            raise WorkloadError(f"--data {source!r}: image models take --data synthetic or --data digits")
        batches = ImageBatches(
            image_size=task.image_size or 32,
            channels=task.channels or 3,
            num_classes=task.num_classes or 10,
            batch_size=batch_size,
            seed=seed,
            source=source,
        )
        loss_fn = classification_loss
        text = f"{source} images, {task.image_size}px, {task.num_classes} classes"
        described = {"source": source, "description": text}
    elif task.kind == "vector":
        if seq_len is not None:
            raise WorkloadError(f"--seq-len does not apply to model {spec!r} (it takes feature vectors)")
        if data not in (None, "synthetic"):
            raise WorkloadError(f"--data {data!r}: vector models take synthetic data only")
        batches = VectorBatches(
            in_features=task.in_features or 64, num_classes=task.num_classes or 10, batch_size=batch_size, seed=seed
        )
        loss_fn = classification_loss
        described = {"source": "synthetic", "description": f"synthetic {task.in_features}-d vectors"}
    else:  # pragma: no cover - TaskInfo.kind is a Literal
        raise WorkloadError(f"model {spec!r}: unknown task kind {task.kind!r}")

    return Workload(
        spec=spec,
        model=model,
        task=task,
        train_batch=lambda step: to_device(batches.batch(step), device),
        val_batches=lambda: [to_device(b, device) for b in batches.val_batches()],
        loss_fn=loss_fn,
        batch_size=batch_size,
        seq_len=seq_len if task.kind == "lm" else None,
        data=described,
        config=loaded.config,
        overrides=overrides,
        data_option=data,
    )


__all__ = ["DataError", "Workload", "WorkloadError", "build_workload", "lm_loss", "logits_of", "to_device"]
