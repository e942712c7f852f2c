"""LiMuon in ProfiledMuon: STORM momentum (two gradients per step) and low-rank momentum factors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from muonprof import ProfiledMuon
from muonprof.models import load_model
from muonprof.optim.lowrank_momentum import expand
from muonprof.optim.state_memory import momentum_numel, plans_state_bytes
from muonprof.ortho import OrthoConfig, orthogonalize, svd_polar
from muonprof.profile import ProfileError
from muonprof.train import optimizer_state_bytes

LR, MU = 0.05, 0.95


def prof(layers: dict) -> dict:
    return {"format": "muonprof.profile/1", "layers": layers}


def data(step: int, m: int = 12, n: int = 10) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, n, generator=g), torch.randn(32, m, generator=g)


def loss_at(W: Tensor, step: int) -> Tensor:
    x, y = data(step, *W.shape)
    return ((torch.tanh(x @ W.T) - y) ** 2).mean()


def grad_at(W: Tensor, step: int) -> Tensor:
    W = W.detach().clone().requires_grad_(True)
    loss_at(W, step).backward()
    assert W.grad is not None
    return W.grad


def storm_run(W0: Tensor, steps: int, layer: dict, weight_decay: float = 0.0) -> tuple[Tensor, int]:
    W = nn.Parameter(W0.clone())
    opt = ProfiledMuon([("w", W)], prof({"w": layer}), lr=LR, momentum=MU, weight_decay=weight_decay)
    calls = 0
    for step in range(steps):

        def closure(step: int = step) -> Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = loss_at(W, step)
            loss.backward()
            return loss

        opt.step(closure)
    return W.detach(), calls


@pytest.mark.parametrize(("m", "n"), [(12, 10), (10, 12)])
def test_storm_matches_the_direct_recursion(m: int, n: int) -> None:
    """M_0 = g(x_0; xi_0); M_t = g(x_t; xi_t) + mu (M_{t-1} - g(x_{t-1}; xi_t)); x_{t+1} = x_t - lr f O(M_t)."""
    W0 = torch.randn(m, n, generator=torch.Generator().manual_seed(7)) * 0.3
    factor = math.sqrt(max(1.0, m / n))
    steps = 4
    got, calls = storm_run(W0, steps, {"momentum": "storm", "method": "svd"})
    assert calls == 2 * steps - 1  # the first step has no previous iterate

    x_prev, x, M = None, W0.clone(), None
    for step in range(steps):
        g = grad_at(x, step)
        M = g if M is None else g + MU * (M - grad_at(x_prev, step))
        x_prev, x = x, x - LR * factor * svd_polar(M)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-6)


def test_storm_with_newton_schulz_follows_the_same_recursion() -> None:
    W0 = torch.randn(12, 10, generator=torch.Generator().manual_seed(3)) * 0.3
    got, _ = storm_run(W0, 3, {"momentum": "storm", "dtype": "float32"})
    x_prev, x, M = None, W0.clone(), None
    for step in range(3):
        g = grad_at(x, step)
        M = g if M is None else g + MU * (M - grad_at(x_prev, step))
        x_prev, x = x, x - LR * math.sqrt(12 / 10) * orthogonalize(M, OrthoConfig(dtype="float32"))
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_low_rank_storm_rebuilds_the_previous_iterate_from_its_factors(weight_decay: float) -> None:
    """At full rank the factors hold M exactly and U V^T = polar(M), so low-rank storm must follow the
    full-rank storm recursion although it keeps no copy of the previous parameters."""
    W0 = torch.randn(12, 10, generator=torch.Generator().manual_seed(5)) * 0.3
    full, _ = storm_run(W0, 5, {"momentum": "storm", "method": "svd"}, weight_decay)
    light, calls = storm_run(W0, 5, {"momentum": "storm", "momentum_rank": 10}, weight_decay)
    assert calls == 9
    torch.testing.assert_close(light, full, rtol=0, atol=2e-5)


def test_storm_replays_the_rng_so_dropout_masks_match() -> None:
    W = nn.Parameter(torch.randn(8, 6))
    opt = ProfiledMuon([("w", W)], prof({"w": {"momentum": "storm"}}))
    draws: list[Tensor] = []

    def closure() -> Tensor:
        opt.zero_grad()
        mask = torch.rand(8, 6)
        draws.append(mask)
        loss = (W * mask).square().sum()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    assert len(draws) == 5
    assert torch.equal(draws[1], draws[2]) and torch.equal(draws[3], draws[4])
    assert not torch.equal(draws[2], draws[3])


def test_only_storm_layers_keep_previous_parameters_and_gradients_end_at_x_t() -> None:
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.Linear(8, 3))
    opt = ProfiledMuon(model, prof({"0.weight": {"momentum": "storm"}}))
    x, y = torch.randn(5, 6), torch.randn(5, 3)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)
    assert "prev_param" in opt.state[model[0].weight]
    assert "prev_param" not in opt.state[model[2].weight]
    w = nn.Parameter(torch.randn(8, 6))
    light = ProfiledMuon([("w", w)], prof({"w": {"momentum": "storm", "momentum_rank": 2}}))

    def fill() -> None:
        w.grad = torch.randn(8, 6)

    for _ in range(3):
        light.step(fill)
    assert set(light.state[w]) == {"step", "momentum_U", "momentum_S", "momentum_V", "storm_undo"}
    # .grad is the gradient at the current iterate (before this step's update), as after any step(closure).
    before = copy.deepcopy(model)
    opt.step(closure)
    expected = torch.autograd.grad(nn.functional.mse_loss(before(x), y), before[2].weight)[0]
    assert model[2].weight.grad is not None
    torch.testing.assert_close(model[2].weight.grad, expected)


def test_storm_without_a_closure_is_a_clear_error() -> None:
    W = nn.Parameter(torch.randn(8, 6))
    opt = ProfiledMuon([("w", W)], prof({"w": {"momentum": "storm"}}))
    assert opt.needs_closure
    W.grad = torch.randn(8, 6)
    with pytest.raises(RuntimeError, match=r"needs two gradients per step: call optimizer.step\(closure\)"):
        opt.step()
    assert not ProfiledMuon([("w", nn.Parameter(torch.randn(8, 6)))]).needs_closure


def rank_r(m: int, n: int, spectrum: list[float], seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g)).Q
    return (U * torch.tensor(spectrum)) @ V.T


@pytest.mark.parametrize(("m", "n"), [(40, 24), (24, 40), (32, 32)])
def test_low_rank_momentum_is_exact_for_gradients_within_its_rank(m: int, n: int) -> None:
    """Loss <W, A> makes every gradient A; with rank(A) <= r the factors hold the EMA exactly, and the
    update is U V^T of A: W_t = W_0 - t lr f polar(A)."""
    A = rank_r(m, n, [3.0, 1.0, 0.2, 1e-3])
    W = nn.Parameter(torch.zeros(m, n))
    opt = ProfiledMuon([("w", W)], prof({"w": {"momentum_rank": 6}}), lr=LR)
    for _ in range(3):
        opt.zero_grad()
        (W * A).sum().backward()
        opt.step()
    st = opt.state[W]
    factor = math.sqrt(max(1.0, m / n))
    torch.testing.assert_close(W.detach(), -3 * LR * factor * svd_polar(A), rtol=0, atol=2e-5)
    torch.testing.assert_close(
        expand(st["momentum_U"], st["momentum_S"], st["momentum_V"]), (1 - MU**3) * A, rtol=0, atol=1e-5
    )
    assert "momentum_buffer" not in st
    assert st["momentum_U"].shape == (m, 6) and st["momentum_V"].shape == (n, 6)


def test_low_rank_momentum_tracks_the_truncated_full_momentum_and_improves_with_rank() -> None:
    m, n = 48, 64
    s = [0.7**i for i in range(32)]
    A = rank_r(m, n, s, seed=1)
    full = (1 - MU**5) * A
    U, S, Vh = torch.linalg.svd(full, full_matrices=False)
    errors, alignments = [], []
    for r in (2, 4, 8, 16):
        W = nn.Parameter(torch.zeros(m, n))
        opt = ProfiledMuon([("w", W)], prof({"w": {"momentum_rank": r}}))
        for _ in range(5):
            opt.zero_grad()
            (W * A).sum().backward()
            opt.step()
        st = opt.state[W]
        kept = expand(st["momentum_U"], st["momentum_S"], st["momentum_V"])
        truncated = (U[:, :r] * S[:r]) @ Vh[:r]
        errors.append(float((kept - truncated).norm() / full.norm()))
        direction = -W.detach()
        alignments.append(float((direction * svd_polar(A)).sum() / (svd_polar(A).norm() * direction.norm())))
    # Per step compression keeps the leading subspace: close to the one-shot truncation of the full EMA.
    assert max(errors) < 0.05, errors
    assert alignments == sorted(alignments) and alignments[-1] > alignments[0] + 0.2, alignments


def test_low_rank_momentum_handles_zero_and_huge_gradients() -> None:
    W = nn.Parameter(torch.zeros(16, 12))
    opt = ProfiledMuon([("w", W)], prof({"w": {"momentum_rank": 4}}))
    W.grad = torch.zeros(16, 12)
    opt.step()
    assert torch.equal(W.detach(), torch.zeros(16, 12))
    W.grad = rank_r(16, 12, [1e30, 5e29])
    opt.step()
    assert torch.isfinite(W).all() and W.abs().max() > 0


@pytest.mark.parametrize("storm", [False, True])
def test_state_bytes_match_the_prediction_and_low_rank_saves_over_4x(storm: bool) -> None:
    model = load_model("gpt2-tiny")
    muon_names = [p.name for p in ProfiledMuon(model).plans.values() if p.optimizer == "muon"]
    layer = {"momentum_rank": 8, **({"momentum": "storm"} if storm else {})}
    default = ProfiledMuon(model)
    lowrank = ProfiledMuon(copy.deepcopy(model), prof({name: layer for name in muon_names}))
    for opt in (default, lowrank):
        params = [p for g in opt.param_groups for p in g["params"]]

        def fill(params: list[Tensor] = params) -> None:
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3

        fill()
        opt.step(fill if opt.needs_closure else None)
        opt.step(fill if opt.needs_closure else None)  # storm keeps previous parameters from step 1 on
    for opt in (default, lowrank):
        assert optimizer_state_bytes(opt) == plans_state_bytes(opt.plans.values())["total"]
    muon_default = plans_state_bytes(default.plans.values())["muon"]
    muon_lowrank = plans_state_bytes(lowrank.plans.values())["muon"]
    momentum_default = sum(momentum_numel(p.shape) for p in default.plans.values() if p.optimizer == "muon")
    momentum_lowrank = sum(momentum_numel(p.shape, 8) for p in lowrank.plans.values() if p.optimizer == "muon")
    assert momentum_default / momentum_lowrank >= 4
    if not storm:
        assert muon_default / muon_lowrank >= 3.9  # step counters included


def test_low_rank_and_storm_state_dict_resume_takes_the_same_steps() -> None:
    layers = {"0.weight": {"momentum": "storm", "momentum_rank": 3}, "2.weight": {"momentum_rank": 4}}
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 10, bias=False), nn.Tanh(), nn.Linear(10, 8, bias=False), nn.Linear(8, 2))

    def run(model: nn.Module, opt: ProfiledMuon, steps: range) -> None:
        for step in steps:
            x, y = torch.randn(4, 6, generator=torch.Generator().manual_seed(step)), torch.ones(4, 2)

            def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)

    straight = copy.deepcopy(base)
    opt = ProfiledMuon(straight, prof(layers))
    run(straight, opt, range(5))

    first = copy.deepcopy(base)
    opt1 = ProfiledMuon(first, prof(layers))
    run(first, opt1, range(2))
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    resumed = copy.deepcopy(base)
    resumed.load_state_dict(saved_model)
    opt2 = ProfiledMuon(resumed, prof(layers))
    opt2.load_state_dict(saved_opt)
    run(resumed, opt2, range(2, 5))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_drives_low_rank_and_storm_layers() -> None:
    W = nn.Parameter(torch.zeros(8, 6))
    opt = ProfiledMuon([("w", W)], prof({"w": {"momentum_rank": 2}}), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    W.grad = rank_r(8, 6, [1.0])
    opt.step()
    sched.step()
    moved = W.detach().clone()
    opt.step()
    assert torch.equal(W.detach(), moved)  # lr 0 after the scheduler step


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ({"momentum_rank": 11}, "momentum_rank 11 is larger than the matrix allows"),
        ({"momentum_rank": 4, "method": "rsvd", "rank": 4}, "drop them or drop momentum_rank"),
        ({"momentum_rank": 4, "ns_steps": 3}, "ns_steps would be ignored"),
        ({"momentum": "nesterov"}, "momentum"),
        ({"momentum_rank": 0}, "momentum_rank"),
    ],
)
def test_bad_low_rank_and_storm_settings_are_refused(layer: dict, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        ProfiledMuon([("w", nn.Parameter(torch.zeros(12, 10)))], prof({"w": layer}))


def test_momentum_keys_on_an_adamw_layer_are_refused() -> None:
    with pytest.raises(ProfileError, match="applies to Muon layers only"):
        ProfiledMuon(
            [("w", nn.Parameter(torch.zeros(12, 10)))], prof({"w": {"optimizer": "adamw", "momentum": "storm"}})
        )


def test_defaults_block_can_turn_on_low_rank_momentum_everywhere() -> None:
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False), nn.Linear(16, 2))
    profile = {"format": "muonprof.profile/1", "defaults": {"momentum_rank": 4, "momentum": "storm"}}
    opt = ProfiledMuon(model, profile)
    muon = [p for p in opt.plans.values() if p.optimizer == "muon"]
    assert muon and all(p.momentum_rank == 4 and p.momentum == "storm" for p in muon)
    assert all(p.momentum == "ema" for p in opt.plans.values() if p.optimizer == "adamw")


@pytest.mark.parametrize("rank", [None, 3])
def test_a_nan_in_the_previous_iterate_gradient_skips_the_storm_layer(rank: int | None) -> None:
    """A NaN in g(x_{t-1}) poisons M_t just as one in g(x_t) would: the layer keeps its weights and state."""
    w = nn.Parameter(torch.randn(8, 6))
    layer = {"momentum": "storm", **({"momentum_rank": rank} if rank else {})}
    opt = ProfiledMuon([("w", w)], prof({"w": layer}))
    calls = 0
    poison_call = 2  # step 2's first call: the gradient at x_{t-1}

    def closure() -> None:
        nonlocal calls
        calls += 1
        w.grad = torch.full((8, 6), float("nan")) if calls == poison_call else torch.randn(8, 6)

    opt.step(closure)
    before = w.detach().clone()
    state = {k: v.clone() if isinstance(v, Tensor) else v for k, v in opt.state[w].items() if k != "step"}
    opt.step(closure)
    assert torch.equal(w.detach(), before)
    for key, value in state.items():
        now = opt.state[w][key]
        assert torch.equal(now, value) if isinstance(value, Tensor) else now == value, key
    assert opt.nonfinite_counts() == {"w": 1}
    opt.step(closure)
    assert not torch.equal(w.detach(), before)
    assert torch.isfinite(w).all()
