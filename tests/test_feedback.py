"""Error feedback for the low-rank family and Dion2-style subset orthogonalization: the math and ProfiledMuon."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from muonprof import ProfiledMuon
from muonprof.optim.momentum_rules import ema_momentum, tail_decay, tail_momentum
from muonprof.optim.state_memory import plans_state_bytes
from muonprof.ortho import OrthoConfig, applied_update, orthogonalize, svd_polar
from muonprof.ortho.feedback import subset_size
from muonprof.profile import ProfileError
from muonprof.train import optimizer_state_bytes

MU = 0.95


def model() -> nn.Module:
    """Tall, wide and square hidden matrices (the first and last layers are routed to AdamW)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 20, bias=False),
        nn.Tanh(),
        nn.Linear(20, 36, bias=False),
        nn.Tanh(),
        nn.Linear(36, 16, bias=False),
        nn.Tanh(),
        nn.Linear(16, 16, bias=False),
        nn.Tanh(),
        nn.Linear(16, 6, bias=False),
    )


HIDDEN = ("0.weight", "2.weight", "4.weight", "6.weight", "8.weight")


def optimizer(net: nn.Module, prof: dict[str, Any], **kwargs: Any) -> ProfiledMuon:
    """Every matrix to Muon (no AdamW: its sign-like first steps turn rounding into 2 x lr jumps)."""
    return ProfiledMuon(net.named_parameters(), prof, **kwargs)


