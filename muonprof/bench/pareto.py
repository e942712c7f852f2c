"""Pareto fronts of time vs alignment, and the whole-model comparison the report quotes.

A candidate is on the front when no other candidate is at least as fast and at least as aligned, and
strictly better in one of the two (weak dominance: Newton-Schulz schedules with the same step count
share one timing, so "strictly faster and strictly more aligned" would keep every tied schedule).
Decisions use the *worst* alignment over sketch seeds: a randomized method must reach the target on a
bad draw too, not only on average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TARGET_ALIGNMENT = 0.95


@dataclass(frozen=True)
class Point:
    """One candidate on one layer (or role): time per optimizer step and its alignment."""

    label: str
    time_s: float
    alignment: float
    extra: Mapping[str, Any] | None = None


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as good as ``b`` in both, better in one."""
    return a.time_s <= b.time_s and a.alignment >= b.alignment and (a.time_s < b.time_s or a.alignment > b.alignment)


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The non-dominated points, fastest first (O(n log n): sort by time, keep rising alignment)."""
    ordered = sorted(points, key=lambda p: (p.time_s, -p.alignment))
    front: list[Point] = []
    best = float("-inf")
    for p in ordered:
        if p.alignment > best:
            front.append(p)
            best = p.alignment
        elif front and p.alignment == front[-1].alignment and p.time_s == front[-1].time_s:
            front.append(p)  # an exact tie with a front point is not dominated by it
    return front


def fastest_reaching(points: Sequence[Point], target: float = TARGET_ALIGNMENT) -> Point | None:
    """The fastest point with alignment >= ``target`` (ties: the more aligned), None if none reaches it."""
    ok = [p for p in points if p.alignment >= target]
    return min(ok, key=lambda p: (p.time_s, -p.alignment)) if ok else None


def _usable(measures: Mapping[str, Any] | None) -> bool:
    return bool(measures) and "alignment" in measures  # type: ignore[operator]


def layer_points(
    accuracy: Mapping[str, Mapping[str, Any]],
    costs: Mapping[str, float],
    state: Mapping[str, int] | None = None,
) -> list[Point]:
    """One layer's points: candidates with both a time (label -> per-layer seconds) and measures.

    A point's quality is the candidate's ``multistep_alignment`` where bench measured one (a gradient window
    was captured: what error feedback and subset are for shows only over many steps), else its one-step
    alignment (worst over seeds); ``extra`` keeps the one-step figure as ``one_step_alignment`` either way.
    ``state`` (label -> the layer's Muon optimizer-state bytes under that candidate) goes to ``extra``."""
    points = []
    for label, m in accuracy.items():
        if label in costs and _usable(m):
            one_step = m.get("alignment_worst", m["alignment"])
            multistep = m.get("multistep_alignment")
            extra = {
                "one_step_alignment": one_step,
                "alignment_mean": m["alignment"],
                "rel_err": m["rel_err"],
                "sv_min": m["sv_min"],
                "sv_max": m["sv_max"],
                "source": m["source"],
            }
            if multistep is not None:
                extra["multistep_alignment"] = multistep
                extra["quality"] = "multistep_alignment"
            if state is not None and label in state:
                extra["state_bytes"] = int(state[label])
            points.append(Point(label, costs[label], multistep if multistep is not None else one_step, extra))
    return points


def role_points(per_layer: Sequence[Sequence[Point]]) -> list[Point]:
    """A role's points: candidates usable on *every* layer of the role, applied to all of them.

    Time is the sum over the layers (per optimizer step); alignment the mean of the layers' worst-seed
    alignments; ``extra`` holds the worst over layers and seeds, the mean rel_err, the sv range and the
    role's total optimizer-state bytes (when the layers' points carry them).
    """
    if not per_layer:
        return []
    tables = [{p.label: p for p in points} for points in per_layer]
    common = set(tables[0]).intersection(*tables[1:])
    out = []
    for label in sorted(common):
        ps = [t[label] for t in tables]
        extras = [p.extra or {} for p in ps]
        out.append(
            Point(
                label,
                sum(p.time_s for p in ps),
                sum(p.alignment for p in ps) / len(ps),
                {
                    "alignment_worst": min(p.alignment for p in ps),
                    "rel_err": sum(e.get("rel_err", 0.0) for e in extras) / len(ps),
                    "sv_min": min(e.get("sv_min", 0.0) for e in extras),
                    "sv_max": max(e.get("sv_max", 0.0) for e in extras),
                    "layers": len(ps),
                    **(
                        {"state_bytes": sum(int(e["state_bytes"]) for e in extras)}
                        if all("state_bytes" in e for e in extras)
                        else {}
                    ),
                },
            )
        )
    return out


def _has_state(p: Point) -> bool:
    return p.extra is not None and "state_bytes" in p.extra


def state_front(points: Sequence[Point]) -> list[Point]:
    """The points not dominated in (optimizer-state bytes down, alignment up), least state first.

    Points without ``state_bytes`` in ``extra`` are left out. Among candidates that keep the full momentum
    (every orthogonalizer) only the most aligned survives; the rest are the low-rank momenta worth their
    bytes."""
    by_label = {p.label: p for p in points}
    proxies = [Point(p.label, float(p.extra["state_bytes"]), p.alignment) for p in points if _has_state(p)]
    return [by_label[p.label] for p in pareto_front(proxies)]


def point_json(p: Point) -> dict[str, Any]:
    return {"label": p.label, "time_s": p.time_s, "alignment": p.alignment, **(p.extra or {})}


def model_summary(
    per_layer: Mapping[str, Sequence[Point]], baseline: str, target: float = TARGET_ALIGNMENT
) -> dict[str, Any]:
    """Per-step time of ``baseline`` everywhere vs the fastest candidate reaching ``target`` per layer.

    A layer where nothing reaches the target keeps its most aligned candidate (listed in ``short_of_target``).
    On accelerators a per-layer mix breaks same-shape batching, so the tuned figure (sum of per-layer
    shares of batched calls) is optimistic there; on CPU, where ProfiledMuon runs one matrix at a time,
    it is exact.

    Optimizer state (when the points carry ``state_bytes``): ``default_state_bytes`` is the Muon state of
    the benched layers under the baseline (the full momentum everywhere), ``tuned_state_bytes`` under the
    fastest-reaching choices, ``min_state_bytes`` the least any benched candidate allows per layer (what
    ``tune --state-memory-budget`` can go down to).
    """
    default_s = 0.0
    tuned_s = 0.0
    choices: dict[str, dict[str, Any]] = {}
    short: list[str] = []
    missing_baseline: list[str] = []
    base_align: list[float] = []
    state: dict[str, int | None] = {"default": 0, "tuned": 0, "min": 0}

    def state_of(p: Point | None, key: str) -> None:
        value = (p.extra or {}).get("state_bytes") if p is not None else None
        current = state[key]
        state[key] = None if value is None or current is None else current + int(value)

    for name, points in per_layer.items():
        by_label = {p.label: p for p in points}
        if baseline in by_label:
            default_s += by_label[baseline].time_s
            base_align.append(by_label[baseline].alignment)
        else:
            missing_baseline.append(name)
        state_of(by_label.get(baseline), "default")
        if points:
            state_of(min(points, key=lambda p: (p.extra or {}).get("state_bytes", math.inf)), "min")
        pick = fastest_reaching(points, target)
        if pick is None and points:
            pick = max(points, key=lambda p: (p.alignment, -p.time_s))
            short.append(name)
        state_of(pick, "tuned")
        if pick is not None:
            tuned_s += pick.time_s
            choices[name] = {"label": pick.label, "time_s": pick.time_s, "alignment": pick.alignment}
            if "state_bytes" in (pick.extra or {}):
                choices[name]["state_bytes"] = int(pick.extra["state_bytes"])  # type: ignore[index]
    ok = not missing_baseline and tuned_s > 0
    return {
        "baseline": baseline,
        "target_alignment": target,
        "default_step_s": default_s if not missing_baseline else None,
        "default_alignment_mean": sum(base_align) / len(base_align) if base_align else None,
        "tuned_step_s": tuned_s,
        "tuned_alignment_mean": (sum(c["alignment"] for c in choices.values()) / len(choices) if choices else None),
        "speedup": default_s / tuned_s if ok else None,
        "choices": choices,
        "short_of_target": short,
        "baseline_missing": missing_baseline,
        "default_state_bytes": state["default"] if per_layer else None,
        "tuned_state_bytes": state["tuned"] if per_layer else None,
        "min_state_bytes": state["min"] if per_layer else None,
    }


def derive_fronts(
    layers: Sequence[Mapping[str, Any]],
    accuracy: Mapping[str, Mapping[str, Mapping[str, Any]]],
    per_shape_costs: Mapping[tuple[int, int], Mapping[str, float]],
    per_shape_state: Mapping[tuple[int, int], Mapping[str, int]],
    baseline: str,
    target: float = TARGET_ALIGNMENT,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fronts, summary) of a bench from its layers, accuracy and per-shape costs and state.

    ``fronts`` holds per layer and per role the time/alignment front, ``role_points`` every role point and
    ``roles_state`` per role the optimizer-state/alignment front; every point carries ``state_bytes``. Pure
    on plain data, so a fresh bench and the bench/1 -> bench/2 migration derive the same numbers."""
    points = {
        layer["name"]: layer_points(
            accuracy.get(layer["name"], {}),
            per_shape_costs.get(tuple(layer["matrix_shape"]), {}),  # type: ignore[arg-type]
            per_shape_state.get(tuple(layer["matrix_shape"]), {}),  # type: ignore[arg-type]
        )
        for layer in layers
    }
    roles: dict[str, list[str]] = {}
    for layer in layers:
        roles.setdefault(layer["role"], []).append(layer["name"])
    role_pts = {role: role_points([points[n] for n in names]) for role, names in roles.items()}
    fronts = {
        "layers": {name: [point_json(p) for p in pareto_front(pts)] for name, pts in points.items()},
        "roles": {role: [point_json(p) for p in pareto_front(pts)] for role, pts in role_pts.items()},
        "role_points": {role: [point_json(p) for p in pts] for role, pts in role_pts.items()},
        "roles_state": {role: [point_json(p) for p in state_front(pts)] for role, pts in role_pts.items()},
    }
    return fronts, model_summary(points, baseline, target)
