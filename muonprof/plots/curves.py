"""``muonprof validate --plot``: loss against step (left) and against training wall-clock (right).

One colour per contender; validation loss as a solid line with markers at the eval points, training loss
faint behind it. With several seeds the line is the mean over seeds and the band their min..max (on the
wall-clock panel the x position is the mean wall time of that eval point over seeds).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

COLOURS = {"profile": "tab:red", "default": "tab:blue", "torch": "tab:green", "adamw": "tab:orange"}
STYLES = {"torch": "--"}  # torch and default train almost identically: dashed, so both stay visible


def plot_curves(result: Any, path: str | os.PathLike[str]) -> Path:
    """Draw ``result`` (a ``muonprof.validate.ValidationResult``) into a PNG at ``path``."""
    from . import save_figure

    def draw(fig: Any) -> None:
        by_step, by_wall = fig.subplots(1, 2)
        for name, contender in result.contenders.items():
            runs = list(contender.runs.values())
            if not runs:
                continue
            colour = COLOURS.get(name)
            label = name + ("" if not contender.diverged else f" ({contender.status})")
            _train_curves(by_step, by_wall, runs, colour)
            _val_curves(by_step, by_wall, runs, colour, label, STYLES.get(name, "-"))
        seeds = len(result.seeds)
        spec = result.meta.get("model", {}).get("spec", "")
        suffix = f", {seeds} seeds (mean, min..max band)" if seeds > 1 else ""
        by_step.set_title(f"{spec}: loss vs step{suffix}")
        by_wall.set_title("loss vs training wall-clock (eval time excluded)")
        by_step.set_xlabel("step")
        by_wall.set_xlabel("training time (s)")
        for ax in (by_step, by_wall):
            ax.set_ylabel("loss (val solid, train faint)")
            ax.grid(alpha=0.3)
        by_step.legend(loc="upper right", fontsize=8)

    return save_figure(path, draw, size=(12, 4.5))


def _train_curves(by_step: Any, by_wall: Any, runs: list[Any], colour: str | None) -> None:
    for r in runs:
        n = len(r.wall_s)
        steps = list(range(1, n + 1))
        by_step.plot(steps, r.train_losses[:n], color=colour, alpha=0.18, linewidth=0.8)
        by_wall.plot(r.wall_s, r.train_losses[:n], color=colour, alpha=0.18, linewidth=0.8)


def _val_curves(
    by_step: Any, by_wall: Any, runs: list[Any], colour: str | None, label: str, linestyle: str = "-"
) -> None:
    # Eval points shared by every seed (diverged or budget-stopped runs may have fewer).
    per_run = [{e.step: e for e in r.evals if e.val_loss is not None} for r in runs]
    common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    if not common:
        return
    mean = [sum(p[s].val_loss for p in per_run) / len(per_run) for s in common]
    wall = [sum(p[s].wall_s for p in per_run) / len(per_run) for s in common]
    style = {"color": colour, "marker": "o", "markersize": 2.5, "linewidth": 1.5, "linestyle": linestyle}
    by_step.plot(common, mean, label=label, **style)
    by_wall.plot(wall, mean, label=label, **style)
    if len(per_run) > 1:
        low = [min(p[s].val_loss for p in per_run) for s in common]
        high = [max(p[s].val_loss for p in per_run) for s in common]
        by_step.fill_between(common, low, high, color=colour, alpha=0.2, linewidth=0)
        by_wall.fill_between(wall, low, high, color=colour, alpha=0.2, linewidth=0)


__all__ = ["plot_curves"]
