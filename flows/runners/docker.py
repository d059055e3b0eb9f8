"""The Docker runner: each stage in a fresh container, its logs streamed, removed afterwards."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from flows.operator import DATA_ROOTS_ENV, DockerSettings, data_roots, is_under
from flows.runners.base import ChildProcess, StageRunner, logger, stage_environment
from xlearner.config import ConfigError, DockerRunnerConfig

STAGE_LABEL = "xlearner.stage"


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


def check_binds_under_roots(binds: list[str], roots: list[str] | None = None) -> None:
    """Refuse a config's bind whose host folder is not under the operator's data roots
    (default: :func:`flows.operator.data_roots`)."""
    roots = data_roots() if roots is None else roots
    if outside := [bind for bind in binds if not is_under(bind.split(":")[0], roots)]:
        allowed = f"{DATA_ROOTS_ENV}={','.join(roots)}" if roots else f"{DATA_ROOTS_ENV} is unset"
        raise ConfigError(
            f"runner.docker.volumes: {', '.join(outside)} bind host folders outside the data "
            f"roots that whoever runs the stack allows ({allowed}); bind a folder under them"
        )


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
    """Runs each stage in a fresh container of the operator's image (removed afterwards).

    Two sources of settings: ``config``, the config's ``runner.docker`` (validated: a
    non-root user, binds without the host's root or Docker socket, which must also lie
    under ``data_roots``), and ``settings``, the operator's (:mod:`flows.operator`: image,
    network, passed-through variables, extra binds; default: this process's environment).
    The container gets only the variables named in ``settings.env_passthrough`` (those
    set in this process) plus the explicit ``env``; GPUs are requested per container with
    ``device_requests`` when ``config.gpus`` is not 0. It runs as ``config.user`` with
    ``init`` (docker-init) as PID 1, so a stop's SIGTERM reaches the stage.
    ``create_options`` adds arguments of ``containers.create`` that the config does not
    have (``mem_limit``, ``cpu_quota``, ...). A call's timeout defaults to
    ``config.timeout_s``.
    """

    def __init__(
        self,
        config: DockerRunnerConfig,
        client: Any = None,
        *,
        settings: DockerSettings | None = None,
        data_roots: list[str] | None = None,
        init: bool = True,
        stop_timeout_s: int = 10,
        create_options: Mapping[str, Any] | None = None,
    ):
        self.config = config
        self.settings = settings or DockerSettings.from_env()
        check_binds_under_roots(config.volumes, data_roots)
        self._client = client
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
            name: os.environ[name] for name in self.settings.env_passthrough if name in os.environ
        }
        return stage_environment(passed, env)

    def container_kwargs(
        self, command: list[str], *, stage: str, env: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Arguments of ``client.containers.create`` for one stage container."""
        from docker.types import DeviceRequest

        cfg = self.config
        kwargs: dict[str, Any] = dict(
            image=self.settings.image,
            command=command,
            name=f"xlearner-{re.sub(r'[^a-zA-Z0-9_.-]', '-', stage)}-{uuid.uuid4().hex[:8]}",
            environment=self.environment(env),
            labels={**cfg.labels, STAGE_LABEL: stage},
            shm_size=cfg.shm_size,
            network_mode=self.settings.network_mode,
            volumes=[*self.settings.volumes, *cfg.volumes],
            user=cfg.user,
            init=self.init,
            **self.create_options,
        )
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
                "set XLEARNER_DOCKER_IMAGE in the worker's environment"
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
