"""How a pipeline stage runs: in a local subprocess or in its own Docker container.

A stage is the command ``python -m stages.<name> <args...>`` (docs/architecture.md,
"Stages"): it prints one line ``XLEARNER_RESULT {json}`` and exits non-zero on failure.
Both runners stream the stage's output line by line to a ``log`` callback as it comes,
enforce a timeout, clean up on cancellation (any ``BaseException``: Ctrl-C, Prefect's
termination signal) and raise :class:`StageFailed` with the tail of the log.

Plain Python on purpose (no Prefect import): the flows wrap these in tasks, and the
tests drive them directly.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from xlearner.config import DockerRunnerConfig, RunnerConfig

RESULT_PREFIX = "XLEARNER_RESULT "
LOG_TAIL_LINES = 50
STAGE_LABEL = "xlearner.stage"
DEFAULT_CONTAINER_USER = "10001:10001"  # the `xlearner` user of docker/Dockerfile.stage
# MLflow lets an exported MLFLOW_RUN_ID override the parent run a stage is given
# (shared/NOTES.md): a stage environment never carries it.
FORBIDDEN_ENV = ("MLFLOW_RUN_ID",)
SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE|ACCESS_KEY|(^|_)KEY($|_)"
)
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^/:@\s]+:)[^@\s/]+@", re.IGNORECASE)
MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary text everywhere

LogFn = Callable[[str], None]
logger = logging.getLogger("xlearner.stages")


@dataclass
class StageResult:
    returncode: int
    result: dict[str, Any] | None  # parsed from the last XLEARNER_RESULT line, if any
    log_tail: str  # the last LOG_TAIL_LINES lines, secrets masked
    seconds: float


class StageFailed(RuntimeError):
    """A stage exited non-zero, timed out or printed a malformed result line."""

    def __init__(self, stage: str, returncode: int | None, log_tail: str, reason: str = ""):
        self.stage = stage
        self.returncode = returncode
        self.log_tail = log_tail
        self.reason = reason
        what = reason or f"failed with exit code {returncode}"
        tail_lines = log_tail.count("\n") + 1 if log_tail else 0
        tail = f"; last {tail_lines} log lines:\n{log_tail}" if log_tail else "; it printed nothing"
        super().__init__(f"stage {stage!r} {what}{tail}")

    def __reduce__(self):  # picklable (Prefect persists task exceptions)
        return type(self), (self.stage, self.returncode, self.log_tail, self.reason)


def stage_command(stage: str, args: list[str], python: str = "python") -> list[str]:
    return [python, "-m", f"stages.{stage}", *args]


def secret_values(env: Mapping[str, str]) -> list[str]:
    """Values of the variables whose names look like credentials (AWS_SECRET_ACCESS_KEY, ...)."""
    return [
        value
        for name, value in env.items()
        if SECRET_NAME.search(name.upper()) and len(value) >= MIN_SECRET_LENGTH
    ]


def redact(text: str, secrets: Iterable[str]) -> str:
    """Mask every secret value and every password inside a URL (``scheme://user:pw@``)."""
    # Longest first, so that a secret containing another one leaves no partial value.
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, MASK)
    return URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)


