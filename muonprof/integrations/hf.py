"""Hugging Face ``Trainer``: a spectrum-recording callback and ProfiledMuon as the Trainer's optimizer.

::

    from muonprof.integrations.hf import SpectrumCallback, profiled_muon_optimizers

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        optimizers=profiled_muon_optimizers(model, "profile.json", args),  # or leave the Trainer's own
        callbacks=[SpectrumCallback("run.spectra.pt", every=50, window=16)],
    )
    trainer.train()          # writes run.spectra.pt at the end: `muonprof tune run.spectra.pt` reads it

The callback records in ``on_pre_optimizer_step`` (after backward and gradient clipping, before the step), the
point ``SpectrumRecorder.record`` expects; its step numbers are the Trainer's optimizer steps (1-based).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..capture.recorder import SpectrumRecorder
from ..optim import ProfiledMuon
from . import require

transformers = require("transformers", "hf")


class SpectrumCallback(transformers.TrainerCallback):  # type: ignore[misc, name-defined]
    """Records ``muonprof.spectra/1`` spectra during ``Trainer.train()`` and saves them to ``out`` at the end.

    Keyword arguments go to ``SpectrumRecorder`` (``every``, ``capture_steps``, ``warmup_steps``, ``momentum``,
    ``window``); ``total_steps`` comes from the Trainer's ``max_steps``.
    """

    def __init__(self, out: str | os.PathLike[str], **recorder_kwargs: Any) -> None:
        self.out = Path(out)
        self.recorder_kwargs = recorder_kwargs
        self.recorder: SpectrumRecorder | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None:
            raise ValueError("SpectrumCallback needs the Trainer's model (on_train_begin got none)")
        settings = dict(self.recorder_kwargs)
        if settings.get("window"):
            settings.setdefault("total_steps", int(state.max_steps))
        self.recorder = SpectrumRecorder(_unwrap(model), optimizer, **settings)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self.recorder.record(int(state.global_step) + 1, None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None and self.recorder.records:
            self.recorder.save(self.out)


def profiled_muon_optimizers(
    model: nn.Module, profile: Any = None, args: Any = None, **kwargs: Any
) -> tuple[ProfiledMuon, None]:
    """``(ProfiledMuon(model, profile, ...), None)`` for ``Trainer(optimizers=...)``: the Trainer then builds its
    own LR scheduler on top. With ``args`` (``TrainingArguments``), ``args.learning_rate`` becomes the AdamW
    group's lr and ``args.weight_decay`` its weight decay unless given in ``kwargs``; the Muon group keeps
    ProfiledMuon's own defaults (lr 0.02) unless ``lr=`` says otherwise."""
    if args is not None:
        kwargs.setdefault("adamw_lr", float(args.learning_rate))
        kwargs.setdefault("adamw_weight_decay", float(args.weight_decay))
    return ProfiledMuon(model, profile, **kwargs), None


def _unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameters the optimizer holds (DataParallel / DDP wrappers expose ``.module``)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


__all__ = ["SpectrumCallback", "profiled_muon_optimizers"]
