"""The process runner: a stage as a local child process in its own process group.

A stage gets SIGTERM when the process that started it dies (:mod:`xlearner.parent_death`), so
SIGKILL of ``xlearner run`` leaves no stage behind for longer than its stop grace.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Protocol

from flows.runners.base import TORCHRUN_MODULE, ChildProcess, StageRunner, stage_environment
from xlearner.config import StageResources
from xlearner.parent_death import die_with_parent


class LocalProcess(Protocol):
    """A child process that leads its own process group: a subprocess or a fork."""

    pid: int  # also its process group id

    def lines(self) -> Iterator[str]: ...  # its merged stdout and stderr, line by line
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int | None: ...  # None: still running
    def close(self) -> None: ...


class _Subprocess:
    """``python -m stages.<name>`` (or any command) as a child process in its own session."""

    def __init__(self, command: list[str], env: Mapping[str, str], cwd: str | os.PathLike | None):
        self._popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # its own process group: a kill reaches its children too
            # SIGTERM when this (thread) dies; the thread waits for the stage while it runs
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )
        self.pid = self._popen.pid

    def lines(self) -> Iterator[str]:
        return iter(self._popen.stdout.readline, "")

    def poll(self) -> int | None:
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self._popen.stdout.close()


class _ProcessGroup:
    """A :class:`LocalProcess` as the runner supervises it (a :class:`ChildProcess`)."""

    def __init__(self, process: LocalProcess, environment: dict[str, str], kill_grace_s: float):
        self.process = process
        self.environment = environment
        self.kill_grace_s = kill_grace_s
        self.exited = False

    def lines(self) -> Iterator[str]:
        return self.process.lines()

    def wait(self, deadline: float | None) -> tuple[int | None, str]:
        returncode = self.process.wait()  # its output ended: it is exiting
        self.exited = True
        return returncode, ""

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after ``kill_grace_s``."""
        for sig, grace in ((signal.SIGTERM, self.kill_grace_s), (signal.SIGKILL, 10.0)):
            if self.process.poll() is not None:
                return
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:  # not yet its own group leader (just forked)
                try:
                    os.kill(self.process.pid, sig)
                except ProcessLookupError:
                    return
            if self.process.wait(grace) is not None:
                return

    def close(self) -> None:
        # Interrupted, the reader thread may still hold the output pipe: it ends (and the
        # pipe is closed with the process object) once the killed group's end of it closes.
        if self.exited:
            self.process.close()


class ProcessRunner(StageRunner):
    """Runs a stage as a local child process of ``python`` (default: this interpreter).

    With ``warm_start`` a ``python -m <module> ...`` command of this interpreter (a stage
    command is one) is forked from an interpreter that has imported the stages already
    (:mod:`flows.runners.warm_start`) instead of started anew: the same code and arguments
    without the seconds of imports. Other commands, torchrun's included (its processes
    are its own children), always start a new process. A stage given ``gpu_ids`` sees
    only those GPUs (``CUDA_VISIBLE_DEVICES``; ``[]``: none); ``resources``' cpus and
    memory are not enforced on a local process.
    """

    timeout_ends = "killed"

    def __init__(
        self,
        python: str = sys.executable,
        cwd: str | os.PathLike | None = None,
        kill_grace_s: float = 10.0,
        warm_start: bool = False,
    ):
        self.python = python
        self.cwd = cwd
        self.kill_grace_s = kill_grace_s
        self.warm_start = warm_start and python == sys.executable

    def start(
        self,
        command: list[str],
        *,
        stage: str,
        env: Mapping[str, str] | None,
        resources: StageResources | None = None,
        gpu_ids: list[str] | None = None,
    ) -> ChildProcess:
        child_env = stage_environment(os.environ, env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")  # lines arrive as they are printed
        if gpu_ids is not None:
            child_env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        process: LocalProcess
        python_module = len(command) > 2 and command[:2] == [self.python, "-m"]
        if self.warm_start and python_module and command[2] != TORCHRUN_MODULE:
            from flows.runners.warm_start import ForkedStage

            process = ForkedStage(command[2], command[3:], child_env, self.cwd)
        else:
            process = _Subprocess(command, child_env, self.cwd)
        return _ProcessGroup(process, child_env, self.kill_grace_s)
