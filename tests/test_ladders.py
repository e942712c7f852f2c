"""Ladders: ProfiledMuon moving a layer along recipes by cheap quality signals (issue 17).

The signals are checked against exact references (SVD), the controller on planted gradient sequences whose
rank grows, shrinks or stays, and the optimizer for resume, trace, momentum continuity across a move and
bit-identity with the static recipe while measuring.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from muonprof import ProfiledMuon
from muonprof.cli import app
from muonprof.optim.ladder import RungState, decide
from muonprof.ortho import OrthoConfig, orthogonalize
from muonprof.ortho.lowrank import lowrank_with_basis
from muonprof.ortho.quality import matrix_with_spectrum
from muonprof.ortho.signals import applied_share, captured_energy, orthogonality_quality, predicted_signal
from muonprof.profile import ProfileError
from muonprof.profile.resolve import LadderPlan

M, N = 64, 48


def planted(rank: int, seed: int, m: int = M, n: int = N) -> torch.Tensor:
    """A gradient of exactly ``rank`` equal singular values (Haar singular vectors, one of 4 draws), float32."""
    return _planted(rank, seed % 4, m, n).clone()


@functools.cache
def _planted(rank: int, seed: int, m: int, n: int) -> torch.Tensor:
    s = torch.zeros(min(m, n), dtype=torch.float64)
    s[:rank] = 1.0
    return matrix_with_spectrum(s, m, n, generator=torch.Generator().manual_seed(seed)).float()


def lowrank_ladder(ranks: tuple[int, ...] = (4, 8, 16, 32), **kw: Any) -> dict[str, Any]:
    rungs = [{"method": "lowrank", "rank": r, "dtype": "float32"} for r in ranks]
    return {"rungs": rungs, "floor": 0.9, "margin": 0.05, "patience": 2, "every": 1, **kw}


def profile(ladder: dict[str, Any] | None = None, **layer: Any) -> dict[str, Any]:
    entry = dict(layer)
    if ladder is not None:
        entry["ladder"] = ladder
    return {"format": "muonprof.profile/1", "layers": {"w": entry}}


def run_planted(ranks: list[int], ladder: dict[str, Any], **kw: Any) -> tuple[ProfiledMuon, nn.Parameter]:
    """Step a lone 64 x 48 matrix through gradients of the given ranks (one per step), momentum 0 so the
    orthogonalized matrix is the planted gradient itself."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(M, N))
    opt = ProfiledMuon([("w", w)], profile(ladder), momentum=0.0, **kw)
    for t, rank in enumerate(ranks):
        w.grad = planted(rank, seed=t)
        opt.step()
    return opt, w


def rungs_by_step(opt: ProfiledMuon) -> list[int]:
    return [rung for _, _, rung in opt.ladder_status()["w"]["history"]]


# ---------------------------------------------------------------- signals against references


def test_captured_energy_is_the_energy_share_of_the_basis() -> None:
    s = torch.linspace(1.0, 0.01, N, dtype=torch.float64)
    X = matrix_with_spectrum(s, M, N, generator=torch.Generator().manual_seed(1)).float()
    config = OrthoConfig(method="lowrank", rank=8, dtype="float32", power_iters=3)
    _, Q = lowrank_with_basis(X, config, torch.Generator().manual_seed(0))
    measured = float(captured_energy(X, Q))
    # The reference: the same projection in float64, and the ideal top-8 share of the known spectrum.
    projected = (Q[0].double().mT @ X.double().mT).square().sum() / X.double().square().sum()
    assert measured == pytest.approx(float(projected), rel=1e-5)
    ideal = float(s[:8].square().sum() / s.square().sum())
    assert measured <= ideal + 1e-6
    assert measured == pytest.approx(ideal, abs=0.02)  # three power iterations find the subspace
    assert predicted_signal(s, config) == pytest.approx(ideal)
    assert float(captured_energy(X, None)) == 1.0