def train(net: nn.Module, opt: ProfiledMuon, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 12, generator=g), torch.randn(32, 6, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def profile(layer: dict[str, Any], net: nn.Module, full_rank: bool = False) -> dict[str, Any]:
    layers = {}
    for name, p in net.named_parameters():
        if name in HIDDEN:
            entry = dict(layer)
            if full_rank:
                entry["rank"] = min(p.shape)
            layers[name] = entry
    return {"format": "muonprof.profile/1", "layers": layers}


FP32_NS = {"method": "newton_schulz", "dtype": "float32"}
SVD = {"method": "svd"}
# variant -> (its layer settings, whether the rank is the full min(m, n), the default recipe it must equal)
FULL = {
    "lowrank-ef": ({"method": "lowrank", "dtype": "float32", "error_feedback": True}, True, FP32_NS),
    "lowrank-svd-core-ef": (
        {"method": "lowrank", "dtype": "float32", "core": "svd", "error_feedback": True},
        True,
        SVD,
    ),
    "rsvd-ef": ({"method": "rsvd", "dtype": "float32", "error_feedback": True}, True, SVD),
    "subset-f1": ({"method": "subset", "fraction": 1.0, "dtype": "float32"}, False, FP32_NS),
    "subset-f1-svd-core": ({"method": "subset", "fraction": 1.0, "core": "svd", "dtype": "float32"}, False, SVD),
}


# ---------------------------------------------------------------- the orthogonalizers


@pytest.mark.parametrize("shape", [(10, 24), (24, 10), (12, 12)])
def test_subset_at_fraction_one_is_newton_schulz_and_selects_the_largest_rows(shape: tuple[int, int]) -> None:
    torch.manual_seed(1)
    G = torch.randn(*shape)
    full = orthogonalize(G, OrthoConfig(method="subset", fraction=1.0, dtype="float32"))
    torch.testing.assert_close(full, orthogonalize(G, OrthoConfig(dtype="float32")), rtol=0, atol=2e-6)
    # fraction 1/4 with an SVD core: exactly the polar factor of the top-norm long-side rows, zero elsewhere.
    cfg = OrthoConfig(method="subset", fraction=0.25, core="svd", dtype="float32")
    O = orthogonalize(G, cfg)
    tall = G if shape[0] >= shape[1] else G.T
    Ot = O if shape[0] >= shape[1] else O.T
    k = subset_size(shape, 0.25)
    assert k == math.ceil(0.25 * max(shape))
    top = torch.topk(tall.norm(dim=1), k).indices
    expected = torch.zeros_like(tall)
    expected[top] = svd_polar(tall[top])
    torch.testing.assert_close(Ot, expected, rtol=0, atol=1e-5)
    O2, A = applied_update(G, 2 * G, cfg)
    assert torch.equal(O2, O)
    rows = torch.zeros(tall.shape[0], dtype=torch.bool)
    rows[top] = True
    At = A if shape[0] >= shape[1] else A.T
    assert torch.equal(At[rows], 2 * tall[rows]) and not At[~rows].any()


def test_subset_batched_equals_one_at_a_time() -> None:
    torch.manual_seed(2)
    G = torch.randn(3, 20, 9)
    cfg = OrthoConfig(method="subset", fraction=0.5, dtype="float32")
    batched = orthogonalize(G, cfg)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalize(G[i], cfg), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lowrank", "rsvd"])
def test_error_feedback_applied_part_is_the_projection_on_the_update_basis(method: str) -> None:
    torch.manual_seed(3)
    G = torch.randn(30, 14)  # tall: the basis lives on the short (column) side
    cfg = OrthoConfig(method=method, rank=4, dtype="float32", core="svd", error_feedback=True)
    gen = torch.Generator()
    O, A = applied_update(G, G, cfg, generator=gen.manual_seed(0))
    assert torch.equal(O, orthogonalize(G, cfg.replace(error_feedback=False), generator=gen.manual_seed(0)))
    # O = P_left-polar of the rank-4 part; A = G V V^T with V O's row space (tall G: basis on the right).
    Vh = torch.linalg.svd(O).Vh
    V = Vh[:4].T
    torch.testing.assert_close(A, G @ V @ V.T, rtol=0, atol=1e-5)
    assert torch.linalg.matrix_rank(A).item() == 4
    # The residual G - A is orthogonal to what was applied.
    assert abs(float(((G - A) * O).sum())) < 1e-4


def test_config_refuses_inapplicable_combinations() -> None:
    with pytest.raises(ValueError, match="error_feedback: applies to the low-rank methods"):
        OrthoConfig(error_feedback=True)
    with pytest.raises(ValueError, match="subset keeps its unselected rows"):
        OrthoConfig(method="subset", fraction=0.5, error_feedback=True)
    with pytest.raises(ValueError, match=r"fraction: must be a number in \(0, 1\]"):
        OrthoConfig(method="subset", fraction=1.5)
    with pytest.raises(ValueError, match="fraction: must be a number"):
        OrthoConfig(method="subset", fraction=0.0)
    with pytest.raises(ValueError, match="needs a fraction"):
        OrthoConfig(method="subset")
    with pytest.raises(ValueError, match="applies to method 'subset' only"):
        OrthoConfig(method="lowrank", rank=4, fraction=0.5)
    assert OrthoConfig(method="subset", fraction=1) == OrthoConfig(method="subset", fraction=1.0)
    assert OrthoConfig(method="lowrank", rank=8, error_feedback=True).label().endswith("-ef")


# ---------------------------------------------------------------- the momentum rule


def test_tail_rule_with_everything_applied_is_torch_ema() -> None:
    torch.manual_seed(4)
    B, E = torch.zeros(6, 5), torch.zeros(6, 5)
    for _ in range(6):
        g = torch.randn(6, 5)
        U_ref = ema_momentum(B, g, MU, True)
        X, U = tail_momentum(E, g, MU, True)
        torch.testing.assert_close(X, B, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(U, U_ref, rtol=1e-6, atol=1e-7)
        E.copy_(tail_decay(X, X.clone(), MU))
    torch.testing.assert_close(E, MU * B, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- ProfiledMuon


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("variant", sorted(FULL))
def test_full_rank_feedback_and_subset_one_equal_the_default_muon_step(
    variant: str, batch: bool, nesterov: bool
) -> None:
    """ProfiledMuon's default step (EMA lerp momentum, Nesterov or not) with the same core orthogonalizer
    in float32: equal to float rounding over several steps, weight decay included. The SVD variants get a
    little more room: the fp32 polar factor of a row-permuted (or projected) square matrix moves ~1e-5."""
    layer, full_rank, recipe = FULL[variant]
    net = model()
    ref = copy.deepcopy(net)
    opt = optimizer(net, profile(layer, net, full_rank=full_rank), nesterov=nesterov, batch=batch, weight_decay=0.1)
    ref_opt = optimizer(ref, profile(recipe, ref), nesterov=nesterov, batch=batch, weight_decay=0.1)
    train(net, opt, range(6))
    train(ref, ref_opt, range(6))
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=3e-6 if recipe is FP32_NS else 1e-5, msg=name)
        # The stored buffer E is mu x torch's B when everything is applied.
        E, B = opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]
        torch.testing.assert_close(E, MU * B, rtol=1e-4, atol=1e-7, msg=name)


def test_rank_r_feedback_keeps_the_unapplied_residual_undecayed() -> None:
    net = model()
    layer = {"method": "lowrank", "rank": 2, "dtype": "float32", "core": "svd", "error_feedback": True}
    opt = optimizer(net, profile(layer, net), nesterov=False)
    p = dict(net.named_parameters())["4.weight"]  # 16 x 36
    train(net, opt, range(3))
    E0 = opt.state[p]["momentum_buffer"].clone()
    before = p.detach().clone()
    train(net, opt, range(3, 4))
    g = p.grad
    X = E0 + (1 - MU) * g
    O = (before - p.detach()) / (0.02 * math.sqrt(max(1, 16 / 36)))  # no weight decay: the update itself
    U, _, _ = torch.linalg.svd(O)
    Q = U[:, :2]  # the rank-2 update's column space: the basis error feedback projects on
    expected = X - (1 - MU) * Q @ Q.T @ X
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected, rtol=0, atol=1e-5)
    # Without feedback the whole buffer decays: the two rules really differ at rank 2.
    plain = optimizer(copy.deepcopy(net), profile({**layer, "error_feedback": False}, net), nesterov=False)
    assert plain.plans["4.weight"].momentum_label == "ema"
    assert opt.plans["4.weight"].momentum_label == "ema, error feedback"


