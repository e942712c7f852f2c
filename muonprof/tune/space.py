"""Stage 1's search space: per layer, the orthogonalizers worth choosing between, with cost and quality.

Every number comes from the bench artifact (time per layer per step on this device; alignment on the
layer's captured momentum spectrum, worst over sketch seeds, or, where bench had a gradient window, the
multi-step alignment over it, ``bench.multistep``) — nothing here measures anything.

Quality of a whole profile is the *descent share*: Muon's first-order loss decrease in one step is
``sum_L lr f_L <G_L, O_L>`` (``f_L`` the layer's LR-rule factor) and ``<G, O> = alignment x ||G||_* x
||O||_op``, so with the update's operator norm ~1 the model-level fraction of the exact-polar descent
is the alignment averaged with weights ``w_L = f_L ||M_L||_*``. That is what a bad layer costs the
optimizer: a poorly orthogonalized layer with a tiny gradient matters little, one carrying most of the
nuclear norm matters a lot. The worst layer's alignment is reported beside it, and a per-layer floor
keeps any single layer from being starved.

Optimizer state is a third axis, used only under ``--state-memory-budget`` (``memory=True``): each option
carries the Muon state bytes its layer would hold (``optim.state_memory``), every orthogonalizer the
full momentum buffer, a ``momentum_rank`` candidate (LiMuon's low-rank momentum) its factors. Without a
budget the low-rank momenta are left out of the menus altogether: they change the optimizer's state, not
just its orthogonalizer, and their bench accuracy is the single-step figure (see ``bench.accuracy``), so
they are chosen only when memory is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..bench.artifact import BenchResult
from ..bench.candidates import BASELINE, MOMENTUM_RANK, Candidate, candidate_label
from ..bench.pareto import Point, layer_points, pareto_front
from ..ortho import OrthoConfig

BASELINE_LABEL = candidate_label(BASELINE)


def same_polynomial(config: Candidate) -> bool:
    """The default recipe's math (Jordan's quintic, 5 steps; plain Newton-Schulz or its Gram form) in any dtype:
    only rounding differs from the baseline, so no spectral model has to be right for it to train alike."""
    return (
        isinstance(config, OrthoConfig)
        and config.method == "newton_schulz"
        and config.coefficients == BASELINE.coefficients
        and config.ns_steps == BASELINE.ns_steps
        and config.eps == BASELINE.eps
    )


class TuneError(ValueError):
    """Inputs that cannot be tuned (mismatched bench and model, unreachable target, ...); one line."""


@dataclass(frozen=True)
class Option:
    """One candidate on one layer."""

    label: str
    config: Candidate  # an OrthoConfig, or a MomentumRank (low-rank momentum)
    time_s: float
    alignment: float  # worst over sketch seeds
    rel_err: float | None = None
    sv_min: float | None = None
    sv_max: float | None = None
    source: str | None = None
    state_bytes: int = 0  # the layer's Muon optimizer state under this option (float32)
    one_step_alignment: float | None = None  # the one-step figure (``alignment`` is the multi-step one where
    # bench had a gradient window: see ``bench.pareto.layer_points``)


@dataclass
class LayerMenu:
    """A layer's choices: its Pareto-optimal candidates (fastest first), always including the baseline."""

    name: str
    shape: tuple[int, int]
    role: str
    weight: float
    options: list[Option]
    # Kept for the race but not searched by stage 1: the fastest option with the baseline's polynomial when it
    # is not on the front (see ``same_polynomial``).
    reserve: list[Option] = field(default_factory=list)

    def option(self, label: str) -> Option:
        for o in [*self.options, *self.reserve]:
            if o.label == label:
                return o
        raise KeyError(f"{self.name}: no option {label!r}")

    @property
    def labels(self) -> list[str]:
        return [o.label for o in self.options]

    @property
    def min_state_bytes(self) -> int:
        return min(o.state_bytes for o in self.options)


