"""Progress of long loops: throughput and ETA, for the engine's steps and ingest's images.

:class:`Progress` counts units done out of ``total`` (steps, images) and the items and
bytes processed on the way (images, bytes); callers decide when to log (every N steps,
every few seconds) and prepend their own context (losses, the source name).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Progress:
    """``done`` of ``total`` units; ``items``/``bytes`` processed since the start.

    ``start`` is where this process began (a resumed run starts at its checkpoint's
    step): rates and the ETA count only the work done here.
    """

    total: int
    start: int = 0
    clock: Callable[[], float] = time.perf_counter
    done: int = field(init=False)
    items: int = 0
    bytes: int = 0
    t0: float = field(init=False)
    last_log: float = field(init=False)

    def __post_init__(self) -> None:
        self.done = self.start
        self.t0 = self.last_log = self.clock()

    def update(self, done: int | None = None, items: int = 0, nbytes: int = 0) -> None:
        """Advance to ``done`` units (default: one more), counting ``items`` and ``nbytes``."""
        self.done = self.done + 1 if done is None else done
        self.items += items
        self.bytes += nbytes

    @property
    def elapsed(self) -> float:
        return max(self.clock() - self.t0, 1e-9)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def rate(self) -> float:
        """Items per second since the start."""
        return self.items / self.elapsed

    def eta(self) -> float:
        """Seconds left at the pace of the units done so far (inf before the first)."""
        done = self.done - self.start
        if done <= 0:
            return float("inf")
        return self.elapsed / done * max(self.total - self.done, 0)

    def due(self, every_s: float) -> bool:
        """True at most every ``every_s`` seconds, and when finished; marks the log time."""
        now = self.clock()
        if now - self.last_log >= every_s or self.finished:
            self.last_log = now
            return True
        return False

    def line(self, unit: str = "images", with_bytes: bool = False) -> str:
        """``12/40 (30%), 85.3 images/s[, 4.1 MB/s], ETA 3 s``."""
        pct = 100 * self.done / max(self.total, 1)
        parts = [f"{self.done}/{self.total} ({pct:.0f}%)", f"{self.rate():.1f} {unit}/s"]
        if with_bytes:
            parts.append(f"{self.bytes / self.elapsed / 2**20:.1f} MB/s")
        eta = self.eta()
        parts.append(f"ETA {eta:.0f} s" if eta != float("inf") else "ETA ?")
        return ", ".join(parts)
