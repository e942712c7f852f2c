"""Stage 1: choose each layer's orthogonalizer for the whole model's time / quality trade-off.

The problem: pick one option per layer, minimize total time per step, maximize the weighted alignment
(``space``'s descent share). With a *per-layer* target ("every layer at least a") the layers are
independent and each takes its fastest option reaching ``a``: ``fastest_per_layer`` solves it exactly,
no search. With a shared target or budget on the *model's* quality or time, the layers are coupled:
that is a multiple-choice knapsack. Its convex-hull solutions are exact and cheap (Lagrangian
relaxation: for a multiplier lambda every layer independently minimizes ``t - lambda w a``;
``lagrangian_hull``), but the best profiles between two hull points are not on the hull, and that joint
remainder is what the Optuna study searches (NSGA-II over the per-layer choices, multi-objective). The
study is seeded with the baseline (Jordan x5 bf16 everywhere) and every hull solution, so its Pareto set
can never be worse than either, and a user's storage keeps every evaluated profile.

A budget on the Muon optimizer state (``--state-memory-budget``) adds a knapsack constraint: the sum of
the layers' state bytes must stay within it. ``fit_state`` meets it the Lagrangian way with a second
multiplier (see there), ``memory_seeds`` applies it to every hull profile, and the study turns
three-objective (time, descent share, state bytes) so its Pareto set spans all memory levels; the pick
is then made among the profiles within the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from ..interrupts import raise_if_interrupted
from .space import BASELINE_LABEL, LayerMenu, Option, TuneError, same_polynomial

PARAM_PREFIX = "ortho:"


@dataclass(frozen=True)
class Assignment:
    """A choice per layer and what it scores."""

    picks: dict[str, str]  # layer -> option label
    time_s: float
    quality: float  # weighted alignment (descent share)
    worst: float  # the worst layer's alignment
    source: str = ""  # "baseline" | "hull" | "optuna trial N" | "per-layer"
    state_bytes: int = 0  # Muon optimizer state of the benched layers under these picks

    def to_json(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "quality": self.quality,
            "worst_alignment": self.worst,
            "state_bytes": self.state_bytes,
            "source": self.source,
            "picks": self.picks,
        }


def evaluate(menus: Sequence[LayerMenu], picks: dict[str, str], source: str = "") -> Assignment:
    """Total time per step (costs are additive: see ``time_model``) and the weighted / worst alignment."""
    total_w = sum(m.weight for m in menus) or 1.0
    time_s = 0.0
    quality = 0.0
    worst = 1.0
    state = 0
    for menu in menus:
        option = menu.option(picks[menu.name])
        time_s += option.time_s
        quality += menu.weight * option.alignment
        worst = min(worst, option.alignment)
        state += option.state_bytes
    return Assignment(dict(picks), time_s, quality / total_w, worst, source, state)


def time_model_note(batch_per_call: int) -> str:
    """Why the model-level time is a sum of per-layer times, and when that is optimistic."""
    if batch_per_call <= 1:
        return "per-layer times add up exactly: ProfiledMuon orthogonalizes one matrix at a time on this device"
    return (
        "per-layer times are shares of batched calls; a profile that splits a same-shape batch between methods "
        "pays more launches than the sum says (validate measures the real step)"
    )


def baseline(menus: Sequence[LayerMenu]) -> Assignment:
    missing = [m.name for m in menus if BASELINE_LABEL not in m.labels]
    if missing:
        raise TuneError(f"the bench file did not time the baseline {BASELINE_LABEL} for {', '.join(missing[:3])}")
    return evaluate(menus, {m.name: BASELINE_LABEL for m in menus}, "baseline")


def same_math(menus: Sequence[LayerMenu]) -> Assignment | None:
    """Every layer on its fastest option with the default recipe's polynomial (another dtype, the Gram form):
    the speedup that changes only rounding, which the spectral model cannot get wrong. None when that is the
    baseline itself or is predicted no faster."""
    base = baseline(menus)
    picks = {}
    for menu in menus:
        same = [o for o in [*menu.options, *menu.reserve] if same_polynomial(o.config)]
        picks[menu.name] = min(same, key=lambda o: (o.time_s, o.label)).label if same else BASELINE_LABEL
    found = evaluate(menus, picks, "same math")
    return None if found.picks == base.picks or found.time_s >= base.time_s else found


def fastest_per_layer(menus: Sequence[LayerMenu], target: float) -> Assignment:
    """Every layer at alignment >= target, each as fast as possible: exact, since layers are independent.
    A layer where nothing reaches the target takes its most aligned option (the result's ``worst`` says)."""
    picks = {}
    for menu in menus:
        ok = [o for o in menu.options if o.alignment >= target]
        pick = min(ok, key=lambda o: (o.time_s, -o.alignment)) if ok else max(menu.options, key=_most_aligned)
        picks[menu.name] = pick.label
    return evaluate(menus, picks, f"per-layer >= {target:g}")


def lagrangian_hull(menus: Sequence[LayerMenu], points: int = 64) -> list[Assignment]:
    """The convex-hull profiles: for each multiplier, every layer minimizes ``time - lambda * w * alignment``.

    The multipliers are exactly the breakpoints where some layer switches option (plus the two ends),
    thinned to ``points`` evenly spaced ones when there are more."""
    seen: dict[tuple[str, ...], Assignment] = {}
    for lam in multipliers(menus, points):
        picks = lagrangian_picks(menus, lam)
        key = tuple(picks[m.name] for m in menus)
        if key not in seen:
            seen[key] = evaluate(menus, picks, "hull")
    return sorted(seen.values(), key=lambda a: a.time_s)


def multipliers(menus: Sequence[LayerMenu], points: int = 64) -> list[float]:
    """The time-vs-quality multipliers of ``lagrangian_hull``: 0, the breakpoints (thinned), and one beyond."""
    breaks: set[float] = {0.0}
    for menu in menus:
        for a in menu.options:
            for b in menu.options:
                dq = menu.weight * (b.alignment - a.alignment)
                if dq > 0 and b.time_s > a.time_s:
                    breaks.add((b.time_s - a.time_s) / dq)
    ordered = sorted(breaks)
    if len(ordered) > points:
        step = (len(ordered) - 1) / (points - 1)
        ordered = [ordered[round(i * step)] for i in range(points)]
    ordered.append(ordered[-1] * 2 + 1.0)
    return ordered


def lagrangian_picks(menus: Sequence[LayerMenu], lam: float) -> dict[str, str]:
    """Every layer's option minimizing ``time - lam * w * alignment`` (ties: the faster)."""
    return {
        m.name: min(m.options, key=lambda o, m=m: (o.time_s - lam * m.weight * o.alignment, o.time_s)).label
        for m in menus
    }


def min_state_bytes(menus: Sequence[LayerMenu]) -> int:
    """The least Muon state any profile over ``menus`` can have: every layer at its smallest option."""
    return sum(m.min_state_bytes for m in menus)


def quality_multiplier(menus: Sequence[LayerMenu]) -> float:
    """A time-vs-quality multiplier so large that quality decides and time only breaks ties."""
    total_time = sum(max(o.time_s for o in m.options) for m in menus) or 1.0
    weights = [m.weight for m in menus if m.weight > 0]
    return 1e6 * total_time / (min(weights) if weights else 1.0)


def fit_state(
    menus: Sequence[LayerMenu], picks: dict[str, str], budget: int, *, lam: float, source: str = ""
) -> Assignment | None:
    """The profile nearest ``picks`` (in ``time - lam * w * alignment``) whose Muon state fits ``budget``.

    The Lagrangian with a second multiplier nu on bytes: each layer minimizes
    ``c(o) = time - lam * w * alignment + nu * state_bytes``. Raising nu from 0 switches layers to smaller
    options one at a time, in the order of their cost per byte saved, ``(c(new) - c(old)) / (bytes saved)``
    at lam; this walks that order greedily (which is the nu sweep along each layer's lower convex hull in
    (bytes, c)) and stops at the first profile within the budget. The last switch can overshoot, so a
    second pass takes back, best first, any single switch that lowers ``c`` and still fits. With a huge
    ``lam`` (``quality_multiplier``) ``c`` is the descent share, time breaking ties: the most aligned
    profile within the budget, up to the knapsack's integrality gap (at most one layer's switch).
    None when even the smallest options do not fit.
    """
    if min_state_bytes(menus) > budget:
        return None
    picks = dict(picks)

    def cost(menu: LayerMenu, o: Option) -> float:
        return o.time_s - lam * menu.weight * o.alignment

    total = sum(m.option(picks[m.name]).state_bytes for m in menus)
    while total > budget:
        best: tuple[tuple[float, float], LayerMenu, Option, int] | None = None
        for menu in menus:
            current = menu.option(picks[menu.name])
            for o in menu.options:
                saved = current.state_bytes - o.state_bytes
                if saved <= 0:
                    continue
                key = ((cost(menu, o) - cost(menu, current)) / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, menu, o, saved)
        assert best is not None  # the smallest options fit, so some switch saves bytes
        _, menu, o, saved = best
        picks[menu.name] = o.label
        total -= saved
    while True:  # take back what the last switch overshot: single switches that lower c and still fit
        best_gain: tuple[float, LayerMenu, Option, int] | None = None
        for menu in menus:
            current = menu.option(picks[menu.name])
            for o in menu.options:
                added = o.state_bytes - current.state_bytes
                gain = cost(menu, current) - cost(menu, o)
                fits = gain > 1e-15 * max(1.0, abs(cost(menu, current))) and total + added <= budget
                if fits and (best_gain is None or gain > best_gain[0]):
                    best_gain = (gain, menu, o, added)
        if best_gain is None:
            break
        _, menu, o, added = best_gain
        picks[menu.name] = o.label
        total += added
    return evaluate(menus, picks, source)


def memory_seeds(menus: Sequence[LayerMenu], budget: int, starts: Sequence[Assignment]) -> list[Assignment]:
    """Exact-ish profiles within ``budget``: every hull multiplier's profile fitted by ``fit_state`` at its own
    multiplier, the most aligned profile that fits, and each of ``starts`` (the baseline, the per-layer
    target) fitted with quality first. Duplicates collapsed; empty when the budget is below the minimum."""
    q = quality_multiplier(menus)
    out: dict[tuple[str, ...], Assignment] = {}

    def add(a: Assignment | None) -> None:
        if a is not None:
            out.setdefault(tuple(a.picks[m.name] for m in menus), a)

    for lam in [*multipliers(menus), q]:
        add(fit_state(menus, lagrangian_picks(menus, lam), budget, lam=lam, source="hull within memory"))
    for start in starts:
        add(fit_state(menus, start.picks, budget, lam=q, source=f"{start.source or 'seed'} within memory"))
    return sorted(out.values(), key=lambda a: a.time_s)


def _most_aligned(o: Option) -> tuple[float, float]:
    return (o.alignment, -o.time_s)


def values_of(result: Assignment, memory: bool) -> list[float]:
    """The study's objective values: time (ms) and descent share, plus the state in MiB with ``memory``."""
    values = [result.time_s * 1e3, result.quality]
    return [*values, result.state_bytes / 2**20] if memory else values


def objective(menus: Sequence[LayerMenu], memory: bool = False) -> Callable[[optuna.Trial], Sequence[float]]:
    def run(trial: optuna.Trial) -> Sequence[float]:
        raise_if_interrupted()
        picks = {m.name: trial.suggest_categorical(PARAM_PREFIX + m.name, m.labels) for m in menus}
        result = evaluate(menus, picks)
        trial.set_user_attr("worst_alignment", result.worst)
        return values_of(result, memory)

    return run


def seed_trials(
    study: optuna.Study, menus: Sequence[LayerMenu], seeds: Sequence[Assignment], memory: bool = False
) -> int:
    """Add the exact profiles (baseline, hull, per-layer target) to the study once, as finished trials.

    They are evaluated here, not queued: they cost nothing, must be in the result whatever ``--trials``
    says, and as finished trials they inform NSGA-II's population. They carry the ``seed`` attribute and
    do not count against the trial budget; a resumed or shared study already has them."""
    if study.user_attrs.get("stage1_seeded"):
        return 0
    distributions = {PARAM_PREFIX + m.name: optuna.distributions.CategoricalDistribution(m.labels) for m in menus}
    for assignment in seeds:
        study.add_trial(
            optuna.trial.create_trial(
                params={PARAM_PREFIX + name: label for name, label in assignment.picks.items()},
                distributions=distributions,
                values=values_of(assignment, memory),
                user_attrs={"seed": assignment.source, "worst_alignment": assignment.worst},
            )
        )
    study.set_user_attr("stage1_seeded", True)
    return len(seeds)


def trial_assignment(menus: Sequence[LayerMenu], trial: optuna.trial.FrozenTrial) -> Assignment | None:
    """The profile a finished trial evaluated (None when the menus changed since, e.g. another grid)."""
    try:
        picks = {m.name: trial.params[PARAM_PREFIX + m.name] for m in menus}
        return evaluate(menus, picks, f"optuna trial {trial.number}")
    except KeyError:
        return None


def pareto_set(assignments: Sequence[Assignment]) -> list[Assignment]:
    """Non-dominated (time down, quality up), fastest first; exact duplicates collapsed."""
    ordered = sorted(assignments, key=lambda a: (a.time_s, -a.quality))
    out: list[Assignment] = []
    best = float("-inf")
    for a in ordered:
        if a.quality > best + 1e-12:
            out.append(a)
            best = a.quality
    return out


def select(
    candidates: Sequence[Assignment],
    *,
    target_alignment: float | None = None,
    time_budget_s: float | None = None,
    state_budget: int | None = None,
) -> Assignment:
    """The profile the user asked for: the fastest reaching the target quality, or the best within the budget.

    ``state_budget`` (bytes of Muon state) first narrows the candidates to those within it. An unreachable
    request is a TuneError that names the best reachable value."""
    if not candidates:
        raise TuneError("no evaluated profile to choose from")
    if state_budget is not None:
        fitting = [a for a in candidates if a.state_bytes <= state_budget]
        if not fitting:
            least = min(candidates, key=lambda a: a.state_bytes)
            raise TuneError(
                f"no profile fits --state-memory-budget {_bytes(state_budget)}: the smallest evaluated holds "
                f"{_bytes(least.state_bytes)} of Muon state"
            )
        candidates = fitting
    within_memory = "" if state_budget is None else f" within --state-memory-budget {_bytes(state_budget)}"
    if time_budget_s is not None:
        within = [a for a in candidates if a.time_s <= time_budget_s]
        if not within:
            fastest = min(candidates, key=lambda a: a.time_s)
            raise TuneError(
                f"no profile fits --time-budget-ms {time_budget_s * 1e3:.4g}{within_memory}: the fastest takes "
                f"{fastest.time_s * 1e3:.4g} ms per step (alignment {fastest.quality:.3f})"
            )
        return max(within, key=lambda a: (a.quality, -a.time_s))
    target = 0.95 if target_alignment is None else target_alignment
    reaching = [a for a in candidates if a.quality >= target]
    if not reaching:
        best = max(candidates, key=lambda a: a.quality)
        raise TuneError(
            f"no profile reaches --target-alignment {target:g}{within_memory}: the best reachable is "
            f"{best.quality:.4f} ({best.time_s * 1e3:.4g} ms per step)"
        )
    return min(reaching, key=lambda a: (a.time_s, -a.quality))


def most_aligned(candidates: Sequence[Assignment]) -> Assignment:
    """The highest descent share (ties: the faster)."""
    return max(candidates, key=lambda a: (a.quality, -a.time_s))


def _bytes(count: int) -> str:
    from ..optim.state_memory import format_bytes

    return f"{format_bytes(count)} ({count} bytes)"
