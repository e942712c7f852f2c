"""Optuna studies in the user's storage: SQLite next to the output by default, any RDB URL, or a journal file.

A study is bound to one model: its fingerprint is stored as a study attribute on creation and checked on
every later open, so ``--study-name`` can resume a study, and several ``muonprof tune`` processes pointed
at one storage share its trials, but a study holding another model's trials is refused, never mixed in.
The trial budget (``--trials N``) counts the study's finished trials, whoever ran them: a resumed or a
second worker runs only what is left.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from .space import TuneError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def default_storage(out: str | os.PathLike[str]) -> str:
    """``sqlite:///<out without suffix>.optuna.db``: the study lives next to the profile it produced."""
    path = Path(out)
    return f"sqlite:///{path.with_name(path.stem + '.optuna.db').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage | str:
    """An RDB URL as is (Optuna builds it); ``journal:PATH`` or a ``.log``/``.journal`` path as a journal file."""
    if url.startswith("journal:") or url.endswith((".log", ".journal", ".jsonl")):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise TuneError(
            f"--storage {url!r}: use an RDB URL (sqlite:///file.db, postgresql://..., mysql://...) or journal:PATH"
        )
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return url


def open_study(
    storage: str,
    name: str,
    *,
    fingerprint: str,
    model: str,
    stage: str,
    directions: Sequence[str] | None = None,
    direction: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create or load ``name`` in ``storage``; refuse it if it was made for another model or stage."""
    optuna.logging.set_verbosity(logging.WARNING)
    try:
        study = optuna.create_study(
            storage=open_storage(storage),
            study_name=name,
            directions=list(directions) if directions else None,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except TuneError:
        raise
    except ValueError as err:  # directions differ from the stored study's
        raise TuneError(f"study {name!r} in {storage}: {err}") from None
    except Exception as err:  # sqlalchemy / driver errors: unreachable host, missing driver, bad path
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise TuneError(f"cannot open Optuna storage {storage}: {reason}") from None
    attrs = study.user_attrs
    if "fingerprint" not in attrs:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("model", model)
        study.set_user_attr("stage", stage)
    elif attrs["fingerprint"] != fingerprint or attrs.get("stage", stage) != stage:
        raise TuneError(
            f"study {name!r} in {storage} holds {attrs.get('stage', '?')} trials for model "
            f"{attrs.get('model', '?')} ({attrs['fingerprint']}), not {stage} for {model} ({fingerprint}): "
            "pick another --study-name"
        )
    return study


def finished_trials(study: optuna.Study, *, searched_only: bool = False) -> list[optuna.trial.FrozenTrial]:
    """Finished trials; ``searched_only`` leaves out the exact profiles added as seeds (see stage 1)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    return [t for t in trials if "seed" not in t.user_attrs] if searched_only else trials


class _StopAt:
    """Stop this worker once the study holds ``total`` finished searched trials, whoever ran them."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if len(finished_trials(study, searched_only=True)) >= self.total:
            study.stop()


def run_until(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    total: int,
    *,
    on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> int:
    """Run trials until the study holds ``total`` finished searched ones (counting other workers'); returns
    how many this call ran. KeyboardInterrupt propagates after Optuna has stored the finished trials."""
    remaining = total - len(finished_trials(study, searched_only=True))
    if remaining <= 0:
        return 0
    before = len(study.trials)
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [_StopAt(total)]
    if on_trial is not None:
        callbacks.append(on_trial)
    study.optimize(objective, n_trials=remaining, callbacks=callbacks, gc_after_trial=False)
    return len(study.trials) - before
