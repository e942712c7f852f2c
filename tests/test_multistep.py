"""Multi-step accuracy: the candidate's own momentum rule over a gradient window, against exact-polar Muon."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from muonprof import ProfiledMuon
from muonprof.bench.candidates import MomentumRank
from muonprof.bench.multistep import candidate_inners, layer_multistep, multistep_accuracy
from muonprof.ortho import OrthoConfig
from muonprof.ortho.quality import haar_factors

M, N, R = 24, 40, 4


def blocks() -> list[torch.Tensor]:
    U, V = haar_factors(M, N, generator=torch.Generator().manual_seed(0))
    return [(U[:, j * R : (j + 1) * R] @ V[:, j * R : (j + 1) * R].T).float() for j in range(3)]


def rotated_window(T: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients have moved on: the momentum holds subspace A (3x), every gradient lies in subspace B.

    Rank-4 Muon without feedback keeps serving A (the EMA's top subspace) until A has decayed below B's EMA
    (~27 steps at mu 0.95); with error feedback the unserved B grows by (1 - mu) g a step, undecayed, and
    takes over after ~20. Full Muon serves both from the start."""
    A, B, _ = blocks()
    return torch.stack([B] * T), 3 * A


LOWRANK = OrthoConfig(method="lowrank", rank=R, dtype="float32", core="svd")


@pytest.mark.parametrize("nesterov", [True, False])
def test_error_feedback_scores_clearly_higher_on_a_rotated_window(nesterov: bool) -> None:
    grads, momentum = rotated_window()
    plain = multistep_accuracy(grads, momentum, LOWRANK, nesterov=nesterov)
    ef = multistep_accuracy(grads, momentum, LOWRANK.replace(error_feedback=True), nesterov=nesterov)
    assert plain["multistep_alignment"] < 0.2 < 0.3 < ef["multistep_alignment"]
    assert len(ef["multistep_per_step"]) == 30 and ef["multistep_steps"] == 30
    rsvd_ef = OrthoConfig(method="rsvd", rank=R, dtype="float32", error_feedback=True)
    for cfg in (rsvd_ef, OrthoConfig(method="subset", fraction=0.25)):
        assert multistep_accuracy(grads, momentum, cfg, nesterov=nesterov)["multistep_alignment"] > 0.3
    exact = multistep_accuracy(grads, momentum, OrthoConfig(method="svd"), nesterov=nesterov)
    assert exact["multistep_alignment"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("nesterov", [True, False])
def test_full_rank_feedback_and_subset_one_score_as_the_default_rule(nesterov: bool) -> None:
    torch.manual_seed(0)
    grads, momentum = torch.randn(6, 12, 20), torch.randn(12, 20)
    ns = OrthoConfig(dtype="float32")
    base = multistep_accuracy(grads, momentum, ns, nesterov=nesterov)
    for cfg in (
        OrthoConfig(method="lowrank", rank=12, dtype="float32", error_feedback=True),
        OrthoConfig(method="subset", fraction=1.0, dtype="float32"),
    ):
        got = multistep_accuracy(grads, momentum, cfg, nesterov=nesterov)
        assert got["multistep_alignment"] == pytest.approx(base["multistep_alignment"], abs=1e-5)
        assert got["multistep_per_step"] == pytest.approx(base["multistep_per_step"], abs=1e-5)


def test_spectral_fast_path_equals_running_the_candidates() -> None:
    torch.manual_seed(1)
    grads, momentum = torch.randn(5, 16, 10), torch.randn(16, 10)
    configs = [
        OrthoConfig(dtype="float32"),
        OrthoConfig(ns_steps=3, coefficients="polar_express", dtype="float32"),
        OrthoConfig(method="svd"),
    ]
    fast = layer_multistep(grads, momentum, configs)
    for cfg, (label, row) in zip(configs, fast.items()):
        slow = multistep_accuracy(grads, momentum, cfg)
        assert row["multistep_alignment"] == pytest.approx(slow["multistep_alignment"], abs=1e-5), label
        assert "spectral model" in row["multistep_source"] and "run over" in slow["multistep_source"]


def test_rules_are_the_optimizers_own() -> None:
    """A one-layer ProfiledMuon fed the window's gradients makes the updates the multi-step run scores (each
    at unit operator norm, as multistep_alignment measures them)."""
    torch.manual_seed(2)
    grads = torch.randn(4, 12, 20)
    for layer, cfg in [
        ({"method": "lowrank", "rank": 3, "dtype": "float32", "core": "svd", "error_feedback": True}, None),
        ({"method": "subset", "fraction": 0.5, "dtype": "float32"}, None),
        ({"dtype": "float32"}, None),
        ({"momentum_rank": 3}, MomentumRank(3)),
    ]:
        weight = nn.Parameter(torch.zeros(12, 20))
        opt = ProfiledMuon([("w", weight)], {"format": "muonprof.profile/1", "layers": {"w": layer}}, lr=1.0)
        inners = []
        for g in grads:
            before = weight.detach().clone()
            weight.grad = g.clone()
            opt.step()
            step = (before - weight.detach()).double()  # lr 1, shape factor 1: the update O itself
            inners.append(float((g.double() * step).sum()) / float(torch.linalg.matrix_norm(step, ord=2)))
        candidate = cfg or OrthoConfig.from_dict(layer)
        ours = candidate_inners(grads, None, candidate)
        assert ours == pytest.approx(inners, rel=1e-4, abs=1e-5), layer


def test_bad_window_is_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"grads must be \(T, m, n\)"):
        multistep_accuracy(torch.zeros(4, 5), None, OrthoConfig())
    with pytest.raises(ValueError, match="initial momentum has shape"):
        multistep_accuracy(torch.zeros(2, 4, 5), torch.zeros(5, 4), OrthoConfig())


