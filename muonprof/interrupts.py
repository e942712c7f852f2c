"""Ctrl-C that cannot be lost.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread is at that moment. When that is
a weakref callback, a ``__del__`` or a garbage-collector callback, the interpreter prints "Exception ignored
in ..." and swallows it, and the command carries on as if nothing had happened: CI saw ``muonprof tune`` exit
0 after a Ctrl-C that landed in SQLAlchemy's GC callback. The handler installed here raises exactly as
Python's own does, and also records the request; :func:`raise_if_interrupted`, called at safe points (each
training, capture and bench step), raises it again if it was swallowed. The check is a read of one global, so
it costs nothing in the hot loops.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_requested = False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed since :func:`recorded_interrupts` began (even when the
    first KeyboardInterrupt was swallowed somewhere Python ignores exceptions)."""
    if _requested:
        raise KeyboardInterrupt


@contextlib.contextmanager
def recorded_interrupts() -> Iterator[None]:
    """Install the recording SIGINT handler for the block (main thread only, and only over Python's default
    handler: a host application's own handler, or SIGINT ignored, is left alone)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    _requested = False
    signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested = False
