"""The spectrum figure: how fast singular values decay per role, and how much rank each layer needs."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..capture.artifact import Spectra
from ..capture.stats import rank_holding
from ..roles import ROLES, layer_index
from . import save_figure


def plot_spectra(spectra: Spectra, path: str | os.PathLike[str], *, kind: str = "momentum") -> Path:
    """Two panels from the last capture: (left) singular values s_i / s_1 against i / min(m, n), the median
    per role with each layer faint behind it; (right) the rank holding 90% of the Frobenius energy and of the
    nuclear norm, as a fraction of min(m, n), per layer across depth."""
    capture = spectra.captures[-1]
    by_role: dict[str, list[torch.Tensor]] = defaultdict(list)
    for layer in spectra.layers:
        by_role[layer.role].append(capture.spectrum(kind, layer.name).double())
    order = [r for r in ROLES if r in by_role] + sorted(set(by_role) - set(ROLES))

    def draw(fig: Any) -> None:
        import matplotlib.pyplot as plt

        left, right = fig.subplots(1, 2)
        colors = plt.get_cmap("tab10")
        for i, role in enumerate(order):
            color = colors(i % 10)
            curves = []
            for s in by_role[role]:
                normalized = s / s[0] if s[0] > 0 else s
                x = (torch.arange(len(s), dtype=torch.float64) + 1) / len(s)
                left.plot(x, normalized.clamp_min(1e-12), color=color, alpha=0.15, linewidth=0.7)
                grid = torch.linspace(0, 1, 200, dtype=torch.float64)
                idx = (grid * (len(s) - 1)).round().long()
                curves.append(normalized[idx])
            median = torch.stack(curves).median(0).values
            left.plot(torch.linspace(0, 1, 200) * (1 - 1 / 200) + 1 / 200, median.clamp_min(1e-12), color=color,
                      linewidth=2, label=f"{role} ({len(curves)})")
        left.set_yscale("log")
        left.set_xlabel("i / min(m, n)")
        left.set_ylabel("s_i / s_1")
        left.set_title(f"{kind} spectra at step {capture.step}")
        left.legend(fontsize=7)
        left.grid(alpha=0.3)

        for i, role in enumerate(order):
            color = colors(i % 10)
            points = []
            for layer in spectra.layers:
                if layer.role != role:
                    continue
                s = capture.spectrum(kind, layer.name).double()
                k = len(s)
                depth = layer_index(layer.name)
                points.append((
                    depth if depth is not None else -1,
                    float(rank_holding(s * s, 0.9)) / k,
                    float(rank_holding(s, 0.9)) / k,
                ))
            points.sort()
            xs = [p[0] for p in points]
            right.plot(xs, [p[1] for p in points], "o-", color=color, markersize=3, label=f"{role} energy 90%")
            right.plot(xs, [p[2] for p in points], "x--", color=color, markersize=3, alpha=0.7)
        right.set_xlabel("block (-1: outside the blocks)")
        right.set_ylabel("rank / min(m, n)")
        right.set_title("rank holding 90%: energy (o), nuclear norm (x)")
        right.legend(fontsize=7)
        right.grid(alpha=0.3)
        fig.suptitle(f"{spectra.meta['model']['spec']}: {len(spectra.layers)} matrices, loss {capture.loss:.3f}")

    return save_figure(path, draw, size=(13, 5))
