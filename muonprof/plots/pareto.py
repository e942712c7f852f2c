"""Pareto fronts of a bench result: per role, time per step (log) vs alignment, the default marked."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from . import save_figure


def plot_pareto(result: Any, path: str | os.PathLike[str]) -> Path:
    """One panel per role: every candidate (grey), the Pareto front (line), the default (red star)."""
    roles = list(result.fronts.get("roles", {}))
    baseline = result.summary.get("baseline")
    cols = min(3, max(1, len(roles)))
    rows = max(1, math.ceil(len(roles) / cols))

    def draw(fig: Any) -> None:
        for i, role in enumerate(roles or ["(no roles)"]):
            ax = fig.add_subplot(rows, cols, i + 1)
            points = result.fronts.get("role_points", {}).get(role, [])
            front = result.fronts.get("roles", {}).get(role, [])
            if points:
                ax.scatter([p["time_s"] for p in points], [p["alignment"] for p in points], s=10, c="0.7", label="all")
            if front:
                ax.plot([p["time_s"] for p in front], [p["alignment"] for p in front], "o-", ms=4, label="Pareto front")
                for p in front:
                    ax.annotate(p["label"], (p["time_s"], p["alignment"]), fontsize=5, alpha=0.8)
            base = [p for p in points if p["label"] == baseline]
            if base:
                ax.scatter([base[0]["time_s"]], [base[0]["alignment"]], marker="*", s=120, c="red", label=baseline)
            if points:
                ax.set_xscale("log")
            ax.set_title(role, fontsize=9)
            ax.set_xlabel("time per step (s, log)", fontsize=8)
            ax.set_ylabel("alignment (worst seed, mean over layers)", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
            if i == 0:
                ax.legend(fontsize=6, loc="lower right")

    return save_figure(path, draw, size=(4.2 * cols, 3.4 * rows))