def test_orthogonality_quality_estimates_the_exact_defect() -> None:
    s = torch.logspace(0, -3, N, dtype=torch.float64)
    X = matrix_with_spectrum(s, M, N, generator=torch.Generator().manual_seed(2)).float()
    for steps in (2, 5):
        config = OrthoConfig(ns_steps=steps, dtype="float32")
        O = orthogonalize(X, config)
        sv = torch.linalg.svdvals(O.double())
        exact = float((1 - (sv.square() - 1).square().mean()).clamp(0, 1))
        estimate = float(orthogonality_quality(O, torch.Generator().manual_seed(0), probes=512))
        assert estimate == pytest.approx(exact, abs=0.03)
        # The spectral model predicts the same number from the singular values alone.
        assert predicted_signal(s, config) == pytest.approx(exact, abs=0.01)
    polar = orthogonalize(X, OrthoConfig(method="svd"))
    assert float(orthogonality_quality(polar, torch.Generator().manual_seed(0))) == pytest.approx(1.0, abs=1e-4)
    # More steps lift more of the small singular values: the signal orders the recipes as they deserve.
    fewer = float(orthogonality_quality(orthogonalize(X, OrthoConfig(ns_steps=2, dtype="float32")), probes=256))
    more = float(orthogonality_quality(orthogonalize(X, OrthoConfig(ns_steps=5, dtype="float32")), probes=256))
    assert fewer < more


def test_applied_share_of_a_projection() -> None:
    X = torch.randn(M, N, generator=torch.Generator().manual_seed(3))
    A = X.clone()
    A[20:] = 0  # the rows a subset step applied
    assert float(applied_share(X, A)) == pytest.approx(float(X[:20].square().sum() / X.square().sum()), rel=1e-6)
    assert float(applied_share(torch.zeros(M, N), torch.zeros(M, N))) == 1.0


# ---------------------------------------------------------------- the controller on planted sequences


def test_rank_growing_sequence_climbs_the_ladder() -> None:
    ranks = [2] * 6 + [6] * 6 + [12] * 6 + [24] * 6
    opt, _ = run_planted(ranks, lowrank_ladder())
    rungs = rungs_by_step(opt)
    assert opt.ladder_status()["w"]["rung"] == 3  # rank 24 needs the rank-32 rung
    # Each growth moves it up at the first measurement below the floor: rank 6 > 4 at step 7, and so on.
    assert rungs[6] == 0 and rungs[7] == 1
    assert max(rungs[:6]) == 0


def test_rank_shrinking_sequence_descends_only_after_the_hysteresis() -> None:
    ladder = lowrank_ladder(start=3, patience=3)
    opt, _ = run_planted([2] * 20, ladder)
    rungs = rungs_by_step(opt)
    # Rank 2 is served exactly by every rung: one rung down per 3 calm measurements, never faster.
    assert rungs[:10] == [3, 3, 3, 2, 2, 2, 1, 1, 1, 0]
    assert rungs[10:] == [0] * 10


def test_stationary_sequence_does_not_flap() -> None:
    # Rank 6: rung r8 serves it, r4 captures 4/6 < floor. The layer tries r4 less and less often.
    opt, _ = run_planted([6] * 64, lowrank_ladder((4, 8), start=1, patience=2))
    rungs = rungs_by_step(opt)
    descents = [i for i in range(1, len(rungs)) if rungs[i] < rungs[i - 1]]
    gaps = [b - a for a, b in itertools.pairwise(descents)]
    assert all(b > a for a, b in itertools.pairwise(gaps)), gaps  # exponential back-off
    assert len(descents) <= int(math.log2(64 / 2)) + 1
    # When the cheaper rung is good enough it goes down once and stays there.
    opt, _ = run_planted([3] * 30, lowrank_ladder((4, 8), start=1, patience=2))
    assert rungs_by_step(opt) == [1, 1] + [0] * 28


