"""What ``xlearner run`` does around the flow: Prefect's ephemeral server, and stopping.

- :func:`start_ephemeral_server`: with no ``PREFECT_API_URL``, Prefect starts a temporary
  server in a child process on first use. Started here instead, it gets its own session
  (a terminal's Ctrl-C reaches the CLI only, not the server the flow still logs to: that
  was the "Error logging to API" hang) and the parent-death signal (SIGKILL of the CLI
  does not leave it running). Prefect still stops it at exit.
- :func:`run_stoppable`: the flow runs on a thread while the main thread handles SIGINT
  and SIGTERM: the first stops the running stages (each checkpoints, then exits) and
  starts no new one, so the flow fails with "stopped" and ends; a second signal, or the
  flow still running ``grace_s`` later, abandons it.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flows.runners import stop_all
from xlearner.parent_death import die_with_parent

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FLOW_STOP_GRACE_S = 60.0  # stages get 10 s + 10 s (SIGTERM, SIGKILL); the flow the rest


def start_ephemeral_server() -> None:
    """Start Prefect's ephemeral server now, detached from the terminal and dying with this
    process (a no-op with ``PREFECT_API_URL`` set, or when it runs already)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api import server as prefect_server

    ephemeral = prefect_server.SubprocessASGIServer()  # the instance Prefect's clients use
    if ephemeral.running:
        return
    # Prefect gives no way to pass Popen options: its module sees a `subprocess` whose
    # Popen adds them, while it starts the server (the stop at exit uses the real one).
    shim = types.SimpleNamespace(**vars(subprocess))
    shim.Popen = functools.partial(
        subprocess.Popen,
        start_new_session=True,
        preexec_fn=functools.partial(die_with_parent, os.getpid()),
    )
    prefect_server.subprocess = shim
    try:
        ephemeral.start()
    finally:
        prefect_server.subprocess = subprocess


@dataclass
class Outcome:
    """How :func:`run_stoppable` ended: ``fn``'s value or error, and the signals received."""

    value: Any = None
    error: BaseException | None = None
    signals: list[int] = field(default_factory=list)
    abandoned: bool = False  # still running after a second signal or ``grace_s``


def run_stoppable(fn: Callable[[], Any], grace_s: float = FLOW_STOP_GRACE_S) -> Outcome:
    """Run ``fn`` (the flow) on a thread; the main thread handles SIGINT and SIGTERM.

    On its own thread the flow gets no signal, and Prefect installs none (it may only on
    the main thread; its own SIGTERM handler crashes the flow while the stages it waits
    for keep running: the "deaf to SIGTERM" hang). The first signal stops the stages
    (:func:`~flows.runners.stop_all`); a second one, or ``fn`` still running ``grace_s``
    later, abandons it (``abandoned``: the caller exits at once, the stages stopped).
    """
    outcome = Outcome()

    def target() -> None:
        try:
            outcome.value = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome.error = err

    def handler(signum: int, frame) -> None:
        outcome.signals.append(signum)
        if len(outcome.signals) == 1:
            threading.Thread(target=stop_all, name="stop-stages", daemon=True).start()

    flow_thread = threading.Thread(target=target, name="xlearner-flow", daemon=True)
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    first_signal_at: float | None = None
    try:
        flow_thread.start()
        while flow_thread.is_alive():
            flow_thread.join(0.2)  # signal handlers run between the joins
            if outcome.signals and first_signal_at is None:
                first_signal_at = time.monotonic()
            late = first_signal_at is not None and time.monotonic() - first_signal_at > grace_s
            if len(outcome.signals) > 1 or late:
                stop_all()
                outcome.abandoned = True
                break
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return outcome
