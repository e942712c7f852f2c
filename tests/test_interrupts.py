"""Ctrl-C is never lost: a KeyboardInterrupt that Python swallows (raised inside a finalizer or a GC callback,
as CI saw in SQLAlchemy's) is raised again at the next safe point."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator

import pytest

from muonprof import interrupts
from muonprof.interrupts import raise_if_interrupted, recorded_interrupts


class _InterruptsWhenCollected:
    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)  # the handler runs here, inside __del__: its exception is swallowed


@pytest.fixture
def swallowed(monkeypatch: pytest.MonkeyPatch) -> list[type[BaseException]]:
    """The exceptions Python swallowed ("Exception ignored in ..."), in order."""
    seen: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    return seen


@pytest.fixture
def python_default_sigint() -> Iterator[None]:
    """The handler a plain ``python`` process starts with (a backgrounded shell may hand pytest SIG_IGN)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_python_swallows_a_ctrl_c_raised_in_a_finalizer(
    python_default_sigint: None, swallowed: list[type[BaseException]]
) -> None:
    """The failure being guarded against: with Python's own handler nothing reaches the caller."""
    _InterruptsWhenCollected()
    assert swallowed == [KeyboardInterrupt]
    raise_if_interrupted()  # nothing recorded outside recorded_interrupts


def test_a_swallowed_ctrl_c_is_raised_at_the_next_check(
    python_default_sigint: None, swallowed: list[type[BaseException]]
) -> None:
    with recorded_interrupts():
        _InterruptsWhenCollected()
        assert swallowed == [KeyboardInterrupt]
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    raise_if_interrupted()  # the record ends with the block


def test_a_ctrl_c_outside_a_finalizer_raises_at_once(python_default_sigint: None) -> None:
    with recorded_interrupts(), pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)


def test_a_host_applications_own_handler_is_left_alone() -> None:
    def own(signum: int, frame: object) -> None:
        raise RuntimeError("the host's")

    previous = signal.signal(signal.SIGINT, own)
    try:
        with recorded_interrupts():
            assert signal.getsignal(signal.SIGINT) is own
    finally:
        signal.signal(signal.SIGINT, previous)


def test_training_stops_at_the_next_step_after_a_swallowed_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from muonprof.train import train
    from muonprof.workload import build_workload

    workload = build_workload("mlp", batch_size=4, seed=0)
    optimizer = torch.optim.SGD(workload.model.parameters(), lr=0.01)
    steps: list[int] = []

    def swallowed_at_step_2(step: int, loss: float) -> None:
        steps.append(step)
        if step == 2:
            monkeypatch.setattr(interrupts, "_requested", True)  # as the handler leaves it

    with pytest.raises(KeyboardInterrupt):
        train(workload, optimizer, steps=10, eval_every=100, on_step=swallowed_at_step_2)
    assert steps == [1, 2]
