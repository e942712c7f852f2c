"""ProfiledMuon: parity with torch.optim.Muon, per-layer profiles, routing, resume, schedulers, bad input."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from muonprof import ProfiledMuon
from muonprof.optim import functional as pm_module
from muonprof.ortho import svd_polar
from muonprof.ortho.newton_schulz import newton_schulz
from muonprof.profile import ProfileError, fingerprint

LR, MOMENTUM, WD = 0.02, 0.95, 0.1


def distinct_linears() -> nn.Module:
    """Bias-free Linear layers of distinct shapes: tall, wide and square matrices."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 64, bias=False),
        nn.Tanh(),
        nn.Linear(64, 48, bias=False),
        nn.Tanh(),
        nn.Linear(48, 48, bias=False),
        nn.Tanh(),
        nn.Linear(48, 24, bias=False),
    )


class TinyLM(nn.Module):
    """Embedding, blocks of same-shape matrices with biases and norms, an untied head."""

    def __init__(self, vocab: int = 50, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(blocks)
        )
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return self.lm_head(x)


def lm_loss(model: nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (4, 12), generator=g)
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))


def regression_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 32, generator=g), torch.randn(16, 24, generator=g)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


# ---------------------------------------------------------------- parity with torch.optim.Muon


@pytest.mark.parametrize("nesterov", [True, False])
def test_default_path_equals_torch_muon_after_10_steps(nesterov: bool) -> None:
    ours, ref = distinct_linears(), distinct_linears()
    opt = ProfiledMuon(ours.named_parameters(), lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=WD)
    ref_opt = torch.optim.Muon(ref.parameters(), lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=WD)
    assert all(row["optimizer"] == "muon" for row in opt.describe())
    for step in range(10):
        regression_step(ours, opt, step)
        regression_step(ref, ref_opt, step)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        # Same kernels, same order: bit-identical, the strictest form of "to bf16 tolerance".
        assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item():.3e}"
        assert not torch.equal(a, distinct_linears().get_parameter(name)), "parameters did not move"


def test_batched_same_shape_layers_match_torch_within_bf16_rounding() -> None:
    torch.manual_seed(1)
    layers = nn.ModuleList(nn.Linear(40, 40, bias=False) for _ in range(4))
    ref = copy.deepcopy(layers)
    grads = [torch.randn(40, 40) for _ in layers]
    opt = ProfiledMuon(layers.named_parameters(), lr=LR, weight_decay=WD, batch=True)
    ref_opt = torch.optim.Muon(ref.parameters(), lr=LR, weight_decay=WD)
    for model in (layers, ref):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
    opt.step()
    ref_opt.step()
    for a, b in zip(layers.parameters(), ref.parameters()):
        # One bf16 rounding of an update entry of size ~lr * 0.3 is ~lr * 0.3 * 2^-8.
        torch.testing.assert_close(a, b, rtol=0, atol=LR * 0.3 * 2**-7)


def test_same_shape_and_config_layers_are_orthogonalized_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = pm_module.orthogonalize

    def counting(G: torch.Tensor, config, generator=None):  # type: ignore[no-untyped-def]
        calls.append(tuple(G.shape))
        return real(G, config, generator=generator)

    monkeypatch.setattr(pm_module, "orthogonalize", counting)
    model = TinyLM(blocks=3)
    opt = ProfiledMuon(model, batch=True)  # the accelerator default; CPU defaults to one call per matrix
    lm_loss(model, 0).backward()
    opt.step()
    assert sorted(calls) == [(3, 32, 64), (3, 64, 32)]
    calls.clear()
    cpu_default = ProfiledMuon(model)
    cpu_default.step()
    assert sorted(calls) == [(32, 64)] * 3 + [(64, 32)] * 3


# ---------------------------------------------------------------- routing


