"""How a pipeline stage runs: in a local subprocess, its own Docker container, or on Ray.

- :mod:`flows.runners.base`: what both share (:class:`StageRunner`, the
  :class:`ChildProcess` it supervises, log streaming with secrets masked, timeout,
  cancellation, :class:`StageFailed`, the result line);
- :mod:`flows.runners.process`: :class:`ProcessRunner`, a local child process, forked
  from a warm interpreter (:mod:`flows.runners.warm_start`) when it can be;
- :mod:`flows.runners.docker`: :class:`DockerRunner`, a fresh container per stage;
- :mod:`flows.runners.ray`: ``RayRunner``, each stage on a Ray cluster (imported only
  for ``runner.kind: ray``: ``ray`` is needed there only).

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
    torchrun_command,
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
    "torchrun_command",
]


def make_runner(runner_config: RunnerConfig) -> StageRunner:
    if runner_config.kind == "ray":
        from flows.runners.ray import RayRunner

        return RayRunner(runner_config.ray)
    if runner_config.kind == "docker":
        return DockerRunner(runner_config.docker)
    return ProcessRunner(warm_start=runner_config.warm_start)
