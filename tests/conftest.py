"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import typer


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One BLAS thread: on 2 cores shared with other jobs, oversubscription stalls tiny models 10-50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    """The CLI app with ``validate`` as a subcommand (the validate tests invoke it as a new user types it)."""
    from muonprof.cli import app as main_app

    if "validate" in {c.name for c in main_app.registered_commands}:
        return main_app
    from muonprof.commands.validate import register

    fresh = typer.Typer()
    register(fresh)
    fresh.command("noop", hidden=True)(lambda: None)  # keep `validate` a subcommand with a second command
    return fresh


def default_sigint() -> None:
    """``preexec_fn`` for subprocesses a test interrupts with SIGINT: a shell that runs the suite in the background
    hands its children SIGINT ignored, and Python then never raises KeyboardInterrupt; restore the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
