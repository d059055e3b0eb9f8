"""A stand-in stage for the lifecycle tests: ``python -m tests.integration.sleepy_stage``.

The real :func:`stages.main.stage_main` (output lease, stop on signals, exit codes) around
a body that publishes ``started.json`` with its pid, then waits until the file
``XL_RELEASE`` exists (at most 300 s) before it finishes: a stage that is easy to catch
mid-way. Its flags are the expand stage's (``--config C --out O --task T``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from stages.main import stage_main
from xlearner.contract import ExpandCall, StageResult


def body(call, cfg, out) -> StageResult:
    out.publish_json("started.json", {"pid": os.getpid()})
    print("started", flush=True)
    release = Path(os.environ["XL_RELEASE"])
    deadline = time.monotonic() + 300
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return out.finish(StageResult())


def main(argv: list[str] | None = None) -> int:
    return stage_main(ExpandCall, body, argv)


if __name__ == "__main__":
    sys.exit(main())