def test_module_routing_sends_embeddings_head_and_vectors_to_adamw() -> None:
    model = TinyLM()
    opt = ProfiledMuon(model)
    rows = {r["name"]: r for r in opt.describe()}
    assert rows["embed.weight"]["optimizer"] == "adamw"
    assert rows["lm_head.weight"]["optimizer"] == "adamw"
    assert "vocabulary" in rows["lm_head.weight"]["reason"]
    assert rows["blocks.0.1.weight"]["optimizer"] == "muon"
    assert rows["blocks.0.1.bias"]["optimizer"] == "adamw"
    assert rows["blocks.1.0.weight"]["optimizer"] == "adamw"  # LayerNorm gain
    muon_group = next(g for g in opt.param_groups if g["use_muon"])
    assert len(muon_group["params"]) == 4


def test_tied_head_is_one_adamw_parameter() -> None:
    model = TinyLM()
    model.lm_head.weight = model.embed.weight
    opt = ProfiledMuon(model)
    names = [r["name"] for r in opt.describe()]
    assert "lm_head.weight" not in names
    assert opt.plans["embed.weight"].optimizer == "adamw"


def test_named_parameters_route_by_dimension_only() -> None:
    model = TinyLM()
    opt = ProfiledMuon(model.named_parameters())
    assert opt.plans["embed.weight"].optimizer == "muon"
    assert opt.plans["lm_head.weight"].optimizer == "muon"
    assert opt.plans["blocks.0.1.bias"].optimizer == "adamw"


def test_conv_weights_are_flattened_and_scaled_by_the_flattened_matrix() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 64, 3), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 3, 12, 12))
    opt = ProfiledMuon(model, lr=LR)
    assert opt.plans["0.weight"].optimizer == "adamw"  # the input conv (stem)
    plan = opt.plans["2.weight"]
    assert plan.optimizer == "muon" and plan.matrix_shape == (64, 72)
    # Flattened (64, 72): sqrt(max(1, 64/72)) = 1. The reference Muon's kernel-dims rule would give sqrt(64/8).
    assert plan.lr_factor == 1.0
    w = model[2].weight
    before = w.detach().clone()
    g = torch.randn_like(w)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w.grad = g.clone()
    opt.step()
    expected_u = (1 - MOMENTUM) * g * (1 + MOMENTUM)  # Nesterov mix of the first step: lerp(g, (1-mu) g, mu)
    expected = before - LR * newton_schulz(expected_u.reshape(64, 72)).float().reshape_as(w)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- profiles


def test_profile_sets_method_rule_and_scale_per_layer() -> None:
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(30, 20, bias=False), nn.Linear(30, 20, bias=False)])
    profile = {
        "format": "muonprof.profile/1",
        "layers": {"0.weight": {"method": "svd", "lr_rule": "spectral", "lr_scale": 0.5}},
    }
    opt = ProfiledMuon(layers.named_parameters(), profile, lr=LR)
    w0, w1 = (layer.weight.detach().clone() for layer in layers)
    grads = [torch.randn(20, 30), torch.randn(20, 30)]
    for layer, g in zip(layers, grads):
        layer.weight.grad = g.clone()
    opt.step()
    u0 = (1 - MOMENTUM) * grads[0] * (1 + MOMENTUM)
    expected0 = w0 - LR * math.sqrt(20 / 30) * 0.5 * svd_polar(u0)
    torch.testing.assert_close(layers[0].weight.detach(), expected0, rtol=0, atol=1e-6)
    u1 = (1 - MOMENTUM) * grads[1] * (1 + MOMENTUM)
    expected1 = w1 - LR * 1.0 * newton_schulz(u1).float()
    torch.testing.assert_close(layers[1].weight.detach(), expected1, rtol=0, atol=1e-6)