def test_decide_is_hysteretic_in_the_margin_band() -> None:
    ladder = LadderPlan((OrthoConfig(), OrthoConfig(ns_steps=6)), (1.0, 1.0), floor=0.5, margin=0.1, patience=2)
    state = RungState(rung=1)
    for step in range(10):  # between floor and floor + margin: neither up nor down
        assert decide(state, ladder, 0.55, step) == 1
    assert decide(state, ladder, 0.7, 10) == 1
    assert decide(state, ladder, 0.7, 11) == 0
    assert decide(state, ladder, 0.49, 12) == 1  # a failed descent
    assert state.failures == 1


# ---------------------------------------------------------------- the optimizer


def test_measuring_does_not_change_the_update() -> None:
    """A ladder that never moves (floor 0, margin 1) measures every step and trains bit for bit as the static
    profile of its rung; the global RNG is left alone."""
    rung = {"method": "lowrank", "rank": 8, "dtype": "float32"}
    for recipe in (rung, {"ns_steps": 3}, {"method": "svd"}):
        ladder = {"rungs": [recipe, {"ns_steps": 10}], "floor": 0.0, "margin": 1.0, "every": 1}
        runs = []
        for prof in (profile(**recipe), profile(ladder)):
            torch.manual_seed(0)
            w = nn.Parameter(torch.randn(M, N))
            opt = ProfiledMuon([("w", w)], prof)
            for t in range(6):
                w.grad = planted(6, seed=t) + 0.01 * torch.randn(M, N, generator=torch.Generator().manual_seed(t))
                opt.step()
            runs.append((w.detach().clone(), torch.rand(1)))
        assert torch.equal(runs[0][0], runs[1][0]), recipe
        assert torch.equal(runs[0][1], runs[1][1])


def test_resume_mid_run_takes_identical_decisions_and_weights(tmp_path: Path) -> None:
    ranks = [2] * 5 + [6] * 5 + [12] * 5 + [3] * 15
    ladder = lowrank_ladder(patience=2)
    full, w_full = run_planted(ranks, ladder, ladder_trace=tmp_path / "full.jsonl")

    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(M, N))
    first = ProfiledMuon([("w", w)], profile(ladder), momentum=0.0, ladder_trace=tmp_path / "resumed.jsonl")
    for t, rank in enumerate(ranks[:12]):
        w.grad = planted(rank, seed=t)
        first.step()
    saved = copy.deepcopy(first.state_dict())
    assert saved["ladder"]["layers"]["w"]["rung"] == first.ladder_status()["w"]["rung"]
    w2 = nn.Parameter(w.detach().clone())
    second = ProfiledMuon([("w", w2)], profile(ladder), momentum=0.0, ladder_trace=tmp_path / "resumed.jsonl")
    second.load_state_dict(saved)
    for t, rank in enumerate(ranks[12:], start=12):
        w2.grad = planted(rank, seed=t)
        second.step()
    assert second.ladder_status() == full.ladder_status()
    assert torch.equal(w2, w_full)
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


def test_a_move_keeps_the_momentum_across_tail_and_plain_rungs() -> None:
    """subset with fraction 1 applies everything, so it is the EMA step to float rounding, with a buffer
    that holds mu x torch's: a ladder that moves from it to plain Newton-Schulz mid-run must train as
    plain Newton-Schulz did all along (the buffer rescaled by 1 / mu at the move)."""
    ns = {"ns_steps": 5, "dtype": "float32"}
    ladder = {
        "rungs": [ns, {"method": "subset", "fraction": 1.0, "dtype": "float32"}],
        "floor": 0.5,
        "margin": 0.0,
        "patience": 1,
        "every": 4,
        "start": 1,
    }
    finals = []
    for prof in (profile(**ns), profile(ladder)):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(M, N))
        opt = ProfiledMuon([("w", w)], prof)
        for t in range(10):
            w.grad = torch.randn(M, N, generator=torch.Generator().manual_seed(t))
            opt.step()
        finals.append(w.detach().clone())
        if prof["layers"]["w"].get("ladder"):
            assert opt.ladder_status()["w"]["rung"] == 0  # it did move, at step 4
    torch.testing.assert_close(finals[1], finals[0], rtol=0, atol=2e-5)


