"""The stage-1 figure: every evaluated profile, the Pareto front, the baseline and the choice."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import save_figure


def plot_front(stage1: Any, path: str | os.PathLike[str]) -> Path:
    """Time per optimizer step (log x) against descent share, from a ``Stage1Result``."""

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        evaluated = stage1.evaluated
        if evaluated:
            ax.scatter([a.time_s * 1e3 for a in evaluated], [a.quality for a in evaluated], s=6, color="0.7",
                       label=f"Optuna trials ({len(evaluated)})")  # fmt: skip
        front = stage1.front
        ax.plot([a.time_s * 1e3 for a in front], [a.quality for a in front], "o-", color="tab:blue", markersize=3,
                label=f"Pareto front ({len(front)})")  # fmt: skip
        base, choice = stage1.baseline, stage1.choice
        ax.scatter([base.time_s * 1e3], [base.quality], marker="s", s=60, color="tab:red", zorder=5,
                   label="default (Jordan x5 bf16)")  # fmt: skip
        ax.scatter([choice.time_s * 1e3], [choice.quality], marker="*", s=160, color="tab:green", zorder=6,
                   label=f"chosen ({base.time_s / choice.time_s:.2f}x faster)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("orthogonalization time per optimizer step (ms, this device)")
        ax.set_ylabel("descent share (nuclear-weighted alignment)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title("muonprof tune, stage 1")

    return save_figure(path, draw, size=(8, 5.5))
