"""The in-loop recorder against ``capture_spectra`` (the same run, recorded from outside the loop) and alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from muonprof import ProfiledMuon, SpectrumRecorder
from muonprof.capture import capture_spectra, load_spectra
from muonprof.workload import build_workload


def _workload():  # type: ignore[no-untyped-def]
    return build_workload("gpt2-tiny", batch_size=2, seq_len=16, data="random", seed=0)


def test_recorder_in_a_users_loop_records_what_capture_spectra_records() -> None:
    reference = capture_spectra(_workload(), steps=6, every=3, warmup_steps=0, window=3, seed=0)
    workload = _workload()
    model = workload.model
    opt = ProfiledMuon(model, lr=0.02, momentum=0.95, seed=0)
    steps = [c.step for c in reference.captures]
    recorder = SpectrumRecorder(model, opt, capture_steps=steps, window=3, total_steps=6)
    model.train()
    for step in range(1, 7):
        opt.zero_grad(set_to_none=True)
        loss = workload.loss(workload.train_batch(step - 1))
        loss.backward()
        recorder.record(step, loss)
        opt.step()
    spectra = recorder.spectra()
    assert [c.step for c in spectra.captures] == steps
    assert [layer.name for layer in spectra.layers] == [layer.name for layer in reference.layers]
    assert [layer.optimizer for layer in spectra.layers] == [layer.optimizer for layer in reference.layers]
    for ours, theirs in zip(spectra.captures, reference.captures):
        assert ours.loss == pytest.approx(theirs.loss)
        for name in theirs.grad:
            assert torch.equal(ours.grad[name], theirs.grad[name]), name
            assert torch.equal(ours.momentum[name], theirs.momentum[name]), name
    assert spectra.window is not None and reference.window is not None
    for name, grads in reference.window.grads.items():
        assert torch.equal(spectra.window.grads[name], grads)
        assert torch.equal(spectra.window.momentum[name], reference.window.momentum[name])


def test_recorder_with_any_optimizer_keeps_a_shadow_momentum_and_saves_the_artifact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = SpectrumRecorder(model, opt, every=2, warmup_steps=1, momentum=0.9)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    grads = []
    for step in range(1, 6):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads.append(model[2].weight.grad.clone())
        recorder.record(step, None)
        opt.step()
    assert [r.step for r in recorder.records] == [3, 5]
    # M at step 5 from the shadow: B_t = lerp(B_{t-1}, G_t, 0.1) over steps 1..5, M = lerp(G_5, B_5, 0.9).
    buffer = torch.zeros_like(grads[0])
    for g in grads:
        buffer = buffer.lerp(g, 0.1)
    expected = torch.linalg.svdvals(grads[-1].lerp(buffer, 0.9))
    torch.testing.assert_close(recorder.records[-1].momentum["2.weight"], expected, rtol=1e-5, atol=1e-6)
    path = recorder.save(tmp_path / "run.spectra.pt")
    loaded = load_spectra(path)
    assert loaded.meta["recorder"] and loaded.meta["capture_steps"] == [3, 5]
    assert {layer.name for layer in loaded.layers} == {"0.weight", "2.weight", "4.weight"}


def test_recorder_refuses_bad_settings_with_one_line() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="every"):
        SpectrumRecorder(model, every=0)
    with pytest.raises(ValueError, match="total_steps"):
        SpectrumRecorder(model, window=4)
    with pytest.raises(ValueError, match="no matrix"):
        SpectrumRecorder(nn.Linear(4, 1))
    with pytest.raises(ValueError, match="no capture yet"):
        SpectrumRecorder(model, every=5).spectra()


def test_tune_says_what_it_needs_for_a_recorded_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from muonprof.cli import app

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    recorder = SpectrumRecorder(model, capture_steps=[1])
    nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 4)).backward()
    recorder.record(1, None)
    path = recorder.save(tmp_path / "run.spectra.pt")
    before = path.read_bytes()
    result = CliRunner().invoke(app, ["tune", str(path), "--out", str(tmp_path / "p.json")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "SpectrumRecorder(..., name='package.module:factory')" in result.output
    assert f"muonprof bench {path}" in " ".join(result.output.split())
    assert path.read_bytes() == before and not (tmp_path / "p.json").exists()