def test_profile_can_move_a_layer_to_adamw_and_use_presets() -> None:
    model = TinyLM(width=32)
    profile = {
        "format": "muonprof.profile/1",
        "defaults": {"dtype": "float32"},
        "layers": {
            "blocks.0.1.weight": {"optimizer": "adamw"},
            "blocks.1.1.weight": {"preset": "lowrank_he2025", "rank": 8, "full_below": 0},
        },
    }
    opt = ProfiledMuon(model, profile)
    assert opt.plans["blocks.0.1.weight"].optimizer == "adamw"
    lowrank = opt.plans["blocks.1.1.weight"].ortho
    assert lowrank is not None and lowrank.method == "lowrank" and lowrank.range_finder == "columns"
    assert lowrank.rank == 8 and lowrank.dtype == "bfloat16"  # the preset's own dtype wins over defaults
    assert opt.plans["blocks.0.3.weight"].ortho.dtype == "float32"  # type: ignore[union-attr]
    lm_loss(model, 0).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_profile_for_another_model_is_refused_with_the_layers_named() -> None:
    model = TinyLM()
    other = {
        "format": "muonprof.profile/1",
        "layers": {"transformer.h.0.attn.c_attn.weight": {"ns_steps": 3}},
    }
    with pytest.raises(ProfileError, match=r"transformer\.h\.0\.attn\.c_attn\.weight"):
        ProfiledMuon(model, other)
    with pytest.warns(UserWarning, match=r"transformer\.h\.0\.attn\.c_attn\.weight"):
        opt = ProfiledMuon(model, other, strict=False)
    assert opt.plans["blocks.0.1.weight"].ortho.ns_steps == 5  # type: ignore[union-attr]


def test_fingerprint_mismatch_names_reshaped_layers() -> None:
    model = TinyLM(width=32)
    bigger = TinyLM(width=48)
    shapes = [(n, p.shape) for n, p in bigger.named_parameters()]
    profile = {
        "format": "muonprof.profile/1",
        "model": {"name": "tinylm-48", "fingerprint": fingerprint(shapes)},
        "layers": {"blocks.0.1.weight": {"shape": [96, 48], "ns_steps": 4}},
    }
    with pytest.raises(ProfileError, match=r"tinylm-48.*blocks\.0\.1\.weight"):
        ProfiledMuon(model, profile)
    ProfiledMuon(bigger, profile)  # the model it was made for


def test_rank_larger_than_layer_is_an_error_naming_the_layer() -> None:
    model = TinyLM(width=32)
    profile = {
        "format": "muonprof.profile/1",
        "layers": {"blocks.0.1.weight": {"method": "lowrank", "rank": 40}},
    }
    with pytest.raises(ProfileError, match=r"blocks\.0\.1\.weight.*rank: 40 exceeds min\(m, n\) = 32"):
        ProfiledMuon(model, profile)


# ---------------------------------------------------------------- resume, schedulers, grads


def _train(model: nn.Module, opt: ProfiledMuon, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        lm_loss(model, step).backward()
        opt.step()


def test_state_dict_resume_takes_the_same_next_steps() -> None:
    profile = {
        "format": "muonprof.profile/1",
        "layers": {"blocks.0.1.weight": {"method": "lowrank", "rank": 8, "dtype": "float32"}},
    }
    torch.manual_seed(0)
    model = TinyLM()
    opt = ProfiledMuon(model, profile, weight_decay=0.01, adamw_weight_decay=0.01)
    _train(model, opt, range(3))
    snapshot_model = copy.deepcopy(model.state_dict())
    snapshot_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, range(3, 6))

    resumed = TinyLM()
    resumed.load_state_dict(snapshot_model)
    resumed_opt = ProfiledMuon(resumed, profile, weight_decay=0.01, adamw_weight_decay=0.01)
    resumed_opt.load_state_dict(snapshot_opt)
    _train(resumed, resumed_opt, range(3, 6))
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_lr_scheduler_scales_both_groups() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    opt = ProfiledMuon(model, lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.02, 1e-3]
    _train(model, opt, range(1))
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.01, 5e-4])

    # Halving the lr halves the Muon step for the same momentum input.
    layer = nn.Linear(16, 16, bias=False)
    deltas = []
    for lr in (0.02, 0.01):
        trial = copy.deepcopy(layer)
        trial_opt = ProfiledMuon(trial.named_parameters(), lr=lr)
        before = trial.weight.detach().clone()
        trial.weight.grad = torch.ones(16, 16).tril()
        trial_opt.step()
        deltas.append((trial.weight.detach() - before).norm())
    assert deltas[1] / deltas[0] == pytest.approx(0.5, rel=1e-5)


