"""Which parameters Muon should update, decided from the module structure.

Muon is for hidden weight matrices. Embeddings are lookup tables (a row is updated only when its token
appears: orthogonalizing the whole table is wrong), the output head maps to a vocabulary or classes,
and 1-D gains and biases have no matrix structure: all of these go to AdamW, as every reference
implementation recommends. Shape alone cannot find the head (it is a 2-D Linear), so we use the module
tree: weight tying, the vocabulary size, conventional names, and finally "the last Linear".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .usage import ParameterUse

POSITION_NAME = re.compile(r"(^|[._])(pos|position|positions|wpe|cls)([._]|$)")
HEAD_NAME = re.compile(r"(^|\.)(lm_head|head|heads|classifier|output|out_proj_vocab|fc_out|logits|score)$")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
IN_OUT = "in_out"  # a weight stored as (fan_in, fan_out), the transpose of nn.Linear's (fan_out, fan_in)
# A (1, n) or (n, 1) "matrix" (timm's cls/reg/dist tokens (1, k, D), a latent query (1, L, D), a scalar-output
# head (1, D)): its polar factor is g / ||g||, so Muon would only normalize it; AdamW treats it per entry.
ONE_WIDE = "token / 1-wide (orthogonalizing would only normalize it)"
# Depthwise convs (groups == in_channels): a bank of C independent k x k filters, seen by Muon as a (C, k^2)
# matrix. Debated (a filter bank, not a channel map); measured on a depthwise-separable CNN with `validate`
# over 3 paired seeds, AdamW on them was worse at its group lr (+0.20 nats) and inconclusive at 10x (+0.03 ± 0.10):
# never non-inferior, so they stay on Muon (README's routing table has the numbers and the command).
DEPTHWISE = "depthwise conv (flattened to (C, k*k); AdamW measured not non-inferior on these, see README)"
LAYOUT_ATTRIBUTE = "muonprof_weight_layout"  # a module may declare its weight's layout: "in_out" or "out_in"


def route_module(model: nn.Module, usage: Mapping[str, ParameterUse] | None = None) -> dict[str, tuple[str, str]]:
    """``{parameter name: ("muon" | "adamw", reason)}`` for every trainable parameter of ``model``.

    ``usage`` (``usage.trace_parameter_use``: one forward pass) replaces the guesses from the module tree for the
    matrices the pass used: what it indexed, added or concatenated is a table; the matrix ops that took the input
    first and those that produced the output are the input and output layers, whatever their names and order
    of registration. Without it (or for parameters the pass did not use) the module tree decides.
    """
    routes: dict[str, tuple[str, str]] = {}
    embedding_params: set[int] = set()
    vocab_sizes: set[int] = set()
    linears: list[tuple[str, nn.Linear]] = []
    first_conv: nn.Module | None = None
    owner: dict[int, tuple[nn.Module, str]] = {}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module, pname))  # a tied parameter belongs to its first module
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            embedding_params.add(id(module.weight))
            if not POSITION_NAME.search(module_name):  # a position table's size is not a vocabulary
                vocab_sizes.add(module.num_embeddings)
        elif isinstance(module, nn.Linear):
            linears.append((module_name, module))
        elif isinstance(module, _CONV) and first_conv is None:
            first_conv = module
    heads = _find_heads(linears, vocab_sizes, embedding_params)

    for full, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module, pname = owner[id(p)]
        if id(p) in embedding_params:
            routes[full] = ("adamw", "embedding")
        elif p.ndim < 2:
            routes[full] = ("adamw", "vector (gain/bias)")
        elif _one_wide(p):
            routes[full] = ("adamw", ONE_WIDE)
        elif not isinstance(module, (nn.Linear, *_CONV)) and POSITION_NAME.search(full):
            routes[full] = ("adamw", "embedding")  # a raw position table or class token
        elif usage is not None and full in usage and id(p) not in embedding_params:
            routes[full] = _route_from_use(usage[full], _muon_reason(module))
        elif isinstance(module, nn.Linear) and pname == "weight" and id(module) in heads:
            routes[full] = ("adamw", heads[id(module)])
        elif isinstance(module, _CONV) and module is first_conv and pname == "weight":
            routes[full] = ("adamw", "input conv (stem / patch embedding)")
        else:
            routes[full] = ("muon", _muon_reason(module))
    return routes


TRACED_TABLE = "table / token (the forward pass adds, concatenates or indexes it)"
TRACED_INPUT = "input layer (the first matrix the input meets in the forward pass)"
TRACED_OUTPUT = "output layer (its result reaches the output with no matrix in between)"


def _route_from_use(use: ParameterUse, muon_reason: str) -> tuple[str, str]:
    if use.table:
        return ("adamw", TRACED_TABLE)
    if use.output_layer:
        return ("adamw", TRACED_OUTPUT)
    if use.input_layer:
        return ("adamw", TRACED_INPUT)
    return ("muon", muon_reason)


def _muon_reason(module: nn.Module) -> str:
    """Why a hidden matrix of ``module`` goes to Muon: what ``describe()`` shows."""
    if not isinstance(module, _CONV):
        return "hidden matrix"
    if module.groups > 1 and module.groups == module.in_channels:
        return DEPTHWISE
    return "conv (flattened)"


def _find_heads(
    linears: list[tuple[str, nn.Linear]], vocab_sizes: set[int], embedding_params: set[int]
) -> dict[int, str]:
    """Linear modules that are output heads, with the reason; see the module docstring for the order."""
    if not linears:
        return {}
    tied = {id(m): "output head (tied to the embedding)" for _, m in linears if id(m.weight) in embedding_params}
    if tied:
        return tied
    # A hidden layer can be as wide as the vocabulary (a byte-level GPT with a 4 x 64 MLP): of several
    # Linears projecting to the vocabulary size, the head is the last one.
    vocab = [m for _, m in linears if m.out_features in vocab_sizes]
    if vocab:
        return {id(vocab[-1]): "output head (projects to the vocabulary)"}
    named = {id(m): f"output head (named {n.rsplit('.', 1)[-1]!r})" for n, m in linears if HEAD_NAME.search(n)}
    if named:
        return named
    _, last = linears[-1]
    return {id(last): "output head (last Linear, projects to the outputs)"}


def route_named_parameters(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, tuple[str, str]]:
    """Without a module tree: matrices (>= 2-D, both sides > 1) to Muon, the rest to AdamW."""
    routes: dict[str, tuple[str, str]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            routes[name] = ("adamw", "vector (gain/bias)")
        elif _one_wide(p):
            routes[name] = ("adamw", ONE_WIDE)
        else:
            routes[name] = ("muon", "matrix")
    return routes


def _one_wide(p: torch.Tensor) -> bool:
    """Whether the matrix Muon would see, (shape[0], prod(shape[1:])), has a side of 1."""
    return p.ndim >= 2 and (p.shape[0] == 1 or p[0].numel() == 1)


def fan_layouts(model: nn.Module) -> dict[str, str]:
    """``{weight name: "in_out"}`` for the weights stored transposed to ``nn.Linear``'s (fan_out, fan_in).

    Muon's update is the same either way (the polar factor of a transpose is the transpose), but the shape
    rules of the learning rate are not: ``sqrt(max(1, out/in))`` read off a stored (in, out) matrix gives GPT-2's
    ``c_fc`` (768 -> 3072) a factor 1 instead of 2. Recognized: Hugging Face's ``Conv1D`` (GPT-2, GPT-Neo's
    relatives: ``weight`` of shape (nx, nf) with ``nf`` the output width) and any module that sets
    ``muonprof_weight_layout = "in_out"``.
    """
    layouts: dict[str, str] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        declared = getattr(module, LAYOUT_ATTRIBUTE, None)
        hf_conv1d = type(module).__name__ == "Conv1D" and getattr(module, "nf", None) == weight.shape[1]
        if declared == IN_OUT or (declared is None and hf_conv1d):
            layouts[f"{module_name}.weight" if module_name else "weight"] = IN_OUT
    return layouts
