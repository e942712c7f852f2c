"""The functional core (``muonprof.optim.functional``) alone, and ProfiledMuon's AdamW against torch's.

AdamW runs through torch's own fused / foreach kernels, so "equal to torch.optim.AdamW" is bit for bit here,
not to a tolerance: any drift means the arithmetic is no longer torch's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from muonprof import ProfiledMuon
from muonprof.optim import functional as F
from muonprof.ortho import OrthoConfig, orthogonalize

BETAS = (0.9, 0.95)


def _vectors(dtype: torch.dtype = torch.float32) -> list[tuple[str, nn.Parameter]]:
    """1-D and embedding-like parameters: everything goes to AdamW (named pairs route 1-D to AdamW; the 2-D
    ones are moved there by the profile below)."""
    torch.manual_seed(0)
    shapes = {"norm": (16,), "bias": (7,), "table": (50, 8), "head": (50, 8)}
    return [(n, nn.Parameter(torch.randn(s, dtype=dtype))) for n, s in shapes.items()]


ALL_ADAMW = {
    "format": "muonprof.profile/1",
    "layers": {"table": {"optimizer": "adamw"}, "head": {"optimizer": "adamw"}},
}


def _grads(step: int, params: list[nn.Parameter]) -> list[Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


@pytest.mark.parametrize("impl", ["fused", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw_group_is_torch_adamw_bit_for_bit(impl: str, dtype: torch.dtype) -> None:
    named = _vectors(dtype)
    ref = [nn.Parameter(p.detach().clone()) for _, p in named]
    opt = ProfiledMuon(
        named,
        ALL_ADAMW,
        adamw_lr=3e-2,
        adamw_betas=BETAS,
        adamw_weight_decay=0.1,
        adamw_impl=impl,  # type: ignore[arg-type]
    )
    assert opt.adamw_impl == impl
    kind = {"fused": True} if impl == "fused" else {"foreach": True}
    ref_opt = torch.optim.AdamW(ref, lr=3e-2, betas=BETAS, eps=1e-8, weight_decay=0.1, **kind)
    params = [p for _, p in named]
    steps = 10 if dtype == torch.float32 else 3
    for step in range(steps):
        for p, r, g in zip(params, ref, _grads(step, params)):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"])


def test_default_adamw_impl_is_fused_on_cpu() -> None:
    assert F.default_adamw_impl([torch.zeros(3)]) == "fused"
    assert F.default_adamw_impl([torch.zeros(3, dtype=torch.int64)]) == "foreach"


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_skips_a_nonfinite_layer_exactly_as_if_it_had_no_gradient(impl: str) -> None:
    named = _vectors()
    ref = [nn.Parameter(p.detach().clone()) for _, p in named]
    opt = ProfiledMuon(named, ALL_ADAMW, adamw_lr=3e-2, adamw_weight_decay=0.1, adamw_impl=impl)  # type: ignore[arg-type]
    ref_opt = torch.optim.AdamW(ref, lr=3e-2, betas=BETAS, eps=1e-8, weight_decay=0.1, fused=impl == "fused")
    params = [p for _, p in named]
    for step in range(10):
        grads = _grads(step, params)
        for p, r, g in zip(params, ref, grads):
            p.grad, r.grad = g.clone(), g.clone()
        if step in (3, 4):
            params[2].grad[1, 1] = float("nan")  # torch's reference: that layer has no gradient this step
            ref[2].grad = None
        if step == 4:
            params[0].grad[0] = float("inf")
            ref[0].grad = None
        opt.step()
        ref_opt.step()
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
        assert torch.equal(opt.state[p]["step"], ref_opt.state[r]["step"])
    assert opt.nonfinite_counts() == {"table": 2, "norm": 1}


def test_adamw_lr_scale_is_a_group_with_the_scaled_lr() -> None:
    named = _vectors()
    profile = {**ALL_ADAMW, "layers": {**ALL_ADAMW["layers"], "head": {"optimizer": "adamw", "lr_scale": 0.5}}}
    ref = [nn.Parameter(p.detach().clone()) for _, p in named]
    opt = ProfiledMuon(named, profile, adamw_lr=1e-2, adamw_weight_decay=0.1)
    ref_opt = torch.optim.AdamW(
        [{"params": ref[:3]}, {"params": ref[3:], "lr": 5e-3}], lr=1e-2, betas=BETAS, weight_decay=0.1, fused=True
    )
    params = [p for _, p in named]
    for step in range(4):
        for p, r, g in zip(params, ref, _grads(step, params)):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert all(torch.equal(p, r) for p, r in zip(params, ref))


def test_adamw_state_dict_round_trip_continues_identically() -> None:
    named = _vectors()
    twin = [(n, nn.Parameter(p.detach().clone())) for n, p in named]
    opt = ProfiledMuon(named, ALL_ADAMW, adamw_weight_decay=0.1)
    params = [p for _, p in named]
    for step in range(3):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()
    for (_, t), (_, p) in zip(twin, named):
        t.data.copy_(p.data)
    resumed = ProfiledMuon(twin, ALL_ADAMW, adamw_weight_decay=0.1)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    twins = [p for _, p in twin]
    for step in range(3, 6):
        grads = _grads(step, params)
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    assert all(torch.equal(p, t) for p, t in zip(params, twins))


def test_bad_adamw_impl_is_refused() -> None:
    with pytest.raises(ValueError, match="adamw_impl"):
        ProfiledMuon(_vectors(), adamw_impl="loop")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the Muon functions alone


def _matrices(n: int = 3, shape: tuple[int, int] = (6, 10), seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_finite_mask_is_none_on_a_clean_cpu_step_and_flags_bad_layers() -> None:
    grads = _matrices()
    assert F.finite_mask(grads, torch.device("cpu")) is None
    grads[1][0, 0] = float("inf")
    ok = F.finite_mask(grads, torch.device("cpu"))
    assert ok is not None and ok.tolist() == [True, False, True]
    huge = [torch.full((4, 4), 3e38)]  # finite, though its 2-norm overflows
    assert F.finite_mask(huge, torch.device("cpu")) is None


@pytest.mark.parametrize("nesterov", [True, False])
def test_ema_momentum_is_torch_muons_rule(nesterov: bool) -> None:
    mu = 0.95
    bufs, grads = _matrices(seed=1), _matrices(seed=2)
    expect_bufs = [b + (1 - mu) * (g - b) for b, g in zip(bufs, grads)]
    inputs = F.ema_momentum(bufs, grads, mu, nesterov, None)
    for b, e in zip(bufs, expect_bufs):
        torch.testing.assert_close(b, e)
    expected = [g + mu * (b - g) for g, b in zip(grads, bufs)] if nesterov else bufs
    for x, e in zip(inputs, expected):
        torch.testing.assert_close(x, e)


def test_ema_momentum_leaves_a_skipped_layers_buffer_alone() -> None:
    bufs, grads = _matrices(seed=1), _matrices(seed=2)
    grads[0][2, 2] = float("nan")
    before = bufs[0].clone()
    inputs = F.ema_momentum(bufs, grads, 0.9, True, torch.tensor([False, True, True]))
    assert torch.equal(bufs[0], before) and torch.isfinite(inputs[0]).all()
    assert not torch.equal(bufs[1], _matrices(seed=1)[1])


def test_storm_momentum_adds_the_correction_and_keeps_skipped_buffers() -> None:
    bufs, grads, corr = _matrices(seed=1), _matrices(seed=2), _matrices(seed=3)
    expected = [g + c for g, c in zip(grads, corr)]
    kept = bufs[2].clone()
    news = F.storm_momentum(bufs, grads, [c.clone() for c in corr[:2]] + [None], torch.tensor([True, True, False]))
    torch.testing.assert_close(news[0], expected[0])
    assert torch.equal(news[2], grads[2]) and news[2] is not grads[2]
    assert torch.equal(bufs[0], news[0]) and torch.equal(bufs[2], kept)


def test_tail_forms_with_everything_applied_are_the_ema_step() -> None:
    """With the whole momentum applied (A = X) the tail rule is the EMA rule with E = mu B stored."""
    mu = 0.9
    ema_bufs, grads = _matrices(seed=1), _matrices(seed=2)
    bufs = [mu * b for b in ema_bufs]
    ema_inputs = F.ema_momentum(ema_bufs, grads, mu, True, None)
    momenta, inputs = F.tail_inputs(bufs, grads, mu, True)
    for u, e in zip(inputs, ema_inputs):
        torch.testing.assert_close(u, e)
    for x, b in zip(momenta, ema_bufs):
        torch.testing.assert_close(x, b)  # X_t is torch's B_t
    F.tail_commit(bufs, momenta, [x.clone() for x in momenta], mu, torch.tensor([True, True, False]))
    for b, e in zip(bufs[:2], ema_bufs[:2]):
        torch.testing.assert_close(b, mu * e)
    assert torch.equal(bufs[2], mu * _matrices(seed=1)[2])  # skipped: E unchanged


def test_orthogonalize_all_batched_equals_one_at_a_time() -> None:
    inputs = _matrices(4, (8, 12))
    config = OrthoConfig(dtype="float32")
    single = F.orthogonalize_all(inputs, (8, 12), config, batched=False)
    batched = F.orthogonalize_all(inputs, (8, 12), config, batched=True)
    for a, b, x in zip(single, batched, inputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(a, orthogonalize(x, config))


def test_applied_updates_all_batched_equals_one_at_a_time() -> None:
    inputs, momenta = _matrices(3, (8, 12), seed=4), _matrices(3, (8, 12), seed=5)
    config = OrthoConfig(method="subset", fraction=0.5, dtype="float32")
    single = F.applied_updates_all(inputs, momenta, (8, 12), config, batched=False)
    batched = F.applied_updates_all(inputs, momenta, (8, 12), config, batched=True)
    for (o1, a1), (o2, a2) in zip(single, batched):
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a1, a2)


def test_muon_apply_decays_scales_and_skips() -> None:
    params, updates = _matrices(seed=6), _matrices(seed=7)
    before = [p.clone() for p in params]
    expected_1 = before[1] * (1 - 0.1 * 0.5) - 0.1 * 2.0 * updates[1]
    expected_2 = before[2] * (1 - 0.1 * 0.5) - 0.1 * 3.0 * updates[2]
    F.muon_apply(
        params,
        [u.clone() for u in updates],
        lr=0.1,
        weight_decay=0.5,
        lr_factors=[2.0, 2.0, 3.0],
        ok=torch.tensor([False, True, True]),
    )
    assert torch.equal(params[0], before[0])
    torch.testing.assert_close(params[1], expected_1)
    torch.testing.assert_close(params[2], expected_2)


def test_muon_apply_without_mask_is_one_foreach_add() -> None:
    params, updates = _matrices(seed=6), _matrices(seed=7)
    expected = [p.clone() for p in params]
    torch._foreach_mul_(expected, 1 - 0.02 * 0.01)
    torch._foreach_add_(expected, updates, alpha=-0.02 * 1.5)
    F.muon_apply(params, [u.clone() for u in updates], lr=0.02, weight_decay=0.01, lr_factors=[1.5] * 3, ok=None)
    assert all(torch.equal(p, e) for p, e in zip(params, expected))


def _factors(m: int, n: int, r: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    return U, torch.tensor([3.0, 2.0, 1.0][:r]), V


def test_lowrank_momentum_inputs_rebuild_then_fold_the_gradient() -> None:
    U, S, V = _factors(6, 10, 3, seed=1)
    grads = _matrices(2, (6, 10), seed=8)
    corrections: list[Tensor | None] = [None, None]
    ema = F.lowrank_momentum_inputs([(U, S, V)] * 2, grads, (6, 10), 0.9, "ema", corrections, [True, False])
    assert ema[1] is None  # another rank's layer: nothing built here
    torch.testing.assert_close(ema[0], 0.9 * (U * S) @ V.T + 0.1 * grads[0])
    correction = torch.ones(6, 10)
    storm = F.lowrank_momentum_inputs([(U, S, V)], grads[:1], (6, 10), 0.9, "storm", [correction], [True])
    torch.testing.assert_close(storm[0], grads[0] + 1)


def test_lowrank_momentum_commit_stores_factors_and_returns_their_polar() -> None:
    stored = [tuple(t.clone() for t in _factors(6, 10, 3, seed=s)) for s in (1, 2)]
    kept = [t.clone() for t in stored[1]]
    new = [_factors(6, 10, 3, seed=s) for s in (3, 4)]
    outs = F.lowrank_momentum_commit(stored, new, torch.tensor([True, False]))  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(stored[0], new[0]))
    assert all(torch.equal(a, b) for a, b in zip(stored[1], kept))
    U, _, V = new[0]
    torch.testing.assert_close(outs[0], U @ V.T)
