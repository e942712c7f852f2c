"""Capture in the phase the profile runs in: burn-in, several snapshots and their drift, a gradient window,
old files still loading, and bench scoring each candidate on its worst snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from muonprof.bench.accuracy import layer_accuracy, snapshot_accuracy
from muonprof.bench.candidates import GridSpec, build_candidates, candidate_label, fits
from muonprof.bench.run import run_bench
from muonprof.capture import (
    DEFAULT_WARMUP_STEPS,
    CaptureRecord,
    LayerRecord,
    Spectra,
    SpectraError,
    capture_spectra,
    load_spectra,
    plan_captures,
    save_spectra,
    select_window_layers,
    spread_steps,
)
from muonprof.capture.window import DEFAULT_WINDOW, WINDOW_BYTES
from muonprof.cli import app
from muonprof.commands import spectrum as spectrum_cli
from muonprof.ortho.quality import matrix_with_spectrum
from muonprof.workload import Workload

MU = 0.95
CPU = torch.device("cpu")
runner = CliRunner()


class Planted(nn.Module):
    """A hidden matrix (Muon's) and a head (AdamW's); the loss (b + 1) <W, A> makes batch b's gradient (b + 1) A."""

    def __init__(self, m: int = 24, n: int = 16) -> None:
        super().__init__()
        self.hidden = nn.Linear(n, m, bias=False)
        self.head = nn.Linear(m, 3, bias=False)


def planted(a_hidden: torch.Tensor, a_head: torch.Tensor, scaled: bool = False) -> Workload:
    model = Planted(*a_hidden.shape)

    def loss_fn(module: nn.Module, batch: int) -> torch.Tensor:
        scale = float(batch + 1) if scaled else 1.0
        return scale * ((module.hidden.weight * a_hidden).sum() + (module.head.weight * a_head).sum())

    return Workload("planted", model, None, lambda step: step, lambda: [], loss_fn, None, None)


