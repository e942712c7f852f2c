"""Weights stored as (fan_in, fan_out) — Hugging Face's Conv1D — get the lr factor of the matrix they act as.

Muon's orthogonalized update does not care about the orientation (the polar factor of a transpose is the
transpose), but the shape rule sqrt(max(1, out/in)) does: read off GPT-2's stored (768, 3072) ``c_fc`` it
gives 1 instead of 2. The reference here is the same block built from ``nn.Linear``: every lr factor, and the
whole first update (transposed), must match it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from muonprof import ProfiledMuon
from muonprof.optim.routing import IN_OUT, fan_layouts


class Conv1D(nn.Module):
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` as it is: y = x W + b with W stored (nx, nf)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class DeclaredInOut(nn.Module):
    """A third-party layer that declares its layout instead of being recognized by name."""

    muonprof_weight_layout = "in_out"

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight


D = 16


class Block(nn.Module):
    """GPT-2's attention and MLP projections (c_attn 1:3, c_proj 1:1, c_fc 1:4, mlp c_proj 4:1)."""

    def __init__(self, linear: bool) -> None:
        super().__init__()

        def make(n_in: int, n_out: int) -> nn.Module:
            return nn.Linear(n_in, n_out) if linear else Conv1D(n_out, n_in)

        self.attn = nn.ModuleDict({"c_attn": make(D, 3 * D), "c_proj": make(D, D)})
        self.mlp = nn.ModuleDict({"c_fc": make(D, 4 * D), "c_proj": make(4 * D, D)})

    def forward(self, x: Tensor) -> Tensor:
        q, _, _ = self.attn["c_attn"](x).split(D, dim=-1)
        x = x + self.attn["c_proj"](q)
        return x + self.mlp["c_proj"](torch.relu(self.mlp["c_fc"](x)))


class TinyGPT(nn.Module):
    def __init__(self, linear: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, D)
        self.h = nn.ModuleList([Block(linear), Block(linear)])
        self.lm_head = nn.Linear(D, 50, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(x)


def _pair() -> tuple[TinyGPT, TinyGPT]:
    """The same weights as Conv1D (stored in x out) and as nn.Linear (out x in)."""
    torch.manual_seed(0)
    conv, lin = TinyGPT(linear=False), TinyGPT(linear=True)
    lin_params = dict(lin.named_parameters())
    with torch.no_grad():
        for name, p in conv.named_parameters():
            lin_params[name].copy_(p.T if name in fan_layouts(conv) else p)
    return conv, lin


EXPECTED_FACTORS = {
    "attn.c_attn.weight": math.sqrt(3),
    "attn.c_proj.weight": 1.0,
    "mlp.c_fc.weight": 2.0,
    "mlp.c_proj.weight": 1.0,
}


def test_conv1d_weights_are_recognized_as_in_out() -> None:
    conv, lin = _pair()
    layouts = fan_layouts(conv)
    assert set(layouts) == {f"h.{i}.{k}" for i in range(2) for k in EXPECTED_FACTORS}
    assert set(layouts.values()) == {IN_OUT}
    assert fan_layouts(lin) == {}


@pytest.mark.parametrize("rule", ["original", "spectral", "match_rms_adamw"])
def test_conv1d_lr_factors_equal_the_linear_models(rule: str) -> None:
    conv, lin = _pair()
    profile = {"format": "muonprof.profile/1", "defaults": {"lr_rule": rule}}
    conv_rows = {r["name"]: r for r in ProfiledMuon(conv, profile).describe()}
    lin_rows = {r["name"]: r for r in ProfiledMuon(lin, profile).describe()}
    for name, row in conv_rows.items():
        assert row["optimizer"] == lin_rows[name]["optimizer"], name
        if row["optimizer"] == "muon":
            assert row["lr_factor"] == pytest.approx(lin_rows[name]["lr_factor"]), name
    if rule == "original":
        for i in range(2):
            for key, factor in EXPECTED_FACTORS.items():
                row = conv_rows[f"h.{i}.{key}"]
                assert row["lr_factor"] == pytest.approx(factor) and row["layout"] == IN_OUT


def test_conv1d_update_is_the_linear_update_transposed() -> None:
    conv, lin = _pair()
    idx = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    opts = []
    for model in (conv, lin):
        opt = ProfiledMuon(model, {"format": "muonprof.profile/1", "defaults": {"dtype": "float32"}})
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        opt.step()
        opts.append(opt)
    layouts = fan_layouts(conv)
    lin_params = dict(lin.named_parameters())
    for name, p in conv.named_parameters():
        expected = lin_params[name].T if name in layouts else lin_params[name]
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_a_module_can_declare_its_layout() -> None:
    model = nn.Sequential(nn.Linear(8, 8), DeclaredInOut(8, 32), nn.Linear(32, 4))
    assert fan_layouts(model) == {"1.weight": IN_OUT}
    rows = {r["name"]: r for r in ProfiledMuon(model).describe()}
    assert rows["1.weight"]["lr_factor"] == pytest.approx(2.0)  # (8 -> 32): sqrt(32 / 8)


def test_hf_gpt2_lr_factors_follow_the_matrix_the_layer_applies() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    rows = {r["name"]: r for r in ProfiledMuon(model).describe()}
    assert rows["transformer.h.0.mlp.c_fc.weight"]["lr_factor"] == pytest.approx(2.0)
    assert rows["transformer.h.0.mlp.c_proj.weight"]["lr_factor"] == pytest.approx(1.0)
    assert rows["transformer.h.0.attn.c_attn.weight"]["lr_factor"] == pytest.approx(math.sqrt(3))


# ---------------------------------------------------------------- 1-wide "matrices" (tokens, latents)


class TimmLikeViT(nn.Module):
    """The token parameters timm's ViTs and DeiT carry, under timm's own names (none matches a position regex)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, D, 4, 4)
        self.reg_token = nn.Parameter(torch.zeros(1, 4, D))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D))
        self.attn_pool = nn.Module()
        self.attn_pool.latent = nn.Parameter(torch.zeros(1, 8, D))  # type: ignore[attr-defined]
        self.blocks = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.value_head = nn.Linear(D, 1)  # a scalar output: a (1, D) matrix
        self.head = nn.Linear(D, 10)


def test_one_wide_parameters_go_to_adamw_as_tokens() -> None:
    rows = {r["name"]: r for r in ProfiledMuon(TimmLikeViT()).describe()}
    for name in ("reg_token", "dist_token", "attn_pool.latent", "value_head.weight"):
        assert rows[name]["optimizer"] == "adamw", name
        assert rows[name]["reason"].startswith("token / 1-wide"), name
    assert rows["blocks.0.weight"]["optimizer"] == "muon" and rows["blocks.2.weight"]["optimizer"] == "muon"


def test_one_wide_named_parameters_go_to_adamw_too() -> None:
    named = [
        ("tok", nn.Parameter(torch.zeros(1, 3, 8))),
        ("w", nn.Parameter(torch.zeros(8, 8))),
        ("col", nn.Parameter(torch.zeros(8, 1))),
    ]
    rows = {r["name"]: r["optimizer"] for r in ProfiledMuon(named).describe()}
    assert rows == {"tok": "adamw", "w": "muon", "col": "adamw"}