def build_menus(
    bench: BenchResult,
    weights: Mapping[str, float] | None = None,
    *,
    floor: float = 0.0,
    allowed: set[str] | None = None,
    memory: bool = False,
) -> list[LayerMenu]:
    """Menus for every benched layer: the layer's time/alignment Pareto front among candidates that were
    both timed and measured, above ``floor`` alignment, plus the baseline (Jordan x5 bf16) if it was timed; in
    ``reserve``, the fastest option with the baseline's polynomial (``same_polynomial``) if it is not among them.

    Dominated candidates are dropped: no profile that uses one can be better than the same profile with
    the dominating candidate in its place, so the joint search loses nothing and shrinks a lot. With
    ``memory`` the low-rank-momentum candidates join and the front is taken over (time, alignment, state
    bytes): a candidate stays unless another is at least as fast, as aligned and as small, and better in
    one; without it they are left out (see the module docstring).
    """
    configs = {c.label: c.config for c in bench.costs}
    per_shape = bench.per_layer_costs()
    per_state = bench.per_layer_state()
    menus: list[LayerMenu] = []
    for layer in bench.layers:
        name = str(layer["name"])
        shape = (int(layer["matrix_shape"][0]), int(layer["matrix_shape"][1]))
        costs = per_shape.get(shape, {})
        if allowed is not None:
            costs = {k: v for k, v in costs.items() if k in allowed or k == BASELINE_LABEL}
        if not memory:
            costs = {k: v for k, v in costs.items() if configs[k].method != MOMENTUM_RANK}
        points = layer_points(bench.accuracy.get(name, {}), costs, per_state.get(shape, {}))
        if not points:
            raise TuneError(f"bench has no timed and measured candidate for layer {name!r}")
        eligible = [p for p in points if p.alignment >= floor]
        front = (front_3d(eligible) if memory else pareto_front(eligible)) if eligible else []
        baseline = [p for p in points if p.label == BASELINE_LABEL]
        chosen: dict[str, Point] = {p.label: p for p in front + baseline}
        if not chosen:  # nothing reaches the floor and no baseline: keep the most aligned
            best = max(points, key=lambda p: (p.alignment, -p.time_s))
            chosen[best.label] = best
        options = [_option(p, configs[p.label]) for p in sorted(chosen.values(), key=lambda p: (p.time_s, p.label))]
        # The fastest option with the baseline's polynomial, dominated or not: the race's same-math contender
        # (``stage1.same_math``) is built from it; stage 1 does not search it (it is off the front by construction).
        same = [p for p in points if same_polynomial(configs[p.label])]
        fastest = min(same, key=lambda p: (p.time_s, p.label)) if same else None
        reserve = [_option(fastest, configs[fastest.label])] if fastest and fastest.label not in chosen else []
        weight = 1.0 if weights is None else float(weights.get(name, 0.0))
        menus.append(LayerMenu(name, shape, str(layer.get("role", "linear")), weight, options, reserve))
    if weights is not None and sum(m.weight for m in menus) <= 0:
        for menu in menus:
            menu.weight = 1.0
    return menus


def front_3d(points: list[Point]) -> list[Point]:
    """Points not dominated in (time down, alignment up, state bytes down); exact ties are all kept."""

    def state(p: Point) -> int:
        return int((p.extra or {}).get("state_bytes", 0))

    def dominates(a: Point, b: Point) -> bool:
        no_worse = a.time_s <= b.time_s and a.alignment >= b.alignment and state(a) <= state(b)
        better = a.time_s < b.time_s or a.alignment > b.alignment or state(a) < state(b)
        return no_worse and better

    return [p for p in points if not any(dominates(q, p) for q in points)]


def _option(p: Point, config: Candidate) -> Option:
    extra = dict(p.extra or {})
    return Option(
        label=p.label,
        config=config,
        time_s=p.time_s,
        alignment=p.alignment,
        rel_err=extra.get("rel_err"),
        sv_min=extra.get("sv_min"),
        sv_max=extra.get("sv_max"),
        source=extra.get("source"),
        state_bytes=int(extra.get("state_bytes", 0)),
        one_step_alignment=extra.get("one_step_alignment", p.alignment),
    )