def test_adamw_group_matches_torch_adamw() -> None:
    torch.manual_seed(0)
    vec = nn.Parameter(torch.randn(20))
    ref = nn.Parameter(vec.detach().clone())
    opt = ProfiledMuon([("v", vec)], adamw_lr=1e-2, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, adamw_weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        g = torch.randn(20, generator=torch.Generator().manual_seed(step))
        vec.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(vec, ref, rtol=1e-6, atol=1e-7)


def test_parameters_without_grad_are_left_alone() -> None:
    model = TinyLM()
    opt = ProfiledMuon(model)
    frozen = model.blocks[1][1].weight
    before = frozen.detach().clone()
    lm_loss(model, 0).backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("batch", [False, True])
def test_nonfinite_gradient_skips_only_that_layer(batch: bool) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    clean = copy.deepcopy(model)
    opt, clean_opt = ProfiledMuon(model, batch=batch, weight_decay=0.1), ProfiledMuon(clean, batch=batch)
    _train(model, opt, range(2))
    _train(clean, clean_opt, range(2))
    bad_matrix, bad_vector = model.blocks[0][1].weight, model.blocks[0][1].bias
    saved = {
        "w": bad_matrix.detach().clone(),
        "m": opt.state[bad_matrix]["momentum_buffer"].clone(),
        "b": bad_vector.detach().clone(),
        "ea": opt.state[bad_vector]["exp_avg"].clone(),
        "step": opt.state[bad_vector]["step"].clone(),
    }
    opt.zero_grad()
    lm_loss(model, 2).backward()
    bad_matrix.grad[0, 0] = float("nan")
    bad_vector.grad[3] = float("inf")
    opt.step()
    assert torch.equal(bad_matrix, saved["w"]) and torch.equal(opt.state[bad_matrix]["momentum_buffer"], saved["m"])
    assert torch.equal(bad_vector, saved["b"]) and torch.equal(opt.state[bad_vector]["exp_avg"], saved["ea"])
    assert torch.equal(opt.state[bad_vector]["step"], saved["step"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = model.blocks[1][1].weight
    assert not torch.equal(moved, clean.blocks[1][1].weight)  # other layers took their step
    assert opt.nonfinite_counts() == {"blocks.0.1.weight": 1, "blocks.0.1.bias": 1}


def test_skip_nonfinite_false_lets_nan_through_as_documented() -> None:
    layer = nn.Linear(8, 8, bias=False)
    opt = ProfiledMuon(layer.named_parameters(), skip_nonfinite=False)
    layer.weight.grad = torch.full((8, 8), float("nan"))
    opt.step()
    assert torch.isnan(layer.weight).all()


def test_bf16_parameters_without_nesterov_keep_their_momentum() -> None:
    """torch 2.13's Muon normalizes a bf16 momentum buffer in place when nesterov=False; we must not."""
    layer = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    opt = ProfiledMuon(layer.named_parameters(), nesterov=False)
    g = torch.randn(8, 16).to(torch.bfloat16)
    layer.weight.grad = g.clone()
    opt.step()
    expected = torch.zeros_like(g).lerp_(g, 1 - MOMENTUM)
    assert torch.equal(opt.state[layer.weight]["momentum_buffer"], expected)


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"adamw_betas": (0.9, 1.5)}, "adamw_betas"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProfiledMuon(TinyLM(), **kwargs)


def test_bad_parameter_sources_are_refused() -> None:
    with pytest.raises(TypeError, match="named_parameters"):
        ProfiledMuon(list(TinyLM().parameters()))  # type: ignore[arg-type]
    frozen = TinyLM().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ProfiledMuon(frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProfiledMuon(TinyLM())  # a clean construction warns about nothing
