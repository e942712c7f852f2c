"""What each parameter does in one forward pass: a matrix or a table, the layer the input meets, or an output layer.

Why: routing from the module tree guesses. The "input conv" is the first conv *registered*, not the first one the
input meets (a stem registered after the body goes to Muon; a hidden 1x1 conv after an embedding goes to AdamW); a
second classifier head or a 1x1-conv classifier looks like any hidden matrix; a Linear patch embedding looks like a
hidden Linear; a positional table under an unusual name looks like a matrix. One forward pass shows what the model
actually does with each tensor, whatever the names and the registration order.

How: a ``TorchFunctionMode`` sees every torch function the forward pass calls (``F.linear``, ``F.conv2d``,
``torch.addmm`` in Hugging Face's Conv1D, ``F.embedding``, ``x + pos_embed``, ``torch.cat([cls, x])``, ...). Each
tensor produced gets a tag:

- ``alias``: the parameters it is a view or cast of (``W.T``, ``W.view(...)``, ``W.to(bf16)``: one input, same
  number of elements), so ``x @ self.weight.T`` still counts as a use of ``weight``;
- ``pure``: derived from the model's inputs through parameter-free ops only;
- ``last``: the matrix ops (parameters) whose results reach this tensor with no other matrix op in between.

A parameter (or its alias) that is an operand of a matrix op (linear, conv, matmul and their relatives) is used as a
*matrix*; one that goes into any other op (indexed by ``F.embedding``, added, concatenated, expanded) is used as a
*table*. An *input layer* is a matrix op with a ``pure`` data operand; the *output layers* are the ``last`` set of
what the traced call returns (for a loss, the layers that produce the logits). Embedding lookups count as matrix
ops for ``pure`` and ``last`` (what follows an embedding is hidden), but as table uses.

The pass runs under ``torch.no_grad()`` with the model in eval mode (restored afterwards) and the RNG state saved
and restored, so tracing changes neither BatchNorm statistics nor the random stream of the training run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

MATRIX_FUNCS = frozenset(
    {
        "linear",
        "bilinear",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "matmul",
        "__matmul__",
        "__rmatmul__",
        "mm",
        "bmm",
        "addmm",
        "addmm_",
        "baddbmm",
        "einsum",
        "multi_head_attention_forward",
    }
)
TABLE_FUNCS = frozenset({"embedding", "embedding_bag"})  # lookups: a table use that still ends the pure path


@dataclass(frozen=True)
class ParameterUse:
    """How one parameter was used in the traced forward pass."""

    matrix: bool = False  # an operand of a matrix op (linear, conv, matmul, ...)
    table: bool = False  # indexed, added, concatenated, expanded: a token or a table
    input_layer: bool = False  # its matrix op took the model's input with no matrix op in between
    output_layer: bool = False  # its matrix op's result reaches the traced output with no matrix op in between
    order: int = -1  # the index of its first matrix use among all matrix ops (-1: none)


@dataclass(frozen=True)
class _Tag:
    params: frozenset[int] = frozenset()  # the parameters a parameter-only tensor is computed from (W, W.T, W / |W|)
    data: bool = False  # depends on the batch (an activation), not only on parameters and constants
    pure: bool = False  # data reached through parameter-free ops only
    last: frozenset[int] = frozenset()  # the matrix ops upstream with no other matrix op in between


CONSTANT = _Tag()
BATCH = _Tag(data=True, pure=True)


@dataclass
class _Trace:
    names: dict[int, str]
    ndims: dict[int, int]
    tags: dict[int, _Tag] = field(default_factory=dict)
    keep: list[Tensor] = field(default_factory=list)  # keeps traced tensors alive so their ids stay unique
    matrix: set[int] = field(default_factory=set)
    table: set[int] = field(default_factory=set)
    inputs: set[int] = field(default_factory=set)
    order: dict[int, int] = field(default_factory=dict)
    matrix_ops: int = 0

    def tag(self, t: Tensor) -> _Tag:
        if id(t) in self.names:
            return _Tag(params=frozenset({id(t)}))
        found = self.tags.get(id(t))
        if found is None:  # neither a parameter nor made by a traced op: the batch the closure captured
            found = BATCH
            self.record(t, found)
        return found

    def record(self, t: Tensor, tag: _Tag) -> None:
        self.tags[id(t)] = tag
        self.keep.append(t)

    def matrices(self, params: frozenset[int]) -> frozenset[int]:
        """Only >= 2-D parameters are routing decisions; gains and biases go to AdamW whatever they do."""
        return frozenset(p for p in params if self.ndims.get(p, 0) >= 2)


class _Mode(TorchFunctionMode):
    def __init__(self, trace: _Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        results = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        if not results:  # .shape, .size(), .dim(), ...: reading a parameter's metadata is not a use
            return out
        trace, name = self.trace, getattr(func, "__name__", "")
        tags = [trace.tag(t) for t in tree_leaves((args, kwargs or {})) if isinstance(t, Tensor)]
        data = [t for t in tags if t.data]
        params = frozenset().union(*(t.params for t in tags if not t.data))
        if not data:  # parameters and constants only: a view, cast, norm or product of parameters
            tag = _Tag(params=params)
        elif name in MATRIX_FUNCS and trace.matrices(params):
            weights = trace.matrices(params)
            trace.matrix |= weights
            for p in weights:
                trace.order.setdefault(p, trace.matrix_ops)
            trace.matrix_ops += 1
            if any(t.pure for t in data):
                trace.inputs |= weights
            tag = _Tag(data=True, last=weights)
        elif name in TABLE_FUNCS and trace.matrices(params):
            weights = trace.matrices(params)
            trace.table |= weights
            tag = _Tag(data=True, last=weights)
        else:  # an activation combined with parameters (x + pos_embed, cat([cls, x])): a table / token use
            trace.table |= trace.matrices(params)
            tag = _Tag(data=True, pure=all(t.pure for t in data), last=frozenset().union(*(t.last for t in data)))
        for r in results:
            trace.record(r, tag)
        return out


def trace_parameter_use(model: nn.Module, run: Callable[[], Any]) -> dict[str, ParameterUse]:
    """``{parameter name: ParameterUse}`` for the >= 2-D parameters ``run()`` (a forward pass of ``model``, or a
    loss of it) used; parameters it did not touch are absent. ``run`` takes no arguments: close over the batch.
    The model's buffers count as constants, not as the batch."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trace = _Trace(names={id(p): n for n, p in named}, ndims={id(p): p.ndim for _, p in named})
    for buffer in model.buffers():
        trace.record(buffer, CONSTANT)
    was_training = model.training
    cuda_devices = sorted({p.device.index or 0 for _, p in named if p.device.type == "cuda"})
    model.eval()
    try:
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad(), _Mode(trace):
            out = run()
        heads = frozenset().union(*(trace.tag(t).last for t in tree_leaves(out) if isinstance(t, Tensor)))
    finally:
        model.train(was_training)
    return {
        trace.names[pid]: ParameterUse(
            matrix=pid in trace.matrix,
            table=pid in trace.table,
            input_layer=pid in trace.inputs,
            output_layer=pid in heads,
            order=trace.order.get(pid, -1),
        )
        for pid in trace.matrix | trace.table
    }


def example_runner(model: nn.Module, example_inputs: Any) -> Callable[[], Any]:
    """A no-argument forward pass: ``model(*inputs)`` for a tuple or list, ``model(**inputs)`` for a dict, else
    ``model(inputs)``."""
    if isinstance(example_inputs, dict):
        return lambda: model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return lambda: model(*example_inputs)
    return lambda: model(example_inputs)
