"""The Docker runner: each stage in a fresh container, its logs streamed, removed afterwards."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flows.operator import DATA_ROOTS_ENV, DockerSettings, data_roots, is_under
from flows.runners.base import ChildProcess, StageRunner, logger, stage_environment
from xlearner.config import ConfigError, DockerRunnerConfig, StageResources

STAGE_LABEL = "xlearner.stage"
# Who started a stage container: the runner's host (and pid namespace), pid and that
# process's start time (the pid of a process that died may be taken by a new one).
OWNER_HOST_LABEL = "xlearner.owner.host"
OWNER_PID_LABEL = "xlearner.owner.pid"
OWNER_STARTED_LABEL = "xlearner.owner.started"
OOM_EVENT_WAIT_S = 2.0


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


def process_started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot, ``/proc/<pid>/stat``); None if
    there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime


def owner_host() -> str:
    """This host's name and pid namespace: where an owner's pid means that process."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # pid:[4026531836]
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{namespace}"


def owner_labels() -> dict[str, str]:
    """The labels that name this process as a container's owner."""
    pid = os.getpid()
    return {
        OWNER_HOST_LABEL: owner_host(),
        OWNER_PID_LABEL: str(pid),
        OWNER_STARTED_LABEL: process_started(pid) or "",
    }


def remove_orphans(client: Any) -> list[str]:
    """Remove the stage containers whose owner, a runner process of this host, is gone
    (killed with SIGKILL, or its host rebooted): nobody stops or removes them otherwise.
    Returns their names; removes nothing where processes cannot be looked up (no /proc)."""
    import docker

    if process_started(os.getpid()) is None:
        return []
    mine = {"label": [STAGE_LABEL, f"{OWNER_HOST_LABEL}={owner_host()}"]}
    removed = []
    for container in client.containers.list(all=True, filters=mine):
        labels = container.labels
        pid = labels.get(OWNER_PID_LABEL, "")
        started = process_started(int(pid)) if pid.isdigit() else None
        if started is not None and started == labels.get(OWNER_STARTED_LABEL):
            continue  # its owner runs
        try:
            container.remove(force=True)
        except docker.errors.NotFound:  # its owner's own removal came first
            continue
        except docker.errors.APIError as err:
            logger.warning("could not remove leftover container %s: %s", container.name, err)
            continue
        logger.warning(
            "removed leftover container %s of stage %r: its runner (pid %s on this host) is gone",
            container.name, labels.get(STAGE_LABEL), pid,
        )  # fmt: skip
        removed.append(container.name)
    return removed


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
        returncode = int(status["StatusCode"])
        if self._out_of_memory(returncode):
            reason = "killed by the kernel: out of memory"
        return returncode, reason

    def _out_of_memory(self, returncode: int) -> bool:
        """Whether the engine says the kernel killed it for memory. Its OOM event may come
        after the exit, so a SIGKILL's exit code (137) is looked at for a while longer."""
        looks_until = time.monotonic() + (OOM_EVENT_WAIT_S if returncode == 137 else 0.0)
        try:
            while True:
                self.container.reload()
                if self.container.attrs.get("State", {}).get("OOMKilled"):
                    return True
                if time.monotonic() >= looks_until:
                    return False
                time.sleep(0.1)
        except Exception:  # the reason is a nicety; the exit code is what counts
            return False

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
    set in this process) plus the explicit ``env``; a stage given ``gpu_ids`` (allocated by
    :mod:`flows.gpus`) gets exactly those devices (``DeviceRequest(device_ids=...)``, never
    a count, which the engine turns into "the first N" for every container), and its
    ``resources``' cpus and memory become the container's limits. It runs as ``config.user`` with
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

    def gpu_host(self) -> str:
        """The engine's host (whose GPUs the containers get), not this process's (a flow
        run's container has a name of its own)."""
        return str(self.client.info()["Name"])

    def environment(self, env: Mapping[str, str] | None) -> dict[str, str]:
        passed = {
            name: os.environ[name] for name in self.settings.env_passthrough if name in os.environ
        }
        return stage_environment(passed, env)

    def container_kwargs(
        self,
        command: list[str],
        *,
        stage: str,
        env: Mapping[str, str] | None = None,
        resources: StageResources | None = None,
        gpu_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """Arguments of ``client.containers.create`` for one stage container."""
        from docker.types import DeviceRequest

        cfg = self.config
        kwargs: dict[str, Any] = dict(
            image=self.settings.image,
            command=command,
            name=f"xlearner-{re.sub(r'[^a-zA-Z0-9_.-]', '-', stage)}-{uuid.uuid4().hex[:8]}",
            environment=self.environment(env),
            labels={**cfg.labels, **owner_labels(), STAGE_LABEL: stage},
            shm_size=cfg.shm_size,
            network_mode=self.settings.network_mode,
            volumes=[*self.settings.volumes, *cfg.volumes],
            user=cfg.user,
            init=self.init,
            **self.create_options,
        )
        if gpu_ids:
            kwargs["device_requests"] = [
                DeviceRequest(device_ids=list(gpu_ids), capabilities=[["gpu"]])
            ]
        if resources is not None and resources.cpus is not None:
            kwargs["nano_cpus"] = round(resources.cpus * 1e9)
        if resources is not None and resources.memory is not None:
            kwargs["mem_limit"] = resources.memory
        return kwargs

    def start(
        self,
        command: list[str],
        *,
        stage: str,
        env: Mapping[str, str] | None,
        resources: StageResources | None = None,
        gpu_ids: list[str] | None = None,
    ) -> ChildProcess:
        """Create the container, then start it: it is removed whatever happens after creation.
        First it removes the containers that killed runners left (:func:`remove_orphans`)."""
        remove_orphans(self.client)
        kwargs = self.container_kwargs(
            command, stage=stage, env=env, resources=resources, gpu_ids=gpu_ids
        )
        child = _Container(self._create(kwargs), kwargs["environment"], self.stop_timeout_s)
        try:
            self._start(child.container, stage, gpu_ids)
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

    def _start(self, container: Any, stage: str, gpu_ids: list[str] | None) -> None:
        import docker

        try:
            container.start()
        except docker.errors.APIError as err:
            hint = ""
            if gpu_ids:
                hint = (
                    f"; it asks for the GPUs {','.join(gpu_ids)} (resources.{stage}.gpus): the "
                    "host needs an NVIDIA driver and the NVIDIA Container Toolkit, or set "
                    f"resources.{stage}.gpus: 0 (runner.docker.gpu_ids: [] runs every stage on CPU)"
                )
            raise RuntimeError(
                f"cannot start the container of stage {stage!r}: {err.explanation or err}{hint}"
            ) from err
