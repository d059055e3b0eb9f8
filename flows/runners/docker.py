"""The Docker runner: each stage in a fresh container, its logs streamed, removed afterwards."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from flows.runners.base import ChildProcess, StageRunner, logger, stage_environment
from xlearner.config import DockerRunnerConfig

STAGE_LABEL = "xlearner.stage"
DEFAULT_CONTAINER_USER = "10001:10001"  # the `xlearner` user of docker/Dockerfile.stage


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


class _Container:
    """A started stage container as the runner supervises it (a :class:`ChildProcess`)."""

    def __init__(self, container: Any, environment: dict[str, str], stop_timeout_s: int):
        self.container = container
        self.environment = environment
        self.stop_timeout_s = stop_timeout_s

    def lines(self) -> Iterator[str]:
        return _lines_of(self.container.logs(stream=True, follow=True, stdout=True, stderr=True))

    def wait(self, deadline: float | None) -> tuple[int | None, str]:
        """Exit code (None if ``deadline`` passed first) and why it died, if the engine knows."""
        import requests

        wait_s = None if deadline is None else max(1.0, deadline - time.monotonic())
        try:
            status = self.container.wait(timeout=wait_s)
        except requests.exceptions.RequestException:  # read timeout while it still runs
            return None, ""
        reason = status.get("Error", {}).get("Message", "") if status.get("Error") else ""
        try:
            self.container.reload()
            if self.container.attrs.get("State", {}).get("OOMKilled"):
                reason = "killed by the kernel: out of memory"
        except Exception:  # the reason is a nicety; the exit code is what counts
            pass
        return int(status["StatusCode"]), reason

    def stop(self) -> None:
        try:
            self.container.stop(timeout=self.stop_timeout_s)
        except Exception as err:  # already gone or engine trouble: removal (force) follows
            logger.warning("could not stop container %s: %s", self.container.name, err)

    def close(self) -> None:
        import docker

        try:
            self.container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as err:
            if "already in progress" not in str(err):
                logger.warning("could not remove container %s: %s", self.container.name, err)


class DockerRunner(StageRunner):
    """Runs each stage in a fresh container of ``config.image`` (removed afterwards).

    The container gets only the variables named in ``config.env_passthrough`` (those set
    in this process) plus the explicit ``env``; GPUs are requested per container with
    ``device_requests`` when ``config.gpus`` is not 0. It runs as ``user`` (non-root by
    default) with ``init`` (docker-init) as PID 1, so a stop's SIGTERM reaches the stage.
    ``create_options`` adds arguments of ``containers.create`` that the config does not
    have (``mem_limit``, ``cpu_quota``, ...). A call's timeout defaults to
    ``config.timeout_s``.
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
    def timeout_s(self) -> float | None:
        return self.config.timeout_s

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

    def start(
        self, command: list[str], *, stage: str, env: Mapping[str, str] | None
    ) -> ChildProcess:
        """Create the container, then start it: it is removed whatever happens after creation."""
        kwargs = self.container_kwargs(command, stage=stage, env=env)
        child = _Container(self._create(kwargs), kwargs["environment"], self.stop_timeout_s)
        try:
            self._start(child.container, stage)
        except BaseException:
            child.stop()
            child.close()
            raise
        return child

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
