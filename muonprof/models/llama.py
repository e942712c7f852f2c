"""LLaMA (Touvron et al. 2023) at the sizes GaLore and the Muon papers pre-train on C4.

RMSNorm, SwiGLU MLP, rotary positions (computed each forward, so there is no position table to route),
no biases, untied output head. Hugging Face ``LlamaForCausalLM`` init: every matrix N(0, 0.02).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .task import ModelSpecError, TaskInfo


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int = 512
    intermediate: int = 1376
    heads: int = 8
    layers: int = 8
    vocab_size: int = 32000
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def validate(self) -> None:
        if self.hidden % self.heads:
            raise ModelSpecError(f"hidden (width) {self.hidden} is not divisible by heads {self.heads}")
        if (self.hidden // self.heads) % 2:
            raise ModelSpecError(f"head dim hidden/heads = {self.hidden // self.heads} must be even for rotary")


ALIASES = {"width": "hidden", "depth": "layers", "vocab": "vocab_size", "seq_len": "max_seq_len"}

_GALORE = "GaLore's LLaMA-{} for C4 pre-training: {} layers x {}, {} heads, SwiGLU {}, vocab 32000, 1024 tokens"
CONFIGS: dict[str, tuple[LlamaConfig, str]] = {
    "llama-tiny": (
        LlamaConfig(hidden=64, intermediate=172, heads=4, layers=2, vocab_size=256, max_seq_len=128),
        "LLaMA layout, 2 layers x 64 wide, byte vocabulary: for tests and smoke runs",
    ),
    **{
        f"llama-{size.lower()}": (
            LlamaConfig(hidden=hidden, intermediate=intermediate, heads=heads, layers=layers),
            _GALORE.format(size, layers, hidden, heads, intermediate),
        )
        for size, hidden, intermediate, heads, layers in (
            ("20M", 256, 688, 4, 4),
            ("60M", 512, 1376, 8, 8),
            ("130M", 768, 2048, 12, 12),
        )
    },
}


def rotary_tables(t: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin, each (t, head_dim), in the rotate-half layout of Hugging Face LLaMA."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(t, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x_i, x_{i + d/2}) pair of ``x`` (B, H, T, d) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d = cfg.hidden
        self.heads = cfg.heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, d = x.shape
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


class Llama(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab_size). Rotary positions extrapolate past ``max_seq_len``;
    that field only tells the data pipeline how long to make sequences."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed_tokens(idx)
        cos, sin = rotary_tables(idx.shape[1], self.cfg.hidden // self.cfg.heads, self.cfg.rope_theta, idx.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build(cfg: LlamaConfig) -> Llama:
    return Llama(cfg)


def task_info(cfg: LlamaConfig) -> TaskInfo:
    return TaskInfo(kind="lm", vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len)