@pytest.mark.parametrize("layer", [FULL["lowrank-ef"][0] | {"rank": 3}, {"method": "subset", "fraction": 0.25}])
def test_state_dict_round_trip_memory_and_describe(layer: dict[str, Any]) -> None:
    net = model()
    opt = ProfiledMuon(net, profile(layer, net))
    train(net, opt, range(3))
    assert optimizer_state_bytes(opt) == plans_state_bytes(opt.plans.values())["total"]
    saved_state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(net)
    twin_opt = ProfiledMuon(twin, profile(layer, twin))
    twin_opt.load_state_dict(saved_state)
    train(net, opt, range(3, 5))
    train(twin, twin_opt, range(3, 5))
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    rows = {r["name"]: r for r in opt.describe()}
    label = OrthoConfig.from_dict({"dtype": "bfloat16", **layer}).label()
    assert rows["4.weight"]["ortho"] == label
    assert rows["4.weight"]["momentum"] in ("ema, error feedback", "ema, subset decay")


@pytest.mark.parametrize("layer", [FULL["lowrank-ef"][0] | {"rank": 3}, {"method": "subset", "fraction": 0.5}])
def test_nonfinite_gradient_keeps_the_feedback_buffer(layer: dict[str, Any]) -> None:
    net = model()
    opt = ProfiledMuon(net, profile(layer, net), batch=True)
    train(net, opt, range(2))
    bad = dict(net.named_parameters())["4.weight"]
    saved_w, saved_m = bad.detach().clone(), opt.state[bad]["momentum_buffer"].clone()
    other = dict(net.named_parameters())["2.weight"].detach().clone()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(32, 12, generator=g), torch.randn(32, 6, generator=g)
    opt.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    bad.grad[0, 0] = float("nan")
    opt.step()
    assert torch.equal(bad, saved_w) and torch.equal(opt.state[bad]["momentum_buffer"], saved_m)
    assert not torch.equal(dict(net.named_parameters())["2.weight"], other)
    assert opt.nonfinite_counts() == {"4.weight": 1}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"error_feedback": True}, "error_feedback: applies to the low-rank methods"),
        ({"method": "subset", "fraction": 1.5}, "less than or equal to 1"),
        ({"method": "subset"}, "needs a fraction"),
        ({"method": "lowrank", "rank": 4, "error_feedback": "yes"}, "valid boolean"),
        ({"method": "lowrank", "rank": 4, "error_feedback": True, "momentum": "storm"}, "momentum 'storm'"),
        ({"momentum_rank": 4, "error_feedback": True}, "error_feedback"),
    ],
)
def test_profile_refuses_bad_keys_naming_the_layer(entry: dict[str, Any], message: str) -> None:
    net = model()
    with pytest.raises(ProfileError, match=message) as info:
        ProfiledMuon(net, {"format": "muonprof.profile/1", "layers": {"4.weight": entry}})
    assert "4.weight" in str(info.value)


def test_tune_writer_round_trips_the_new_keys() -> None:
    """A tuned profile spells the candidate so that the optimizer resolves the same config."""
    from muonprof.tune.writer import settings_of

    for cfg in (
        OrthoConfig(method="lowrank", rank=4, power_iters=1, error_feedback=True),
        OrthoConfig(method="rsvd", rank=4, dtype="float32", error_feedback=True),
        OrthoConfig(method="subset", fraction=0.25, core="svd", dtype="float32"),
    ):
        net = model()
        opt = ProfiledMuon(net, {"format": "muonprof.profile/1", "layers": {"4.weight": settings_of(cfg)}})
        assert opt.plans["4.weight"].ortho == cfg
