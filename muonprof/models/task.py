"""What a model eats and returns, so the data pipeline can feed any model without knowing its code.

Built-ins carry their ``TaskInfo`` as ``model.muonprof_task``; a bare user module gets one from
``infer_task``, which reads the first layer (embedding -> tokens, conv -> images, linear -> vectors).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn


class ModelSpecError(ValueError):
    """A MODEL argument that cannot be turned into a module; the message says what to pass instead."""


@dataclass(frozen=True)
class TaskInfo:
    """Inputs and outputs of a model.

    ``lm``: LongTensor (B, T) of token ids -> logits (B, T, vocab_size).
    ``image``: float (B, channels, image_size, image_size) -> logits (B, num_classes).
    ``vector``: float (B, in_features) -> logits (B, num_classes).
    """

    kind: Literal["lm", "image", "vector"]
    vocab_size: int | None = None
    max_seq_len: int | None = None
    image_size: int | None = None
    channels: int | None = None
    num_classes: int | None = None
    in_features: int | None = None


@dataclass
class LoadedModel:
    """A resolved MODEL spec: the module plus whatever the spec told us about how to train it.

    ``batches``/``loss``/``val_batches`` are set only by user workloads that bring their own data;
    otherwise the data pipeline builds synthetic or real batches from ``task``.
    """

    spec: str
    model: nn.Module
    task: TaskInfo | None
    config: dict[str, Any] = field(default_factory=dict)
    batches: Callable[[int], Any] | None = None
    loss: Callable[[nn.Module, Any], Tensor] | None = None
    val_batches: Callable[[], Iterable[Any]] | None = None
    source: Literal["builtin", "factory", "hf"] = "builtin"


_POSITION_NAME = re.compile(r"(^|[._])(pos|position|positions|wpe)([._]|$)|pos_emb|position_emb", re.IGNORECASE)
_IMAGE_SIZE_GUESS = 32  # CIFAR resolution: the size a conv net with no other hint is most often tested at


def infer_task(model: nn.Module) -> TaskInfo | None:
    """The task implied by the first parameterised layer of ``model``, or None when it is not a known kind.

    Loose parameters on container modules (a ViT's cls token) are skipped: they say nothing about the input.
    """
    own = [
        (name, module)
        for name, module in model.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]
    leaves = [(name, module) for name, module in own if next(module.children(), None) is None]
    if not leaves:
        return None
    linears = [m for _, m in leaves if isinstance(m, nn.Linear)]
    classes = linears[-1].out_features if linears else None
    _, first = leaves[0]
    if isinstance(first, nn.Embedding):
        positions = [
            m for name, m in leaves[1:] if isinstance(m, nn.Embedding) and _POSITION_NAME.search(name.rsplit(".")[-1])
        ]
        return TaskInfo(
            kind="lm",
            vocab_size=first.num_embeddings,
            max_seq_len=positions[0].num_embeddings if positions else None,
        )
    if isinstance(first, nn.Conv2d):
        return TaskInfo(kind="image", image_size=_IMAGE_SIZE_GUESS, channels=first.in_channels, num_classes=classes)
    if isinstance(first, nn.Linear):
        return TaskInfo(kind="vector", in_features=first.in_features, num_classes=classes)
    return None
