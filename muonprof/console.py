"""The one console path: every line muonprof prints shows user text literally.

Paths, model names, layer names and exception text come from the user. Printed through a default rich
``Console`` they are read as markup (``[/x]`` in a path crashes with a MarkupError, ``[bold]`` vanishes,
``[hf]`` is eaten from an install hint) and as emoji codes (``:smile:``, ``cuda:-1``). So the consoles here
have markup, emoji and highlighting OFF: a ``str`` (also in a table cell or a progress description) prints
as it is, and styling is applied explicitly with :func:`styled` (``rich.text.Text`` spans), never by
formatting markup into a string. Every command imports its consoles, ``fail`` and the progress columns from
here; there is no second console.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import TextColumn
from rich.text import Text

from ._files import dumps_json, finite_or_null, remove_created_folders

__all__ = [
    "console",
    "description_column",
    "err_console",
    "fail",
    "field_column",
    "in_range",
    "literal_console",
    "print_json",
    "styled",
]


def literal_console(*, stderr: bool = False) -> Console:
    """A console that never interprets what it prints: no markup, no emoji codes, no auto-highlighting."""
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False)


console = literal_console()
err_console = literal_console(stderr=True)


def styled(*parts: str | tuple[str, str]) -> Text:
    """Literal text with explicit styles: ``styled(("ok", "green"), " ", path)``; nothing is parsed as markup."""
    return Text.assemble(*parts)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` (one line per line of the message) on stderr and exit with ``code``, after
    removing the output folders this run created and left empty."""
    remove_created_folders()
    for line in str(message).splitlines() or [str(message)]:
        err_console.print(styled(("error:", "bold red"), " ", line), soft_wrap=True)
    raise typer.Exit(code)


def description_column() -> TextColumn:
    """A progress bar's task description, printed literally (it can hold a model or layer name)."""
    return TextColumn("{task.description}", style="progress.description", markup=False)


def field_column(template: str) -> TextColumn:
    """A progress column from a ``{task.fields[...]}`` template, printed literally."""
    return TextColumn(template, markup=False)


def in_range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[typer.Context, typer.CallbackParam, Any], Any]:
    """A Typer option callback that refuses NaN, infinities and values outside [lo, hi] with one error line.

    Typer's ``min=``/``max=`` let NaN through (every comparison with NaN is false) and report in a boxed
    panel; this callback says ``error: --lr must be a finite number > 0 (got nan)`` and exits 2, the code
    of a usage error. ``None`` (an option left unset) passes. Lists (repeatable options) are checked item
    by item. ``lo_open``/``hi_open`` make the bound strict.
    """

    def bounds() -> str:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {_number(lo)}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {_number(hi)}")
        return " and ".join(parts)

    def check(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> Any:
        if ctx.resilient_parsing or value is None:
            return value
        for item in value if isinstance(value, list | tuple) else [value]:
            _check_one(param, item, bounds())
        return value

    def _check_one(param: typer.CallbackParam, item: float, rule: str) -> None:
        x = float(item)
        bad = not math.isfinite(x)
        bad |= lo is not None and (x <= lo if lo_open else x < lo)
        bad |= hi is not None and (x >= hi if hi_open else x > hi)
        if bad:
            name = max(param.opts, key=len) if param.opts else str(param.name)
            if isinstance(item, int) and lo is not None and hi is None and not lo_open:
                kind = f"at least {_number(lo)}"  # the wording the library's own checks use for counts
            else:
                kind = ("an integer" if isinstance(item, int) else "a finite number") + (f" {rule}" if rule else "")
            fail(f"{name} must be {kind} (got {item})", 2)

    return check


def _number(x: float) -> str:
    """A bound as a user would type it: integers in full, other numbers in short form."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def print_json(value: Any, default: Callable[[Any], Any] = str) -> None:
    """``--json`` output on stdout: strict JSON (a NaN/infinite number is null), printed as is, never by rich."""
    print(dumps_json(finite_or_null(value), what="output", indent=2, default=default))
