"""What every command shares: the consoles and the one-line error exit."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .._files import safe_name

__all__ = ["console", "err_console", "fail", "safe_name", "training_progress"]

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` (one line per line of the message) on stderr and exit with ``code``."""
    for line in message.splitlines() or [message]:
        err_console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def training_progress(shown: Console, transient: bool) -> Progress:
    """The progress bar of a training run: steps done, the latest loss (task field ``loss``), time left."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=shown,
        transient=transient,
    )
