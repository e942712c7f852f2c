"""Capture: spectra of planted gradients come out right, statistics, batching, the artifact round-trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from muonprof.capture import (
    CaptureError,
    SpectraError,
    capture_spectra,
    capture_steps,
    load_spectra,
    rank_holding,
    save_spectra,
    spectrum_stats,
    stats_row,
)
from muonprof.capture.run import batched_svdvals
from muonprof.ortho.quality import matrix_with_spectrum
from muonprof.workload import Workload

MU = 0.95


class Planted(nn.Module):
    """A hidden matrix (Muon's) and a head (AdamW's): the loss <W, A> makes each gradient exactly A."""

    def __init__(self, m: int = 24, n: int = 16) -> None:
        super().__init__()
        self.hidden = nn.Linear(n, m, bias=False)
        self.head = nn.Linear(m, 3, bias=False)
        self.gain = nn.Parameter(torch.ones(m))


def planted_workload(a_hidden: torch.Tensor, a_head: torch.Tensor, loss_at: dict[int, float] | None = None) -> Workload:
    model = Planted(a_hidden.shape[0], a_hidden.shape[1])

    def loss_fn(module: nn.Module, step: int) -> torch.Tensor:
        loss = (module.hidden.weight * a_hidden).sum() + (module.head.weight * a_head).sum() + 0 * module.gain.sum()
        if loss_at and step in loss_at:
            return loss * 0 + loss_at[step]
        return loss

    return Workload(
        spec="planted",
        model=model,
        task=None,
        train_batch=lambda step: step,
        val_batches=lambda: [],
        loss_fn=loss_fn,
        batch_size=None,
        seq_len=None,
    )


def momentum_factor(t: int, mu: float = MU) -> float:
    """With a constant gradient G: B_t = (1 - mu^t) G and M_t = lerp(G, B_t, mu) = that factor times G."""
    b = 1 - mu**t
    return (1 - mu) + mu * b


def test_capture_steps_first_every_and_last() -> None:
    assert capture_steps(20, 10) == [1, 10, 20]
    assert capture_steps(25, 10) == [1, 10, 20, 25]
    assert capture_steps(1, 5) == [1]
    with pytest.raises(ValueError, match="--steps"):
        capture_steps(0, 1)
    with pytest.raises(ValueError, match="--every"):
        capture_steps(5, 0)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_planted_low_rank_gradient_spectra(optimizer: str) -> None:
    gen = torch.Generator().manual_seed(1)
    s_hidden = torch.tensor([5.0, 3.0, 1.0] + [0.0] * 13)
    s_head = torch.tensor([2.0, 0.5, 0.0])
    a_hidden = matrix_with_spectrum(s_hidden, 24, 16, generator=gen).float()
    a_head = matrix_with_spectrum(s_head, 3, 24, generator=gen).float()
    spectra = capture_spectra(
        planted_workload(a_hidden, a_head), steps=4, every=2, warmup_steps=0, optimizer=optimizer, lr=1e-3
    )

    assert spectra.steps == [1, 2, 4]
    by_name = {layer.name: layer for layer in spectra.layers}
    assert set(by_name) == {"hidden.weight", "head.weight"}  # the 1-D gain has no spectrum
    assert by_name["hidden.weight"].optimizer == ("muon" if optimizer == "muon" else "adamw")
    assert by_name["head.weight"].optimizer == "adamw"
    assert by_name["hidden.weight"].role == "linear" and by_name["head.weight"].role == "head"
    for capture in spectra.captures:
        c = momentum_factor(capture.step)
        for name, s in (("hidden.weight", s_hidden), ("head.weight", s_head)):
            torch.testing.assert_close(capture.grad[name], s, atol=1e-4, rtol=1e-4)
            # Muon's own buffer (hidden, muon run) and the shadow buffer (head, or everything under adamw)
            # follow the same recurrence.
            torch.testing.assert_close(capture.momentum[name], c * s, atol=1e-4, rtol=1e-4)
    stats = spectra.stats("grad")["hidden.weight"]
    assert stats["numerical_rank"] == 3
    assert stats["energy_rank_90"] == 2  # 25 + 9 = 34 of 35 is 97% > 90%, 25 alone 71%
    assert stats["energy_rank_99"] == 3
    assert stats["nuclear_rank_50"] == 1 and stats["nuclear_rank_90"] == 3
    assert stats["stable_rank"] == pytest.approx(35 / 25)
    assert stats["sv_max"] == pytest.approx(5 / math.sqrt(35), rel=1e-5)
    assert stats["sv_min"] == pytest.approx(0.0, abs=1e-6)
    assert spectra.losses and len(spectra.losses) == 4


def test_spectrum_stats_known_values() -> None:
    flat = spectrum_stats(torch.full((8,), 2.0))
    assert flat["stable_rank"].item() == pytest.approx(8)
    assert flat["effective_rank"].item() == pytest.approx(8)
    assert flat["energy_rank_50"].item() == 4 and flat["energy_rank_99"].item() == 8
    assert flat["sv_min"].item() == pytest.approx(1 / math.sqrt(8)) == flat["sv_max"].item()
    spike = stats_row(torch.tensor([1.0, 0, 0, 0]))
    assert spike["stable_rank"] == pytest.approx(1) and spike["effective_rank"] == pytest.approx(1)
    assert spike["numerical_rank"] == 1 and spike["energy_rank_99"] == 1
    zero = stats_row(torch.zeros(5))
    assert zero["stable_rank"] == 0 and zero["effective_rank"] == 0 and zero["energy_rank_90"] == 0
    assert zero["numerical_rank"] == 0
    # Order does not matter and batches work.
    batch = spectrum_stats(torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 4.0]]))
    assert batch["stable_rank"].tolist() == pytest.approx([14 / 9, 1.0])
    assert rank_holding(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5).item() == 2


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_batched_svdvals_match_per_matrix(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(*shape, generator=gen) for _ in range(3)] + [torch.randn(5, 4, generator=gen)]
    mats.append(torch.randn(*shape, generator=gen).to(torch.bfloat16))
    got = batched_svdvals(mats)
    for m, s in zip(mats, got):
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, torch.linalg.svdvals(m.float()), atol=1e-5, rtol=1e-5)


def test_nonfinite_loss_stops_capture() -> None:
    a = torch.randn(24, 16)
    workload = planted_workload(a, torch.randn(3, 24), loss_at={2: float("nan")})
    with pytest.raises(CaptureError, match="became nan at step 3"):
        # train_batch(step - 1) is passed as the loss's "batch": step index 2 is the third step.
        capture_spectra(workload, steps=5, every=1, warmup_steps=0)


def test_model_without_matrices_is_refused() -> None:
    model = nn.Module()
    model.scale = nn.Parameter(torch.ones(4))
    workload = Workload("vec", model, None, lambda s: s, lambda: [], lambda m, b: m.scale.sum(), None, None)
    with pytest.raises(CaptureError, match="no matrix parameters"):
        capture_spectra(workload, steps=1, every=1)


def test_unused_matrix_records_zero_spectrum() -> None:
    workload = planted_workload(torch.randn(24, 16), torch.randn(3, 24))
    workload.model.unused = nn.Linear(4, 6)
    spectra = capture_spectra(workload, steps=2, every=1, optimizer="adamw")
    assert torch.count_nonzero(spectra.captures[-1].grad["unused.weight"]) == 0


def test_artifact_round_trip_and_bad_files(tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    spectra = capture_spectra(
        planted_workload(torch.randn(24, 16, generator=gen), torch.randn(3, 24, generator=gen)),
        steps=3,
        every=2,
        warmup_steps=0,
        save_matrices=True,
    )
    path = save_spectra(spectra, tmp_path / "sub" / "planted.spectra.pt")
    loaded = load_spectra(path)
    assert loaded.layers == spectra.layers and loaded.steps == spectra.steps
    assert loaded.meta["fingerprint"] == spectra.meta["fingerprint"]
    assert loaded.losses == spectra.losses
    for a, b in zip(loaded.captures, spectra.captures):
        for name in a.grad:
            assert torch.equal(a.grad[name], b.grad[name]) and torch.equal(a.momentum[name], b.momentum[name])
    assert loaded.matrices_step == 3
    m = loaded.matrices["momentum"]["hidden.weight"]
    torch.testing.assert_close(torch.linalg.svdvals(m), loaded.captures[-1].momentum["hidden.weight"])
    assert loaded.summary()["captures"][0]["layers"]["hidden.weight"]["grad"]["numerical_rank"] == 16
    assert not list(tmp_path.glob("sub/.*.tmp")), "the atomic write leaves no temp file behind"

    with pytest.raises(SpectraError, match="no such spectra file"):
        load_spectra(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(SpectraError, match="not a muonprof spectra file"):
        load_spectra(tmp_path / "junk.pt")
    torch.save({"format": "muonprof.spectra/99"}, tmp_path / "future.pt")
    with pytest.raises(SpectraError, match="spectra/99"):
        load_spectra(tmp_path / "future.pt")
    torch.save({"format": "muonprof.spectra/1", "meta": {}}, tmp_path / "partial.pt")
    with pytest.raises(SpectraError, match="corrupt"):
        load_spectra(tmp_path / "partial.pt")
    payload = torch.load(path, weights_only=True)
    payload["captures"][0]["grad"]["hidden.weight"] = torch.ones(3)
    torch.save(payload, tmp_path / "inconsistent.pt")
    with pytest.raises(SpectraError, match="should hold 16 singular values"):
        load_spectra(tmp_path / "inconsistent.pt")