def test_trace_is_written_and_summarized(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    run_planted([2] * 4 + [6] * 4 + [12] * 4, lowrank_ladder(), ladder_trace=trace)
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert rows and all({"step", "layer", "from", "to", "signal"} <= row.keys() for row in rows)
    assert rows[0]["layer"] == "w" and rows[0]["to"] == rows[0]["from"] + 1 and rows[0]["signal"] < 0.9
    result = CliRunner().invoke(app, ["profile", "trace", str(trace), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["moves"] == len(rows)
    assert summary["layers"][0]["layer"] == "w" and summary["layers"][0]["end_rung"] == rows[-1]["to"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n')
    result = CliRunner().invoke(app, ["profile", "trace", str(bad)])
    assert result.exit_code != 0 and "needs step" in result.output and "Traceback" not in result.output


def test_profile_show_lists_the_ladder(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile(lowrank_ladder((4, 8)))))
    result = CliRunner().invoke(app, ["profile", "show", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["layers"][0]["ladder"]["floor"] == 0.9


# ---------------------------------------------------------------- bad ladders


def refused(ladder: dict[str, Any], where: str = "layer") -> str:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(M, N))
    prof = profile(ladder) if where == "layer" else {"format": "muonprof.profile/1", "defaults": {"ladder": ladder}}
    with pytest.raises(ProfileError) as info:
        ProfiledMuon([("w", w)], prof)
    message = str(info.value)
    assert "\n" not in message and "w" in message
    return message


@pytest.mark.parametrize(
    ("ladder", "expected"),
    [
        ({"rungs": [], "floor": 0.5}, 'layers["w"].ladder.rungs: a ladder needs at least one rung'),
        ({"rungs": [{}], "floor": 1.5}, 'layers["w"].ladder.floor: floor must be in [0, 1]'),
        ({"rungs": [{}], "floor": -0.1}, 'layers["w"].ladder.floor: floor must be in [0, 1]'),
        ({"rungs": [{}, {"method": "magic"}], "floor": 0.5}, 'layers["w"].ladder.rungs[1].method'),
        ({"rungs": [{"preset": "nope"}], "floor": 0.5}, 'layers["w"].ladder.rungs[0].preset: unknown preset'),
        ({"rungs": [{"rank_": 4}], "floor": 0.5}, 'layers["w"].ladder.rungs[0].rank_: Extra inputs'),
        ({"rungs": [{"method": "lowrank"}], "floor": 0.5}, 'layers["w"].ladder (matrix 64x48): rungs[0]: rank'),
        (
            {"rungs": [{"method": "lowrank", "rank": 64}], "floor": 0.5},
            'layers["w"].ladder (matrix 64x48): rungs[0]: rank: 64 exceeds',
        ),
        (
            {"rungs": [{"ns_steps": 5}, {"ns_steps": 3}], "floor": 0.5},
            'layers["w"].ladder (matrix 64x48): rungs[1] (ns3-jordan-bf16',
        ),
        (
            {"rungs": [{"method": "svd"}, {"method": "lowrank", "rank": 4}], "floor": 0.5},
            "cheaper than rungs[0] (svd",
        ),
        ({"rungs": [{}], "floor": 0.5, "start": 1}, "start 1 is not a rung index"),
    ],
)
def test_bad_ladders_are_refused_in_one_line_naming_the_layer(ladder: dict[str, Any], expected: str) -> None:
    assert expected in refused(ladder)


def test_a_bad_defaults_ladder_names_the_layer_it_was_applied_to() -> None:
    message = refused({"rungs": [{"ns_steps": 5}, {"ns_steps": 2}], "floor": 0.5}, where="defaults")
    assert "defaults.ladder (applied to 'w')" in message and "order the rungs cheap -> expensive" in message


def test_bad_ladder_is_one_line_from_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile({"rungs": [{"ns_steps": 5}], "floor": 2})))
    result = CliRunner().invoke(app, ["profile", "check", str(path)])
    assert result.exit_code != 0
    assert "floor must be in [0, 1]" in result.output and "Traceback" not in result.output


def test_ladder_with_momentum_rank_or_storm_tail_is_refused() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(M, N))
    prof = profile({"rungs": [{}], "floor": 0.5}, momentum_rank=4)
    with pytest.raises(ProfileError, match="momentum_rank"):
        ProfiledMuon([("w", w)], prof)
    prof = profile({"rungs": [{}, {"method": "subset", "fraction": 1.0}], "floor": 0.5}, momentum="storm")
    with pytest.raises(ProfileError, match=r"rungs\[1\]: method subset keeps"):
        ProfiledMuon([("w", w)], prof)


# ---------------------------------------------------------------- validate


def test_validate_races_the_adaptive_profile_against_itself_without_ladders() -> None:
    from muonprof.validate import validate

    ladder = {"rungs": [{"ns_steps": 2, "dtype": "float32"}, {"ns_steps": 5}], "floor": 0.9, "every": 2}
    adaptive = {"format": "muonprof.profile/1", "defaults": {"ladder": ladder}}
    result = validate(
        "llama-tiny", profile=adaptive, contenders=["static", "default"], steps=4, batch_size=2, seq_len=16
    )
    assert list(result.contenders) == ["profile", "static", "default"]
    assert all(c.skipped is None and c.runs for c in result.contenders.values())
    assert "ladders removed" in result.contenders["static"].config["profile"]
    # Adaptive and static differ (the ladder ran Newton-Schulz x2 first, then climbed), static is the default.
    finals = {name: c.runs[0].train_losses for name, c in result.contenders.items()}
    assert finals["static"] == finals["default"] and finals["profile"] != finals["static"]


# ---------------------------------------------------------------- tune writes ladders


def test_tune_writes_a_ladder_from_the_front_around_the_chosen_recipe() -> None:
    from muonprof.tune.space import LayerMenu, Option
    from muonprof.tune.writer import layer_ladder

    def lowrank(r: int) -> OrthoConfig:
        return OrthoConfig(method="lowrank", rank=r, dtype="float32")

    front = [  # fastest first, as stage 1 keeps them; one NS option that reports another kind of signal
        Option("r4", lowrank(4), 0.1, 0.50),
        Option("r8", lowrank(8), 0.2, 0.70),
        Option("ns2", OrthoConfig(ns_steps=2), 0.25, 0.60),
        Option("r16", lowrank(16), 0.3, 0.85),
        Option("r32", lowrank(32), 0.5, 0.95),
    ]
    menu = LayerMenu("w", (M, N), "linear", 1.0, front)
    s = torch.linspace(1.0, 0.05, N)
    ladder = layer_ladder(menu, "r8", s, slack=0.02)
    assert ladder is not None
    assert [r["rank"] for r in ladder["rungs"]] == [4, 8, 16, 32] and ladder["start"] == 1
    assert ladder["floor"] == pytest.approx(predicted_signal(s, lowrank(8)) - 0.02)
    # The written ladder is a valid one: ProfiledMuon takes it, on the chosen rung.
    w = nn.Parameter(torch.randn(M, N))
    opt = ProfiledMuon([("w", w)], profile(ladder))
    assert opt.plans["w"].ortho == lowrank(8).replace(dtype="float32") and opt.plans["w"].ladder is not None
    assert layer_ladder(LayerMenu("w", (M, N), "linear", 1.0, front[:1]), "r4", s) is None  # nothing to move to


def test_a_ladder_on_an_adamw_layer_is_refused() -> None:
    w = nn.Parameter(torch.randn(M, N))
    prof = profile({"rungs": [{}, {"ns_steps": 6}], "floor": 0.5}, optimizer="adamw")
    with pytest.raises(ProfileError, match=r'layers\["w"\]: ladder applies to Muon layers only'):
        ProfiledMuon([("w", w)], prof)
