"""The tune pipeline as a library: inputs (spectra, bench) in, a profile and its evidence out.

``muonprof tune`` is a thin shell over ``tune_stage1`` / ``tune_stage2``; both are resumable because
everything they decide lives in the Optuna storage, and neither writes a file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from .._files import finite_or_null
from ..bench.artifact import BenchResult
from ..bench.candidates import MOMENTUM_RANK
from ..capture import Spectra
from ..lr_rules import lr_rule_factor
from ..optim.state_memory import format_bytes
from ..workload import Workload
from . import stage1, stage2
from .space import LayerMenu, TuneError, build_menus
from .study import ensure_enqueued, finished_trials, get_blob, open_study, put_blob, run_until

TrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]
DEFAULT_TRIAL = "default"  # user attribute of stage 2's trial of the default settings


@dataclass
class Stage1Result:
    menus: list[LayerMenu]
    baseline: stage1.Assignment
    choice: stage1.Assignment
    front: list[stage1.Assignment]
    evaluated: list[stage1.Assignment]
    study_name: str
    trials_run: int
    notes: list[str] = field(default_factory=list)
    state_budget: int | None = None  # --state-memory-budget in bytes (None: not given)
    bench: BenchResult | None = None  # the bench the study decided with (the stored one: see tune_stage1)
    adopted_bench: bool = False  # True: that is the study's stored bench, not this run's (other timings)


@dataclass
class Stage2Result:
    choice: stage2.LrChoice
    scales: dict[str, float]
    best_value: float
    default_value: float | None
    study_name: str
    trials_run: int
    pruned: int
    finished: int


def default_study_name(model: str, fingerprint: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_") or "model"
    return f"muonprof-{safe}-{fingerprint.removeprefix('sha256:')[:8]}"


def momentum_weights(spectra: Spectra) -> dict[str, float]:
    """``w_L = f_L ||M_L||_*`` at the last capture (see ``space``: the descent share's weights)."""
    capture = spectra.captures[-1]
    return {
        layer.name: lr_rule_factor("original", *layer.matrix_shape) * float(capture.momentum[layer.name].sum())
        for layer in spectra.layers
    }


def check_bench_matches(bench: BenchResult, spectra: Spectra | None, fingerprint: str | None) -> None:
    """A bench file measured on another model's spectra is refused (its layers would not be ours)."""
    bench_fp = (bench.meta.get("spectra") or {}).get("fingerprint")
    expected = fingerprint or (spectra.meta.get("fingerprint") if spectra is not None else None)
    if expected and bench_fp and bench_fp != expected:
        model = ((bench.meta.get("spectra") or {}).get("model") or {}).get("spec", "another model")
        raise TuneError(f"the bench file was measured on {model} ({bench_fp}), not this model ({expected})")
    if spectra is not None:
        ours = {layer.name for layer in spectra.layers}
        theirs = {str(layer["name"]) for layer in bench.layers}
        if not theirs <= ours:
            missing = sorted(theirs - ours)
            raise TuneError(f"the bench file has layers this model lacks: {', '.join(missing[:3])}")


def tune_stage1(
    bench: BenchResult,
    spectra: Spectra | None,
    *,
    storage: str,
    study_name: str,
    fingerprint: str,
    model: str,
    trials: int,
    seed: int,
    target_alignment: float | None,
    time_budget_s: float | None,
    floor: float = 0.5,
    on_trial: TrialCallback | None = None,
    state_budget: int | None = None,
    key: Mapping[str, Any] | None = None,
) -> Stage1Result:
    """Menus from bench, the exact seeds (baseline, hull, per-layer target), the Optuna Pareto study, the pick.

    ``state_budget``: the most Muon optimizer state (bytes) the profile may hold, summed over the benched
    (Muon-routed) layers: each layer's momentum (the full m x n buffer, or a low-rank momentum's factors
    U, S, V) plus its 4-byte step counter, float32, as ``optim.state_memory.muon_state_bytes`` counts it.
    AdamW-routed parameters are not in it (their state is fixed by the model). A budget at or above the
    default's state changes nothing; below it the low-rank-momentum candidates join the menus, the study
    gets state as a third objective, ``stage1.memory_seeds`` adds the exact profiles within the budget, and
    the pick is made among the profiles within it. Without a target or time budget the pick is the fastest
    reaching the default's descent share within the budget, or, when none does, the most aligned within it.
    A budget below the least state the candidates allow is a TuneError naming that minimum.

    ``key``: the inputs behind the spectra (data, batch size, capture options...), for the study's key; with
    the grid and ``floor`` it defines the study (see ``study.open_study``). The study stores the bench it was
    created with, and a later or second worker whose own bench measured other timings uses the stored one, so
    all of them search and decide with the same menus (``adopted_bench``) and write the same profile.
    """
    weights = momentum_weights(spectra) if spectra is not None else None
    notes = [] if weights is not None else ["no spectra: layers weighted equally in the descent share"]
    memory = False
    if state_budget is not None:
        # The default recipe's state depends on the shapes alone, not on any timing: every worker agrees.
        default_state = stage1.baseline(build_menus(bench, weights, floor=floor)).state_bytes
        memory = state_budget < default_state
        if not memory:
            notes.append(
                f"--state-memory-budget {format_bytes(state_budget)} is not below the default's Muon state "
                f"{format_bytes(default_state)}: no constraint"
            )
    implicit = target_alignment is None and time_budget_s is None

    def prepare(bench: BenchResult) -> tuple[list[LayerMenu], stage1.Assignment, list[stage1.Assignment]]:
        """Menus, the default and the exact seeds from one bench (the study's: see below)."""
        menus = build_menus(bench, weights, floor=floor, memory=memory)
        base = stage1.baseline(menus)
        if memory:
            assert state_budget is not None
            check_state_budget(bench, weights, menus, state_budget, floor)
        target = target_alignment if target_alignment is not None else base.quality
        exact = [base, *stage1.lagrangian_hull(menus), stage1.fastest_per_layer(menus, target)]
        if memory:
            assert state_budget is not None
            exact += stage1.memory_seeds(menus, state_budget, [base, exact[-1]])
        return menus, base, exact

    menus, base, exact = prepare(bench)
    # A separate study under a budget: its objectives differ (state is the third), and it serves every budget.
    name = f"{study_name}-ortho" + ("-memory" if memory else "")
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(8, trials // 4 or 8)))

    def on_create(study: optuna.Study) -> None:
        # The bench is measured, so two workers (or a re-bench) get different timings and menus: the study
        # keeps the one it was created with, and every worker searches and decides with that one.
        put_blob(study, "bench", finite_or_null(bench.to_json()))  # as the file holds it: strict JSON
        stage1.seed_trials(study, menus, exact, memory)

    study = open_study(
        storage,
        name,
        fingerprint=fingerprint,
        model=model,
        stage="ortho-memory" if memory else "ortho",
        key={
            **(key or {}),
            "--min-layer-alignment": floor,
            "bench candidates": sorted({c.label for c in bench.costs}),
            "bench layers": sorted(str(layer["name"]) for layer in bench.layers),
        },
        directions=["minimize", "maximize", "minimize"] if memory else ["minimize", "maximize"],
        sampler=sampler,
        on_create=on_create,
    )
    # (finite_or_null also mends a bench stored by an older muonprof with NaN/inf in it: JSON's null, as on disk)
    stored = finite_or_null(get_blob(study, "bench"))
    adopted = False
    if stored is not None and stored != json.loads(json.dumps(finite_or_null(bench.to_json()))):
        bench = BenchResult.from_json(stored, f"the bench stored in study {name}")
        menus, base, exact = prepare(bench)
        adopted = True
    stage1.seed_trials(study, menus, exact, memory)  # a study made by an older muonprof may lack them
    if implicit:
        target_alignment = base.quality
        notes.append(f"target: the default's descent share {base.quality:.4f}")
    ran = run_until(study, stage1.objective(menus, memory), trials, on_trial=on_trial) if trials > 0 else 0
    evaluated = [a for t in finished_trials(study) if (a := stage1.trial_assignment(menus, t)) is not None]
    pool = exact + evaluated
    budget = state_budget if memory else None
    front = stage1.pareto_set([a for a in pool if budget is None or a.state_bytes <= budget])
    try:
        choice = stage1.select(
            front, target_alignment=target_alignment, time_budget_s=time_budget_s, state_budget=budget
        )
    except TuneError:
        if not (memory and implicit and front):
            raise
        choice = stage1.most_aligned(front)
        notes.append(
            f"the default's descent share {base.quality:.4f} is out of reach within the memory budget: "
            f"took the most aligned profile within it ({choice.quality:.4f})"
        )
    return Stage1Result(menus, base, choice, front, evaluated, name, ran, notes, state_budget, bench, adopted)


def check_state_budget(
    bench: BenchResult, weights: Mapping[str, float] | None, menus: Sequence[LayerMenu], budget: int, floor: float
) -> None:
    """A TuneError (one line) when ``budget`` is below the least Muon state the menus allow, naming it."""
    least = stage1.min_state_bytes(menus)
    if budget >= least:
        return
    hints = []
    if not any(c.config.method == MOMENTUM_RANK for c in bench.costs):
        hints.append("the bench file has no momentum_rank candidates: bench with --methods including momentum_rank")
    elif floor > 0:
        unfloored = stage1.min_state_bytes(build_menus(bench, weights, floor=0.0, memory=True))
        if unfloored < least:
            hints.append(f"{format_bytes(unfloored)} with a lower --min-layer-alignment than {floor:g}")
    smaller_ranks = "; smaller --ranks go lower" if not hints else ""
    raise TuneError(
        f"--state-memory-budget {format_bytes(budget)} ({budget} bytes) is below the minimum Muon state the "
        f"benched candidates allow: {format_bytes(least)} ({least} bytes)"
        + (f" ({'; '.join(hints)})" if hints else smaller_ranks)
    )


def tune_stage2(
    build: Callable[[], Workload],
    menus: Sequence[LayerMenu],
    picks: Mapping[str, Any],
    *,
    storage: str,
    study_name: str,
    fingerprint: str,
    model: str,
    trials: int,
    steps: int,
    eval_every: int,
    seed: int,
    pruner: str = "median",
    on_trial: TrialCallback | None = None,
    on_step: Callable[[int], None] | None = None,
    key: Mapping[str, Any] | None = None,
) -> Stage2Result:
    """Short real training trials over the LR space (``stage2``); the default settings' trial is queued first
    (by the worker that creates the study) and again on any later run that finds it lost (see
    ``study.ensure_enqueued``). ``key``: the inputs that define the runs (data, batch size, ...), for the
    study's key (see ``study.open_study``)."""
    groups, lowrank = stage2.search_space(menus, picks)
    name = f"{study_name}-lr"
    chosen_pruner: optuna.pruners.BasePruner = (
        optuna.pruners.HyperbandPruner(min_resource=eval_every, max_resource=steps)
        if pruner == "hyperband"
        else optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=eval_every)
    )
    digest = hashlib.sha256(repr(sorted((k, str(v)) for k, v in picks.items())).encode()).hexdigest()[:12]
    defaults = stage2.default_params(groups, lowrank)
    study = open_study(
        storage,
        name,
        fingerprint=fingerprint,
        model=model,
        stage=f"lr:{digest}:{steps}",
        key={**(key or {}), "--lr-steps": steps, "--eval-every": eval_every, "--pruner": pruner, "--seed": seed},
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(8, max(2, trials // 3))),
        pruner=chosen_pruner,
        on_create=lambda study: ensure_enqueued(study, defaults, DEFAULT_TRIAL),
    )
    # The default settings' trial, again if Ctrl-C (FAIL) or SIGKILL (stale RUNNING) lost it: the result
    # compares against it, so it is never left out.
    ensure_enqueued(study, defaults, DEFAULT_TRIAL)
    objective = stage2.make_objective(build, menus, picks, steps=steps, eval_every=eval_every, seed=seed,
                                      on_step=on_step)  # fmt: skip
    ran = run_until(study, objective, trials, on_trial=on_trial)
    done = [t for t in finished_trials(study) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise TuneError("every learning-rate trial diverged or was pruned; try more --lr-trials or --lr-steps")
    best = min(done, key=lambda t: t.value)
    default_trials = [t for t in done if t.params == defaults]
    choice = stage2.choice_of(best)
    return Stage2Result(
        choice=choice,
        scales=choice.scales(menus, picks),
        best_value=float(best.value),
        default_value=float(default_trials[0].value) if default_trials else None,
        study_name=name,
        trials_run=ran,
        pruned=sum(1 for t in finished_trials(study) if t.state == optuna.trial.TrialState.PRUNED),
        finished=len(finished_trials(study)),
    )
