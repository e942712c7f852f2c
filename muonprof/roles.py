"""What each weight matrix does in the network: attention q/k/v/out, MLP gate/up/down, embedding, head, conv.

Roles matter because layers with the same role share a spectrum profile across depth (q/k gradients are
low-rank early in training, MLP down-projections are not), and tuning assigns learning-rate multipliers
per role. The routing decisions (embedding, head, stem) come from ``optim.routing``, which reads the module
tree; the rest comes from the naming conventions of the built-in models and of the common code bases
(Hugging Face GPT-2 / LLaMA / BERT / ViT, nanoGPT, torch's MultiheadAttention). A matrix that matches
none of them is ``linear`` (a hidden matrix of unknown role), never guessed.
"""

from __future__ import annotations

import re

from torch import nn

from .optim.routing import DEPTHWISE, ONE_WIDE, TRACED_INPUT, TRACED_OUTPUT, TRACED_TABLE, route_module

ROLES = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",
    "attn_out",
    "mlp_gate",
    "mlp_up",
    "mlp_down",
    "conv",
    "stem",
    "embedding",
    "head",
    "linear",
    "vector",
)

# Matched against the owning module's dotted name (the parameter name minus ".weight"), first hit wins.
# Order matters: "attn.c_proj" (GPT-2's attention output) must win over "c_proj" (its MLP down).
_NAME_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (role, re.compile(pattern, re.IGNORECASE))
    for role, pattern in (
        ("attn_qkv", r"(^|\.)(qkv|qkv_proj|c_attn|wqkv|in_proj|query_key_value)$|(^|\.)in_proj_weight$"),
        ("attn_q", r"(^|\.)(q_proj|query|wq|to_q|q)$"),
        ("attn_k", r"(^|\.)(k_proj|key|wk|to_k|k)$"),
        ("attn_v", r"(^|\.)(v_proj|value|wv|to_v|v)$"),
        ("attn_out", r"(^|\.)(o_proj|out_proj|wo|to_out(\.0)?)$|(attn|attention)\.(c_proj|proj|dense|output\.dense)$"),
        ("mlp_gate", r"(^|\.)(gate_proj|w1|gate|wi_0)$"),
        ("mlp_up", r"(^|\.)(up_proj|c_fc|fc1|w3|wi|wi_1|intermediate\.dense|up)$"),
        ("mlp_down", r"(^|\.)(down_proj|fc2|w2|down)$|(mlp|ffn|feed_forward)\.(c_proj|proj|wo|output\.dense)$"),
    )
)

_ROUTE_ROLES = {
    "embedding": "embedding",
    "vector (gain/bias)": "vector",
    "input conv (stem / patch embedding)": "stem",
    "conv (flattened)": "conv",
    DEPTHWISE: "conv",
    ONE_WIDE: "embedding",  # a learned token or latent query is a (tiny) table, not a map
    TRACED_TABLE: "embedding",
    TRACED_INPUT: "stem",
    TRACED_OUTPUT: "head",
}


def role_of_name(name: str) -> str | None:
    """The role a parameter's name alone implies, or None (``blocks.3.attn.q_proj.weight`` -> ``attn_q``)."""
    owner = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    for role, pattern in _NAME_RULES:
        if pattern.search(owner) or pattern.search(name):
            return role
    return None


def classify_roles(model: nn.Module) -> dict[str, str]:
    """``{parameter name: role}`` for every trainable parameter of ``model`` (see ``ROLES``)."""
    roles: dict[str, str] = {}
    for name, (_, reason) in route_module(model).items():
        if reason in _ROUTE_ROLES:
            roles[name] = _ROUTE_ROLES[reason]
        elif reason.startswith("output head"):
            roles[name] = "head"
        else:
            roles[name] = role_of_name(name) or "linear"
    return roles


def layer_index(name: str) -> int | None:
    """The block number in a parameter name (``layers.7.mlp.up_proj.weight`` -> 7), for plots across depth."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None