def low_rank(m: int, n: int, values: list[float], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor(values + [0.0] * (min(m, n) - len(values)))
    return s, matrix_with_spectrum(s, m, n, generator=torch.Generator().manual_seed(seed)).float()


def momentum_factor(t: int) -> float:
    """Constant gradient G: after t steps B_t = (1 - mu^t) G, and M_t = lerp(G, B_t, mu) is that times G."""
    return (1 - MU) + MU * (1 - MU**t)


# --------------------------------------------------------------------------------------------- planning


def test_plan_captures_offsets_by_the_burn_in_and_spreads() -> None:
    assert plan_captures(20, 10) == [1, 10, 20]
    assert plan_captures(20, 10, warmup_steps=50) == [51, 60, 70]
    assert plan_captures(20, 10, warmup_steps=5, captures=3) == [6, 16, 25]
    assert spread_steps(10, 1) == [10] and spread_steps(4, 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="--warmup-steps must be at least 0"):
        plan_captures(5, 1, warmup_steps=-1)
    with pytest.raises(ValueError, match="--captures"):
        plan_captures(5, 1, captures=0)
    with pytest.raises(ValueError, match="more than the 5 capture steps"):
        plan_captures(5, 1, captures=6)


def test_cli_defaults_are_the_library_defaults() -> None:
    assert spectrum_cli.DEFAULT_WARMUP == DEFAULT_WARMUP_STEPS and spectrum_cli.DEFAULT_T == DEFAULT_WINDOW
    assert 0 < DEFAULT_WINDOW <= 48


# -------------------------------------------------------------------------------------- burn-in + drift


def test_burn_in_trains_before_the_first_capture_and_drift_is_recorded(tmp_path: Path) -> None:
    s_hidden, a_hidden = low_rank(24, 16, [5.0, 3.0, 1.0])
    s_head, a_head = low_rank(3, 24, [2.0, 0.5], seed=2)
    spectra = capture_spectra(planted(a_hidden, a_head), steps=4, every=2, warmup_steps=3, lr=1e-3)

    assert spectra.steps == [4, 5, 7] and spectra.warmup_steps == 3
    assert len(spectra.losses) == 7 and spectra.meta["total_steps"] == 7 and spectra.meta["steps"] == 4
    for capture in spectra.captures:  # the momentum remembers the burn-in: it has seen `step` gradients
        for name, s in (("hidden.weight", s_hidden), ("head.weight", s_head)):
            torch.testing.assert_close(capture.momentum[name], momentum_factor(capture.step) * s, atol=1e-4, rtol=1e-4)

    drift = spectra.drift()["hidden.weight"]
    assert (drift["first_step"], drift["last_step"]) == (4, 7)
    assert drift["nuclear_rank_90_share"] == [3 / 16, 3 / 16] and drift["nuclear_rank_90_share_change"] == 0
    expected = momentum_factor(7) / momentum_factor(4) - 1
    assert drift["nuclear_change"] == pytest.approx(expected, rel=1e-4)
    assert spectra.summary()["drift"] == spectra.drift() and spectra.summary()["warmup_steps"] == 3

    path = save_spectra(spectra, tmp_path / "p.spectra.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["drift"]["hidden.weight"]["nuclear_change"] == pytest.approx(expected, rel=1e-4)
    loaded = load_spectra(path)
    assert loaded.steps == [4, 5, 7] and loaded.warmup_steps == 3 and loaded.drift() == spectra.drift()


def test_no_burn_in_matches_the_old_behaviour() -> None:
    _, a_hidden = low_rank(24, 16, [5.0, 3.0])
    _, a_head = low_rank(3, 24, [2.0], seed=2)
    spectra = capture_spectra(planted(a_hidden, a_head), steps=3, every=2, warmup_steps=0, captures=None)
    assert spectra.steps == [1, 2, 3] and len(spectra.losses) == 3 and spectra.window is None


# ------------------------------------------------------------------------------------------------ window


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_window_holds_the_last_gradients_and_the_momentum_before_them(optimizer: str, tmp_path: Path) -> None:
    _, a_hidden = low_rank(24, 16, [5.0, 3.0, 1.0])
    _, a_head = low_rank(3, 24, [2.0], seed=2)
    spectra = capture_spectra(
        planted(a_hidden, a_head, scaled=True), steps=5, every=5, warmup_steps=2, window=3, optimizer=optimizer
    )
    window = spectra.window
    assert window is not None and window.start_step == 5 and window.steps == [5, 6, 7] and window.length == 3
    assert set(window.grads) == {"hidden.weight"}  # Muon-routed 2-D layers only (the head is AdamW's)
    grads = window.grads["hidden.weight"]
    assert grads.dtype == torch.float32 and grads.shape == (3, 24, 16)
    for t, step in enumerate(window.steps):  # batch step - 1 has gradient step * A
        torch.testing.assert_close(grads[t], step * a_hidden)
    buffer = torch.zeros_like(a_hidden)
    for step in range(1, window.start_step):  # B <- lerp(B, G, 1 - mu) over the steps before the window
        buffer = buffer.lerp(step * a_hidden, 1 - MU)
    torch.testing.assert_close(window.momentum["hidden.weight"], buffer, rtol=1e-5, atol=1e-6)
    assert window.momentum["hidden.weight"].shape == (24, 16) and not window.skipped

    path = save_spectra(spectra, tmp_path / "w.spectra.pt")
    loaded = load_spectra(path).window
    assert loaded is not None and loaded.start_step == 5 and loaded.byte_cap == WINDOW_BYTES
    assert torch.equal(loaded.grads["hidden.weight"], grads)
    assert torch.equal(loaded.momentum["hidden.weight"], window.momentum["hidden.weight"])
    assert spectra.summary()["window"]["layers"] == ["hidden.weight"]


def test_window_bad_arguments_are_refused_before_training() -> None:
    _, a = low_rank(24, 16, [1.0])
    _, h = low_rank(3, 24, [1.0], seed=2)
    workload = planted(a, h)
    with pytest.raises(ValueError, match="--window must be at least 0"):
        capture_spectra(workload, steps=5, every=1, window=-1)
    with pytest.raises(ValueError, match="longer than the capture run"):
        capture_spectra(workload, steps=5, every=1, warmup_steps=10, window=6)
    with pytest.raises(ValueError, match="--warmup-steps"):
        capture_spectra(workload, steps=5, every=1, warmup_steps=-2)


def test_corrupt_window_is_refused_with_one_line(tmp_path: Path) -> None:
    _, a = low_rank(24, 16, [3.0, 1.0])
    _, h = low_rank(3, 24, [1.0], seed=2)
    path = save_spectra(capture_spectra(planted(a, h), steps=3, every=3, warmup_steps=0, window=2), tmp_path / "w.pt")
    good = torch.load(path, weights_only=True)

    def broken(change) -> str:
        payload = torch.load(path, weights_only=True)
        change(payload["window"])
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(SpectraError, match="corrupt gradient window") as info:
            load_spectra(tmp_path / "bad.pt")
        assert "\n" not in str(info.value)
        return str(info.value)

    assert good["window"]["start_step"] == 2
    assert "float32 (T, 24, 16)" in broken(lambda w: w["grads"].update({"hidden.weight": torch.zeros(2, 16, 24)}))
    assert "float32" in broken(lambda w: w["grads"].update({"hidden.weight": w["grads"]["hidden.weight"].double()}))
    assert "momentum of" in broken(lambda w: w["momentum"].update({"hidden.weight": torch.zeros(3)}))
    assert "exceed the run" in broken(lambda w: w.update({"start_step": 3}))
    assert "different layers" in broken(lambda w: w["grads"].update({"ghost": torch.zeros(2, 2, 2)}))

    def ghost(w: dict) -> None:
        w["grads"]["ghost"], w["momentum"]["ghost"] = torch.zeros(2, 2, 2), torch.zeros(2, 2)

    assert "not one of the captured" in broken(ghost)
    assert "start_step" in broken(lambda w: w.pop("start_step"))


def test_window_byte_cap_keeps_one_layer_per_role_and_shape_first() -> None:
    layers = [
        LayerRecord(f"b{i}.{role}", (8, 8), (8, 8), role, "muon") for i in range(3) for role in ("attn_q", "mlp_up")
    ]
    per_layer = (4 + 1) * 8 * 8 * 4
    kept, skipped = select_window_layers(layers, 4, 3 * per_layer)
    assert kept == ["b0.attn_q", "b0.mlp_up", "b1.attn_q"]  # every role before any second one
    assert set(skipped) == {"b1.mlp_up", "b2.attn_q", "b2.mlp_up"}
    assert "over the window byte cap" in skipped["b2.mlp_up"]
    kept, skipped = select_window_layers(layers, 4, per_layer - 1)
    assert kept == [] and len(skipped) == 6


def test_capture_records_what_the_byte_cap_skipped() -> None:
    _, a = low_rank(24, 16, [3.0, 1.0])
    _, h = low_rank(3, 24, [1.0], seed=2)
    spectra = capture_spectra(planted(a, h), steps=3, every=3, warmup_steps=0, window=2, window_bytes=100)
    assert spectra.window is not None and spectra.window.grads == {}
    assert list(spectra.window.skipped) == ["hidden.weight"]


# ----------------------------------------------------------------------------------------- old files


def test_spectra_file_without_burn_in_window_or_drift_still_loads(tmp_path: Path) -> None:
    _, a = low_rank(24, 16, [3.0, 1.0])
    _, h = low_rank(3, 24, [1.0], seed=2)
    path = save_spectra(capture_spectra(planted(a, h), steps=3, every=1, warmup_steps=0), tmp_path / "new.pt")
    payload = torch.load(path, weights_only=True)
    for key in ("drift", "window"):
        del payload[key]
    for key in ("warmup_steps", "total_steps", "captures"):
        del payload["meta"][key]
    torch.save(payload, tmp_path / "old.pt")
    old = load_spectra(tmp_path / "old.pt")
    assert old.warmup_steps == 0 and old.window is None and old.steps == [1, 2, 3]
    assert old.drift()["hidden.weight"]["first_step"] == 1
    result = run_bench(old, device=CPU, grid=GridSpec(ranks=(2,), steps=(5,)), seeds=1, probe=False,
                       timing={"max_repeats": 1, "target_s": 0.0})  # fmt: skip
    assert result.meta["spectra"]["snapshot_steps"] == [1, 2, 3]


# ------------------------------------------------------------------------------------ worst snapshot


def snapshot_spectra() -> Spectra:
    """One Muon layer captured twice after a 10-step burn-in: low-rank at step 11, heavy-tailed at step 20."""
    k = 16
    early = torch.tensor([0.5**i for i in range(k)])
    late = torch.tensor([1.0 / (1 + i) ** 0.3 for i in range(k)])
    layer = LayerRecord("w.weight", (k, k), (k, k), "mlp_up", "muon")
    captures = [
        CaptureRecord(step=11, loss=1.0, grad={"w.weight": early}, momentum={"w.weight": early}),
        CaptureRecord(step=20, loss=0.9, grad={"w.weight": late}, momentum={"w.weight": late}),
    ]
    return Spectra(meta={"fingerprint": "x", "warmup_steps": 10}, layers=[layer], captures=captures)


def test_snapshot_accuracy_is_the_worst_snapshot() -> None:
    spectra = snapshot_spectra()
    candidates = [c for c in build_candidates(GridSpec(ranks=(4,), steps=(1, 5))) if fits(c, (16, 16))]
    snaps = [(c.step, c.momentum["w.weight"]) for c in spectra.captures]
    combined = snapshot_accuracy(snaps, candidates, seeds=2)
    each = [layer_accuracy(s, candidates, seeds=2) for _, s in snaps]
    lowrank_seen = False
    for config in candidates:
        label = candidate_label(config)
        if "alignment" not in each[0][label]:
            assert "alignment" not in combined[label]  # e.g. column selection without saved matrices
            continue
        alignments = [e[label]["alignment"] for e in each]
        assert combined[label]["alignment"] == min(alignments)
        assert combined[label]["rel_err"] == max(e[label]["rel_err"] for e in each)
        assert combined[label]["worst_step"] == snaps[alignments.index(min(alignments))][0]
        assert [r["step"] for r in combined[label]["snapshots"]] == [11, 20]
        if label.startswith(("lowrank", "rsvd")):
            lowrank_seen = True  # a rank-4 method on the heavy-tailed late spectrum is the worst there
            assert combined[label]["worst_step"] == 20 and alignments[1] < alignments[0] - 0.1
    assert lowrank_seen


def test_run_bench_records_worst_snapshot_alignment() -> None:
    spectra = snapshot_spectra()
    grid = GridSpec(ranks=(4,), steps=(5,))
    result = run_bench(spectra, device=CPU, grid=grid, seeds=1, probe=False, timing={"max_repeats": 1, "target_s": 0})
    table = result.accuracy["w.weight"]
    assert result.meta["spectra"]["snapshot_steps"] == [11, 20] and result.meta["spectra"]["warmup_steps"] == 10
    per = {c.step: layer_accuracy(c.momentum["w.weight"], build_candidates(grid), seeds=1) for c in spectra.captures}
    for label, measures in table.items():
        if "alignment" in measures:
            assert measures["alignment"] == min(per[s][label]["alignment"] for s in per)


# --------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
        (["--window", "-1"], "--window must be at least 0"),
        (["--steps", "4", "--window", "5"], "longer than the capture run"),
        (["--captures", "0"], "--captures must be at least 1"),
    ],
)
def test_spectrum_cli_refuses_bad_capture_plans(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "s.pt"
    result = runner.invoke(app, ["spectrum", "gpt2-tiny", *args, "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_spectrum_cli_burn_in_snapshots_drift_and_window(tmp_path: Path) -> None:
    out = tmp_path / "s.pt"
    args = ["spectrum", "gpt2-tiny", "--steps", "4", "--captures", "2", "--warmup-steps", "3", "--window", "2",
            "--batch-size", "2", "--seq-len", "16", "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [c["step"] for c in summary["captures"]] == [4, 7] and summary["warmup_steps"] == 3
    assert summary["window"]["start_step"] == 6 and summary["window"]["length"] == 2
    assert summary["drift"]["blocks.0.mlp.up_proj.weight"]["first_step"] == 4
    spectra = load_spectra(out)
    assert spectra.window is not None and "blocks.0.attn.q_proj.weight" in spectra.window.grads
    assert "embed_tokens.weight" not in spectra.window.grads  # AdamW-routed
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "after 3 burn-in steps" in table.stdout
    assert "gradient window: steps 6-7" in table.stdout