# ---------------------------------------------------------------- bench and stage 1


def test_run_bench_adds_multistep_on_windowed_layers_and_stage1_ranks_by_it() -> None:
    from types import SimpleNamespace

    from test_bench import tiny_spectra

    from muonprof.bench import parse_grid, run_bench
    from muonprof.tune.space import build_menus

    sp = tiny_spectra()
    gen = torch.Generator().manual_seed(0)
    sp.window = SimpleNamespace(  # type: ignore[attr-defined]
        start_step=3,
        grads={"a.weight": torch.randn(4, 24, 16, generator=gen), "c.weight": torch.randn(4, 32, 32, generator=gen)},
        momentum={"a.weight": torch.randn(24, 16, generator=gen)},  # c.weight: none (starts from zero)
    )
    grid = parse_grid(
        methods="newton_schulz,svd,lowrank,rsvd,error_feedback,subset",
        ranks="4",
        steps="3,5",
        schedules="jordan",
        power_iters="1",
        dtypes="fp32",
    )
    result = run_bench(sp, device=torch.device("cpu"), grid=grid, seeds=1, probe=False, timing={"max_repeats": 1})
    for name in ("a.weight", "c.weight"):
        measured = {k: v for k, v in result.accuracy[name].items() if "alignment" in v}
        assert measured and all("multistep_alignment" in v for v in measured.values()), name
    assert not any("multistep_alignment" in v for v in result.accuracy["b.weight"].values())
    acc = result.accuracy["a.weight"]
    assert acc["svd"]["multistep_alignment"] == pytest.approx(1.0, abs=1e-5)
    ef, plain = acc["lowrank-r4-power1-ns5-jordan-fp32-ef"], acc["lowrank-r4-power1-ns5-jordan-fp32"]
    assert ef["alignment"] == plain["alignment"] and "same as" in ef["source"]  # one step: the same update
    assert "Haar" in acc["subset-f0.25-ns5-jordan-fp32"]["source"]
    assert any("multi-step accuracy on 2 layer(s)" in n for n in result.meta["notes"])
    menus = {m.name: m for m in build_menus(result)}
    for option in menus["a.weight"].options:
        assert option.alignment == pytest.approx(acc[option.label]["multistep_alignment"])
        assert option.one_step_alignment == pytest.approx(acc[option.label]["alignment_worst"])
    for option in menus["b.weight"].options:
        assert option.alignment == option.one_step_alignment


def test_operator_norm_by_power_iteration_matches_the_svd_above_the_exact_size() -> None:
    from muonprof.bench.multistep import EXACT_OP_NORM_BELOW, _op_norm
    from muonprof.ortho import OrthoConfig, orthogonalize

    torch.manual_seed(0)
    G = torch.randn(EXACT_OP_NORM_BELOW + 32, 300)
    O = orthogonalize(G, OrthoConfig(dtype="float32"))  # Jordan x5: a clustered spectrum, the hard case
    exact = float(torch.linalg.matrix_norm(O.double(), ord=2))
    assert _op_norm(O) == pytest.approx(exact, rel=1e-3)  # the top of the spectrum is a tight cluster
    assert _op_norm(torch.zeros(3, 4)) == 0.0
