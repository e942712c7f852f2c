"""The Hugging Face Trainer and Lightning callbacks capture spectra in a real ``train()`` / ``fit()``.

Both frameworks are optional (``muonprof[hf]``, ``muonprof[lightning]``): without them these tests skip with the
reason, and importing the integration says in one line what to install.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from muonprof import ProfiledMuon
from muonprof.capture import load_spectra


def test_a_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning -> ImportError
    sys.modules.pop("muonprof.integrations.lightning", None)
    with pytest.raises(ImportError, match=r"pip install 'muonprof\[lightning\]'"):
        importlib.import_module("muonprof.integrations.lightning")
    sys.modules.pop("muonprof.integrations.lightning", None)


def test_hf_trainer_callback_records_spectra_and_profiled_muon_trains(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from muonprof.integrations.hf import SpectrumCallback, profiled_muon_optimizers

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    optimizers = profiled_muon_optimizers(model, None, args)
    out = tmp_path / "hf.spectra.pt"
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        optimizers=optimizers,
        callbacks=[SpectrumCallback(out, every=2, window=2)],
    )
    trainer.train()
    assert isinstance(trainer.optimizer, ProfiledMuon) or isinstance(
        getattr(trainer.optimizer, "optimizer", None), ProfiledMuon
    )
    spectra = load_spectra(out)
    assert [c.step for c in spectra.captures] == [2, 4, 6]
    names = {layer.name for layer in spectra.layers}
    assert "transformer.h.0.mlp.c_fc.weight" in names
    fc = next(layer for layer in spectra.layers if layer.name == "transformer.h.0.mlp.c_fc.weight")
    assert fc.optimizer == "muon"
    assert spectra.window is not None and spectra.window.length == 2


def test_lightning_callback_records_spectra(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    from muonprof.integrations.lightning import SpectrumCallback, profiled_muon

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return profiled_muon(self, None, adamw_lr=1e-3)

    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    out = tmp_path / "pl.spectra.pt"
    trainer = L.Trainer(
        max_steps=6,
        callbacks=[SpectrumCallback(out, every=3)],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(Module(), loader)
    spectra = load_spectra(out)
    assert [c.step for c in spectra.captures] == [3, 6]
    assert {layer.name for layer in spectra.layers} == {"net.0.weight", "net.2.weight", "net.4.weight"}