def stage_environment(base: Mapping[str, str], env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` overlaid on ``base``, without the variables no stage may inherit."""
    merged = {**base, **(env or {})}
    for name in FORBIDDEN_ENV:
        merged.pop(name, None)
    return merged


class _LogCollector:
    """Forwards output lines (secrets masked) to ``log``, keeps the tail and the result line."""

    def __init__(self, stage: str, log: LogFn, secrets: Iterable[str]):
        self.stage = stage
        self.log = log
        self.secrets = list(secrets)
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.result: dict[str, Any] | None = None
        self.bad_result: str | None = None

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if line.startswith(RESULT_PREFIX):
            try:
                parsed = json.loads(line[len(RESULT_PREFIX) :])
                if not isinstance(parsed, dict):
                    raise ValueError(f"expected a JSON object, got {type(parsed).__name__}")
                self.result, self.bad_result = parsed, None
            except ValueError as err:
                self.bad_result = str(err)
        shown = self.redact(line)
        self.tail.append(shown)
        self.log(shown)

    def redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def tail_text(self) -> str:
        return "\n".join(self.tail)

    def failed(self, returncode: int | None, reason: str = "") -> StageFailed:
        return StageFailed(self.stage, returncode, self.tail_text(), self.redact(reason))

    def finish(self, returncode: int, started: float) -> StageResult:
        if returncode != 0:
            raise self.failed(returncode)
        if self.bad_result is not None:
            raise self.failed(
                returncode, f"printed a malformed {RESULT_PREFIX.strip()} line: {self.bad_result}"
            )
        return StageResult(returncode, self.result, self.tail_text(), time.monotonic() - started)


_EOF = object()


def _pump(lines: Iterator[str], collector: _LogCollector, deadline: float | None) -> bool:
    """Feed ``lines`` (read on a helper thread) to ``collector`` from the calling thread.

    Returns False when ``deadline`` (a ``time.monotonic()`` value) passed first. The
    calling thread only waits on a queue, so Ctrl-C and signal-raised exceptions reach it
    promptly; the log callback also runs on it (Prefect's run logger expects that).
    """
    pending: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for line in lines:
                pending.put(line)
        except Exception as err:  # reported on the calling thread
            pending.put(err)
        finally:
            pending.put(_EOF)

    threading.Thread(target=read, name=f"stage-log-{collector.stage}", daemon=True).start()
    while True:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            return False
        try:
            item = pending.get(timeout=wait)
        except queue.Empty:
            return False
        if item is _EOF:
            return True
        if isinstance(item, Exception):
            raise item
        collector.feed(item)


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def _default_log(line: str) -> None:
    logger.info("%s", line)


class StageRunner:
    """What both runners share: ``run`` a stage = ``run_command`` of its stage command."""

    python = "python"  # the interpreter that runs ``-m stages.<name>``

    def run(
        self,
        stage: str,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        log: LogFn | None = None,
        timeout_s: float | None = None,
    ) -> StageResult:
        command = stage_command(stage, args, self.python)
        return self.run_command(command, stage=stage, env=env, log=log, timeout_s=timeout_s)

    def run_command(
        self,
        command: list[str],
        *,
        stage: str,
        env: Mapping[str, str] | None = None,
        log: LogFn | None = None,
        timeout_s: float | None = None,
    ) -> StageResult:
        """Run any command under the stage protocol (tests pass their own)."""
        raise NotImplementedError


class ChildProcess(Protocol):
    """A running stage as the process runner supervises it (a subprocess or a fork)."""

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


class ProcessRunner(StageRunner):
    """Runs a stage as a local child process of ``python`` (default: this interpreter).

    With ``warm_start`` a ``python -m <module> ...`` command of this interpreter (a stage
    command is one) is forked from an interpreter that has imported the stages already
    (:mod:`flows.warm_start`) instead of started anew: the same code and arguments
    without the seconds of imports. Other commands always start a new process.
    """

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

    def run_command(
        self,
        command: list[str],
        *,
        stage: str,
        env: Mapping[str, str] | None = None,
        log: LogFn | None = None,
        timeout_s: float | None = None,
    ) -> StageResult:
        """Stream the child's output, enforce the timeout, kill it on any interruption."""
        child_env = stage_environment(os.environ, env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")  # lines arrive as they are printed
        collector = _LogCollector(stage, log or _default_log, secret_values(child_env))
        started = time.monotonic()
        child = self._start(command, child_env)
        try:
            finished = _pump(child.lines(), collector, _deadline(timeout_s))
            if not finished:
                self._kill(child)
                raise collector.failed(None, f"timed out after {timeout_s:g} s and was killed")
            returncode = child.wait()
        except BaseException:
            # The reader thread may still hold the output pipe: it ends (and the pipe is
            # closed with the child object) once the killed group's end of it closes.
            self._kill(child)
            raise
        child.close()
        return collector.finish(returncode, started)

    def _start(self, command: list[str], env: dict[str, str]) -> ChildProcess:
        if self.warm_start and len(command) > 2 and command[:2] == [self.python, "-m"]:
            from flows.warm_start import ForkedStage

            return ForkedStage(command[2], command[3:], env, self.cwd)
        return _Subprocess(command, env, self.cwd)

    def _kill(self, child: ChildProcess) -> None:
        """SIGTERM to the child's whole process group, SIGKILL after ``kill_grace_s``."""
        for sig, grace in ((signal.SIGTERM, self.kill_grace_s), (signal.SIGKILL, 10.0)):
            if child.poll() is not None:
                return
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:  # not yet its own group leader (just forked)
                try:
                    os.kill(child.pid, sig)
                except ProcessLookupError:
                    return
            if child.wait(grace) is not None:
                return


def _lines_of(chunks: Iterable[bytes]) -> Iterator[str]:
    """Whole lines from a stream of byte chunks (Docker log frames split lines anywhere)."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", errors="replace")
    if buffer:
        yield buffer.decode("utf-8", errors="replace")


class DockerRunner(StageRunner):
    """Runs each stage in a fresh container of ``config.image`` (removed afterwards).

    The container gets only the variables named in ``config.env_passthrough`` (those set
    in this process) plus the explicit ``env``; GPUs are requested per container with
    ``device_requests`` when ``config.gpus`` is not 0. It runs as ``user`` (non-root by
    default) with ``init`` (docker-init) as PID 1, so a stop's SIGTERM reaches the stage.
    ``create_options`` adds arguments of ``containers.create`` that the config does not
    have (``mem_limit``, ``cpu_quota``, ...).
    """

    def __init__(
        self,
        config: DockerRunnerConfig,
        client: Any = None,
        *,
        user: str | None = DEFAULT_CONTAINER_USER,
        init: bool = True,
        stop_timeout_s: int = 10,
        create_options: Mapping[str, Any] | None = None,
    ):
        self.config = config
        self._client = client
        self.user = user
        self.init = init
        self.stop_timeout_s = stop_timeout_s
        self.create_options = dict(create_options or {})

    @property
    def client(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = docker.from_env()
                self._client.ping()
            except docker.errors.DockerException as err:
                host = os.environ.get("DOCKER_HOST", "<unset>")
                raise RuntimeError(
                    f"cannot reach the Docker engine (DOCKER_HOST={host}): {err}; "
                    "start dockerd, or run the stages locally with runner.kind=process"
                ) from err
        return self._client

    def environment(self, env: Mapping[str, str] | None) -> dict[str, str]:
        passed = {
            name: os.environ[name] for name in self.config.env_passthrough if name in os.environ
        }
        return stage_environment(passed, env)

    def container_kwargs(
        self, command: list[str], *, stage: str, env: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Arguments of ``client.containers.create`` for one stage container."""
        from docker.types import DeviceRequest

        cfg = self.config
        kwargs: dict[str, Any] = dict(
            image=cfg.image,
            command=command,
            name=f"xlearner-{re.sub(r'[^a-zA-Z0-9_.-]', '-', stage)}-{uuid.uuid4().hex[:8]}",
            environment=self.environment(env),
            labels={**cfg.labels, STAGE_LABEL: stage},
            shm_size=cfg.shm_size,
            network_mode=cfg.network_mode,
            volumes=list(cfg.volumes),
            init=self.init,
            **self.create_options,
        )
        if self.user is not None:
            kwargs["user"] = self.user
        if cfg.gpus != 0:
            kwargs["device_requests"] = [DeviceRequest(count=cfg.gpus, capabilities=[["gpu"]])]
        return kwargs

    def run_command(
        self,
        command: list[str],
        *,
        stage: str,
        env: Mapping[str, str] | None = None,
        log: LogFn | None = None,
        timeout_s: float | None = None,
    ) -> StageResult:
        """Run ``command`` in a new container under the stage protocol.

        ``timeout_s`` defaults to ``config.timeout_s``. The container is created, then
        started, so that it is stopped and removed whatever happens after its creation.
        """
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        kwargs = self.container_kwargs(command, stage=stage, env=env)
        collector = _LogCollector(stage, log or _default_log, secret_values(kwargs["environment"]))
        started = time.monotonic()
        deadline = _deadline(timeout_s)
        timed_out = f"timed out after {timeout_s:g} s and was stopped"
        container = self._create(kwargs)
        try:
            self._start(container, stage)
            logs = container.logs(stream=True, follow=True, stdout=True, stderr=True)
            if not _pump(_lines_of(logs), collector, deadline):
                self._stop(container)
                raise collector.failed(None, timed_out)
            returncode, reason = self._wait(container, deadline)
            if returncode is None:
                self._stop(container)
                raise collector.failed(None, timed_out)
        except BaseException as err:
            if not isinstance(err, StageFailed):
                self._stop(container)
            raise
        finally:
            self._remove(container)
        if returncode != 0 and reason:
            raise collector.failed(returncode, f"failed with exit code {returncode} ({reason})")
        return collector.finish(returncode, started)

    def _create(self, kwargs: dict[str, Any]) -> Any:
        import docker

        try:
            return self.client.containers.create(**kwargs)
        except docker.errors.ImageNotFound as err:
            raise RuntimeError(
                f"the stage image {kwargs['image']!r} is not on the Docker engine ({err}); build "
                f"it with `docker build -f docker/Dockerfile.stage -t {kwargs['image']} .` or "
                "set runner.docker.image"
            ) from err

    def _start(self, container: Any, stage: str) -> None:
        import docker

        try:
            container.start()
        except docker.errors.APIError as err:
            hint = ""
            if self.config.gpus != 0:
                hint = (
                    f"; it asks for GPUs (runner.docker.gpus={self.config.gpus}): the host needs "
                    "an NVIDIA driver and the NVIDIA Container Toolkit, or set runner.docker.gpus=0"
                )
            raise RuntimeError(
                f"cannot start the container of stage {stage!r}: {err.explanation or err}{hint}"
            ) from err

    def _wait(self, container: Any, deadline: float | None) -> tuple[int | None, str]:
        """Exit code (None if ``deadline`` passed first) and why it died, if the engine knows."""
        import requests

        wait_s = None if deadline is None else max(1.0, deadline - time.monotonic())
        try:
            status = container.wait(timeout=wait_s)
        except requests.exceptions.RequestException:  # read timeout while it still runs
            return None, ""
        reason = status.get("Error", {}).get("Message", "") if status.get("Error") else ""
        try:
            container.reload()
            if container.attrs.get("State", {}).get("OOMKilled"):
                reason = "killed by the kernel: out of memory"
        except Exception:  # the reason is a nicety; the exit code is what counts
            pass
        return int(status["StatusCode"]), reason

    def _stop(self, container: Any) -> None:
        try:
            container.stop(timeout=self.stop_timeout_s)
        except Exception as err:  # already gone or engine trouble: removal (force) follows
            logger.warning("could not stop container %s: %s", container.name, err)

    def _remove(self, container: Any) -> None:
        import docker

        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as err:
            if "already in progress" not in str(err):
                logger.warning("could not remove container %s: %s", container.name, err)


def make_runner(runner_config: RunnerConfig) -> ProcessRunner | DockerRunner:
    if runner_config.kind == "docker":
        return DockerRunner(runner_config.docker, user=runner_config.docker.user)
    return ProcessRunner(warm_start=runner_config.warm_start)
