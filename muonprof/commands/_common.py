"""What every command shares: the literal consoles, the one-line error exit, option range checks, progress."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

from .._files import safe_name
from ..console import (
    console,
    description_column,
    err_console,
    fail,
    field_column,
    in_range,
    print_json,
    styled,
)

__all__ = [
    "console",
    "description_column",
    "err_console",
    "fail",
    "field_column",
    "in_range",
    "print_json",
    "safe_name",
    "styled",
    "training_progress",
]


def training_progress(shown: Console, transient: bool) -> Progress:
    """The progress bar of a training run: steps done, the latest loss (task field ``loss``), time left."""
    return Progress(
        description_column(),
        BarColumn(),
        MofNCompleteColumn(),
        field_column("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=shown,
        transient=transient,
    )
