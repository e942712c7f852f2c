"""GPT-2 (Radford et al. 2019), laid out with the parameter names every muonprof role rule understands.

Separate q/k/v/o projections (GPT-2 fuses them in ``c_attn``; split they are the same function and each
matrix gets its own spectrum and Muon update), biases everywhere, learned positions, tied output head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .task import ModelSpecError, TaskInfo


@dataclass(frozen=True)
class GPT2Config:
    """Hugging Face ``GPT2Config`` field names; the MLP is always 4x wide as in the paper."""

    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_eps: float = 1e-5

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise ModelSpecError(f"n_embd (width) {self.n_embd} is not divisible by n_head (heads) {self.n_head}")


ALIASES = {"width": "n_embd", "depth": "n_layer", "heads": "n_head", "vocab": "vocab_size", "seq_len": "n_positions"}

CONFIGS: dict[str, tuple[GPT2Config, str]] = {
    "gpt2-tiny": (
        GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128),
        "GPT-2 layout, 2 layers x 64 wide, byte vocabulary: for tests and smoke runs",
    ),
    "gpt2-small": (GPT2Config(), "GPT-2 small (124M): 12 layers x 768, 12 heads, vocab 50257, 1024 positions"),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        d = cfg.n_embd
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.act = nn.GELU(approximate="tanh")
        self.down_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_embed = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied, as in GPT-2: one parameter, owned by the embedding
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02), residual output projections shrunk by 1/sqrt(2 n_layer) so the stream's
        variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module is not self.lm_head:
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.cfg.n_positions:
            raise ValueError(f"sequence length {t} exceeds n_positions {self.cfg.n_positions}")
        x = self.embed_tokens(idx) + self.pos_embed(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build(cfg: GPT2Config) -> GPT2:
    return GPT2(cfg)


def task_info(cfg: GPT2Config) -> TaskInfo:
    return TaskInfo(kind="lm", vocab_size=cfg.vocab_size, max_seq_len=cfg.n_positions)
