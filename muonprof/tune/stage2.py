"""Stage 2: learning-rate scaling from short real training runs, pruned.

With stage 1's orthogonalizers fixed, every trial trains the model from the same initial weights on the
same batches (``build_workload`` with one seed) for ``steps`` steps and is scored by the validation loss at
the end. It picks:

- the base learning rate (a multiplier on the rule's usual value: 0.02 for ``original`` / ``spectral``,
  AdamW-like 1e-3 for ``match_rms_adamw``, whose shape factor 0.2 sqrt(max(A, B)) is ~10x larger);
- the LR rule (``original`` sqrt(max(1, A/B)), ``match_rms_adamw``, ``spectral`` sqrt(A/B));
- one multiplier per role group present in the model (attention in = q/k/v/qkv, attention out, MLP in =
  gate/up, MLP down, conv, other hidden matrices) and one for the AdamW-routed layers;
- the rank compensation for low-rank layers: a rank-r update has Frobenius norm sqrt(r) instead of
  sqrt(min(m, n)), so its RMS is smaller by sqrt(r / min(m, n)); the trial scales it by
  ``(min(m, n) / r) ** (gamma / 2)`` with gamma in [0, 1] (0: as is, 1: RMS matched). A low-rank momentum
  layer (``momentum_rank``, update U_r V_r^T) is such a layer too, and gets the same compensation.

This search is joint (the base LR and every multiplier interact through the loss), which is what Optuna's
TPE sampler is for; intermediate validation losses go to a pruner (median or Hyperband) so that bad
trials stop early. The default settings are enqueued first, so the result can never be worse than them
on the tuning runs. The profile stores the resolved per-layer ``lr_scale`` (everything but the rule's
shape factor folded in, relative to ProfiledMuon's default lr 0.02).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from ..bench.candidates import MOMENTUM_RANK
from ..optim import ProfiledMuon
from ..workload import Workload
from .space import LayerMenu

LOW_RANK = frozenset({"lowrank", "rsvd", MOMENTUM_RANK})  # rank-r updates: the rank compensation applies
DEFAULT_LR = 0.02
RULE_BASE_LR = {"original": DEFAULT_LR, "spectral": DEFAULT_LR, "match_rms_adamw": 1e-3}
ROLE_GROUPS = {
    "attn_q": "attn_in",
    "attn_k": "attn_in",
    "attn_v": "attn_in",
    "attn_qkv": "attn_in",
    "attn_out": "attn_out",
    "mlp_gate": "mlp_in",
    "mlp_up": "mlp_in",
    "mlp_down": "mlp_down",
    "conv": "conv",
}


@dataclass(frozen=True)
class LrChoice:
    """One point of the stage-2 space."""

    lr_rule: str = "original"
    lr_mult: float = 1.0
    group_mults: Mapping[str, float] | None = None
    adamw_mult: float = 1.0
    rank_comp: float = 0.0

    @property
    def base_lr(self) -> float:
        return RULE_BASE_LR[self.lr_rule] * self.lr_mult

    def scales(self, menus: Sequence[LayerMenu], picks: Mapping[str, Any]) -> dict[str, float]:
        """Per Muon layer: ``lr_scale`` relative to ProfiledMuon's default lr (``picks``: layer -> OrthoConfig)."""
        groups = dict(self.group_mults or {})
        out = {}
        for menu in menus:
            scale = self.base_lr / DEFAULT_LR * groups.get(group_of(menu.role), 1.0)
            config = picks[menu.name]
            if config.method in LOW_RANK and config.rank and self.rank_comp > 0:
                short = min(menu.shape)
                if config.rank < short and not (getattr(config, "full_below", 0) and short <= config.full_below):
                    scale *= (short / config.rank) ** (self.rank_comp / 2)
            out[menu.name] = scale
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "lr_rule": self.lr_rule,
            "base_lr": self.base_lr,
            "lr_mult": self.lr_mult,
            "group_mults": dict(self.group_mults or {}),
            "adamw_mult": self.adamw_mult,
            "rank_comp": self.rank_comp,
        }


