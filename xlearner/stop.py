"""Stopping a stage on SIGTERM or SIGINT: checkpoint, then exit, within a bounded time.

Inside :func:`signals_stop`, the first SIGTERM/SIGINT requests a stop. Code that can stop
at a clean point runs inside :func:`safe_points` and calls :func:`check` there (the
training loop, after a step, once it saved a checkpoint); anywhere else the signal raises
:class:`StopRequested` at once. Either way SIGALRM ends the process ``grace_s`` after the
first signal, whatever it is doing, and a second signal raises at once: a stage never
outlives a stop request by more than ``grace_s``.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# less than the process runner's grace before SIGKILL (flows/runners/process.py)
STOP_GRACE_ENV = "XLEARNER_STOP_GRACE_S"
DEFAULT_GRACE_S = 8.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """A stop signal arrived: the stage ends now (after its checkpoint, where it has one)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


_signum: int | None = None  # the first stop signal received, if any
_safe_depth = 0  # > 0: the running code checks for a stop itself


def requested() -> bool:
    return _signum is not None


def check() -> None:
    """Raise :class:`StopRequested` if a stop was requested."""
    if _signum is not None:
        raise StopRequested(_signum)


@contextmanager
def safe_points() -> Iterator[None]:
    """A signal only sets the flag inside: the code calls :func:`check` where it can stop."""
    global _safe_depth
    _safe_depth += 1
    try:
        yield
    finally:
        _safe_depth -= 1


def _on_signal(signum: int, frame) -> None:
    global _signum
    first = _signum is None
    _signum = _signum or signum
    if first:
        grace = float(os.environ.get(STOP_GRACE_ENV, DEFAULT_GRACE_S))
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # its default action ends the process
        signal.alarm(max(1, math.ceil(grace)))
        if _safe_depth:
            return
    raise StopRequested(signum)


@contextmanager
def signals_stop() -> Iterator[None]:
    """SIGTERM and SIGINT request a stop inside (main thread only; restored on exit)."""
    global _signum
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.alarm(0)
        _signum = None
