"""Lightning: a spectrum-recording callback and ProfiledMuon from ``configure_optimizers``.

::

    import lightning as L
    from muonprof.integrations.lightning import SpectrumCallback, profiled_muon

    class Module(L.LightningModule):
        def configure_optimizers(self):
            return profiled_muon(self, "profile.json")

    L.Trainer(max_steps=1000, callbacks=[SpectrumCallback("run.spectra.pt", every=50)]).fit(Module(), loader)

The callback records in ``on_before_optimizer_step`` (after backward, before the step); its step numbers are the
Trainer's optimizer steps (1-based). It saves at ``on_train_end``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..capture.recorder import SpectrumRecorder
from ..optim import ProfiledMuon
from . import require

L = require("lightning", "lightning")


class SpectrumCallback(L.Callback):  # type: ignore[misc, name-defined]
    """Records ``muonprof.spectra/1`` spectra during ``Trainer.fit`` and saves them to ``out`` at the end.

    Keyword arguments go to ``SpectrumRecorder``; ``total_steps`` (for a window) comes from ``max_steps``."""

    def __init__(self, out: str | os.PathLike[str], **recorder_kwargs: Any) -> None:
        super().__init__()
        self.out = Path(out)
        self.recorder_kwargs = recorder_kwargs
        self.recorder: SpectrumRecorder | None = None

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        optimizers = trainer.optimizers
        settings = dict(self.recorder_kwargs)
        if settings.get("window"):
            settings.setdefault("total_steps", int(trainer.max_steps))
        self.recorder = SpectrumRecorder(pl_module, optimizers[0] if optimizers else None, **settings)

    def on_before_optimizer_step(self, trainer: Any, pl_module: nn.Module, optimizer: Any) -> None:
        if self.recorder is not None:
            self.recorder.record(int(trainer.global_step) + 1, None)

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.recorder is not None and self.recorder.records:
            self.recorder.save(self.out)


def profiled_muon(module: nn.Module, profile: Any = None, **kwargs: Any) -> ProfiledMuon:
    """``ProfiledMuon(module, profile, **kwargs)``: what ``configure_optimizers`` returns (a torch Optimizer, so
    Lightning's own LR-scheduler config and checkpointing work unchanged)."""
    return ProfiledMuon(module, profile, **kwargs)


__all__ = ["SpectrumCallback", "profiled_muon"]
