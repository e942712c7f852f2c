"""PNG figures (matplotlib, Agg backend: no display needed). Only the CLI imports this package."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._files import atomic_write


def save_figure(path: str | os.PathLike[str], draw: Callable[[Any], None], *, size: tuple[float, float]) -> Path:
    """Create a figure, let ``draw(fig)`` fill it, and write it atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size, dpi=110)
    try:
        draw(fig)
        fig.tight_layout()
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)
