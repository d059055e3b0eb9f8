"""Children that die with their parent: Linux's parent-death signal.

``prctl(PR_SET_PDEATHSIG, sig)`` in a child makes the kernel send it ``sig`` when the
thread that started it ends, however it ends (SIGKILL included). A stage gets SIGTERM
that way (it then checkpoints and exits, :mod:`xlearner.stop`); the setting survives
``exec``. Elsewhere than Linux it is a no-op: there only a clean stop ends the stages.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> None:
    """In a child started by ``parent_pid``: get ``sig`` when that parent ends (and now,
    if it ended before this call)."""
    if _libc is None:
        return
    _libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:  # it died between the fork and the prctl
        os.kill(os.getpid(), sig)