def group_of(role: str) -> str:
    return ROLE_GROUPS.get(role, "other")


def suggest(trial: optuna.Trial, groups: Sequence[str], rules: Sequence[str], lowrank: bool) -> LrChoice:
    rule = trial.suggest_categorical("lr_rule", list(rules))
    lr_mult = trial.suggest_float("lr_mult", 0.25, 4.0, log=True)
    group_mults = {g: trial.suggest_float(f"mult:{g}", 0.5, 2.0, log=True) for g in groups}
    adamw_mult = trial.suggest_float("adamw_mult", 0.3, 3.0, log=True)
    rank_comp = trial.suggest_float("rank_comp", 0.0, 1.0) if lowrank else 0.0
    return LrChoice(rule, lr_mult, group_mults, adamw_mult, rank_comp)


def default_params(groups: Sequence[str], lowrank: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"lr_rule": "original", "lr_mult": 1.0, "adamw_mult": 1.0}
    params.update({f"mult:{g}": 1.0 for g in groups})
    if lowrank:
        params["rank_comp"] = 0.0
    return params


def search_space(menus: Sequence[LayerMenu], picks: Mapping[str, Any]) -> tuple[list[str], bool]:
    """The role groups present, and whether any layer is low-rank (then the rank compensation is searched)."""
    groups = sorted({group_of(m.role) for m in menus})
    lowrank = any(getattr(picks[m.name], "method", "") in LOW_RANK for m in menus)
    return groups, lowrank


def training_profile(menus: Sequence[LayerMenu], picks: Mapping[str, Any], choice: LrChoice) -> dict[str, Any]:
    """The in-memory profile a trial trains with (stage 1's recipe plus this trial's scales)."""
    from .writer import settings_of

    scales = choice.scales(menus, picks)
    return {
        "format": "muonprof.profile/1",
        "defaults": {"lr_rule": choice.lr_rule},
        "layers": {m.name: {**settings_of(picks[m.name]), "lr_scale": scales[m.name]} for m in menus},
    }


def make_objective(
    build: Callable[[], Workload],
    menus: Sequence[LayerMenu],
    picks: Mapping[str, Any],
    *,
    steps: int,
    eval_every: int,
    rules: Sequence[str] = ("original", "match_rms_adamw", "spectral"),
    adamw_lr: float = 3e-4,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> Callable[[optuna.Trial], float]:
    """Objective: final validation loss of a short run; reports intermediate losses to the pruner."""
    from ..train import train

    groups, lowrank = search_space(menus, picks)

    def objective(trial: optuna.Trial) -> float:
        choice = suggest(trial, groups, rules, lowrank)
        workload = build()
        optimizer = ProfiledMuon(
            workload.model,
            training_profile(menus, picks, choice),
            lr=DEFAULT_LR,
            adamw_lr=adamw_lr * choice.adamw_mult,
            seed=seed,
        )

        def report(step: int, val_loss: float | None) -> None:
            if val_loss is None or not math.isfinite(val_loss):
                return
            trial.report(val_loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        result = train(
            workload,
            optimizer,
            steps=steps,
            eval_every=eval_every,
            on_eval=report,
            on_step=(lambda step, loss: on_step(step)) if on_step else None,
        )
        trial.set_user_attr("choice", choice.to_json())
        if result.diverged_at is not None:
            trial.set_user_attr("diverged_at", result.diverged_at)
            raise optuna.TrialPruned(f"diverged at step {result.diverged_at}")
        final = result.final_val_loss
        if final is None:
            final = result.final_train_loss()  # a workload without validation batches
        if final is None or not math.isfinite(final):
            raise optuna.TrialPruned("non-finite validation loss")
        return float(final)

    return objective


def choice_of(trial: optuna.trial.FrozenTrial) -> LrChoice:
    p = trial.params
    groups = {k.removeprefix("mult:"): v for k, v in p.items() if k.startswith("mult:")}
    return LrChoice(p["lr_rule"], p["lr_mult"], groups, p.get("adamw_mult", 1.0), p.get("rank_comp", 0.0))
