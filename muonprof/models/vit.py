"""Vision Transformer (Dosovitskiy et al. 2021) at DeiT-Tiny widths, on CIFAR-sized images.

The position table is an ``nn.Embedding`` over patch slots and the cls token a 1-D parameter, so
``optim.routing`` sends both to AdamW by structure (a bare 2-D ``nn.Parameter`` would look like a
hidden matrix); the patch embedding is the first conv, which routing also keeps off Muon.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .task import ModelSpecError, TaskInfo


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch: int = 4
    channels: int = 3
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp: int = 768
    classes: int = 10
    norm_eps: float = 1e-6

    def validate(self) -> None:
        if self.image_size % self.patch:
            raise ModelSpecError(f"image_size {self.image_size} is not divisible by patch {self.patch}")
        if self.dim % self.heads:
            raise ModelSpecError(f"dim (width) {self.dim} is not divisible by heads {self.heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


ALIASES = {"width": "dim", "num_classes": "classes"}

CONFIGS: dict[str, tuple[ViTConfig, str]] = {
    "vit-tiny": (
        ViTConfig(),
        "DeiT-Tiny widths on 32x32 images: patch 4, 12 layers x 192, 3 heads, MLP 768, 10 classes",
    ),
}


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp)
        self.act = nn.GELU()
        self.down_proj = nn.Linear(cfg.mlp, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Images (B, channels, image_size, image_size) -> logits (B, classes), read from the cls token."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(cfg.dim))
        self.pos_embed = nn.Embedding(cfg.num_patches + 1, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.classes)
        # timm's init: truncated N(0, 0.02) for matrices and positions, a near-zero cls token
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, patches, dim)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat((cls, x), dim=1)
        x = x + self.pos_embed(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build(cfg: ViTConfig) -> ViT:
    return ViT(cfg)


def task_info(cfg: ViTConfig) -> TaskInfo:
    return TaskInfo(kind="image", image_size=cfg.image_size, channels=cfg.channels, num_classes=cfg.classes)
