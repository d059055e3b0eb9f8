"""How a pipeline stage runs: in a local subprocess or in its own Docker container.

- :mod:`flows.runners.base`: what both share (:class:`StageRunner`, the
  :class:`ChildProcess` it supervises, log streaming with secrets masked, timeout,
  cancellation, :class:`StageFailed`, the result line);
- :mod:`flows.runners.process`: :class:`ProcessRunner`, a local child process, forked
  from a warm interpreter (:mod:`flows.runners.warm_start`) when it can be;
- :mod:`flows.runners.docker`: :class:`DockerRunner`, a fresh container per stage.

Plain Python on purpose (no Prefect import): the flows wrap these in tasks, and the
tests drive them directly.
"""

from __future__ import annotations

from flows.runners.base import (
    ChildProcess,
    StageFailed,
    StageRun,
    StageRunner,
    stage_command,
    stop_all,
    stopping,
)
from flows.runners.docker import STAGE_LABEL, DockerRunner
from flows.runners.process import ProcessRunner
from xlearner.config import RunnerConfig

__all__ = [
    "STAGE_LABEL",
    "ChildProcess",
    "DockerRunner",
    "ProcessRunner",
    "StageFailed",
    "StageRun",
    "StageRunner",
    "make_runner",
    "stage_command",
    "stop_all",
    "stopping",
]


def make_runner(runner_config: RunnerConfig) -> ProcessRunner | DockerRunner:
    if runner_config.kind == "docker":
        return DockerRunner(runner_config.docker)
    return ProcessRunner(warm_start=runner_config.warm_start)
