"""The GPUs of one host and which stage holds which: disjoint device ids per stage run.

The host's inventory is ``runner.docker.gpu_ids`` or, when unset, what ``nvidia-smi``
lists (none without it: every stage then runs on CPU). A stage's ``resources.<stage>``
is resolved against it (:func:`resolve_resources`: ``gpus: -1`` is all of them) and, for
a stage with GPUs, :class:`GpuAllocator` hands out ids that no other stage holds:

- a Prefect global concurrency limit ``xlearner-gpus-<host>`` with one slot per GPU
  (the host: the Docker engine's for the Docker runner, else this machine's)
  (made here if missing) queues the stages that find no free GPU, in the Prefect UI's
  Concurrency page, and counts the flow runs of every worker of that server;
- a lock file per id (``flock``, under ``XLEARNER_GPU_LOCK_DIR``, default
  ``<tmp>/xlearner-gpu-locks``; flow runs in containers of their own need it bound in,
  see :func:`flows.deployments.docker_job_variables`) says which ids are taken: two
  flow runs on one host, even of different Prefect servers, never share one, and a
  process that dies frees its ids with its locks (its concurrency slots with their
  lease).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from flows.runners.base import StageFailed
from xlearner.config import PipelineConfig, StageResources
from xlearner.contract import ExitCode

LOCK_DIR_ENV = "XLEARNER_GPU_LOCK_DIR"
NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"]
POLL_S = 0.5  # how often a stage that got its slots looks for free lock files
logger = logging.getLogger("xlearner.gpus")

LogFn = Callable[[str], None]


class _Once:
    """What this process found out once: the detected GPUs, the limits it made, the
    "no GPU" notice."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.detected: list[str] | None = None
        self.limits: set[tuple[str, int]] = set()
        self.told_cpu = False


_once = _Once()


def detect_gpus() -> list[str]:
    """The indexes ``nvidia-smi`` lists; none when it is absent or fails (said in the log)."""
    if shutil.which(NVIDIA_SMI_QUERY[0]) is None:
        return []
    try:
        listed = subprocess.run(
            NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("%s failed (%s): no GPU is used", " ".join(NVIDIA_SMI_QUERY), err)
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def gpu_inventory(configured: list[str] | None) -> list[str]:
    """``configured`` (``runner.docker.gpu_ids``) or, when None, the detected GPUs."""
    with _once.lock:
        if configured is not None:
            inventory = list(configured)
        else:
            if _once.detected is None:
                _once.detected = detect_gpus()
            inventory = list(_once.detected)
        if not inventory and not _once.told_cpu:
            _once.told_cpu = True
            where = "runner.docker.gpu_ids is []" if configured is not None else "none detected"
            logger.warning("no GPU on this host (%s): every stage runs on CPU", where)
    return inventory


def resolve_resources(
    stage: str, resources: StageResources, inventory: list[str]
) -> StageResources:
    """``resources`` with concrete counts for this host: ``gpus`` 0..len(inventory) (0
    without GPUs, all of them for -1), ``procs_per_node`` >= 1 (0: one per GPU, 1 on CPU).

    Raises :class:`StageFailed` (``BAD_INPUT``, not retried) when the stage asks for more
    GPUs than the host has, or for more processes than the GPUs it gets.
    """
    if not inventory:
        gpus = 0
    elif resources.gpus == -1:
        gpus = len(inventory)
    elif resources.gpus > len(inventory):
        raise StageFailed(
            stage,
            ExitCode.BAD_INPUT,
            "",
            f"was not started: resources.{stage}.gpus={resources.gpus} is more than the "
            f"{len(inventory)} GPU(s) of this host ({','.join(inventory)}: runner.docker.gpu_ids "
            f"or detected); lower resources.{stage}.gpus, or -1 for all of them",
        )
    else:
        gpus = resources.gpus
    procs = resources.procs_per_node or max(gpus, 1)
    if gpus and procs > gpus:
        raise StageFailed(
            stage,
            ExitCode.BAD_INPUT,
            "",
            f"was not started: resources.{stage}.procs_per_node={procs} is more than the {gpus} "
            f"GPU(s) it gets on this host; lower it (0: one process per GPU)",
        )
    return resources.model_copy(update={"gpus": gpus, "procs_per_node": procs})


def limit_name(host: str) -> str:
    """The host's global concurrency limit (Prefect names allow no ``/ % & > <``)."""
    return "xlearner-gpus-" + re.sub(r"[^A-Za-z0-9_.-]", "-", host)


class GpuAllocator:
    """Disjoint ids of a host's ``inventory`` for the stage runs that need GPUs."""

    def __init__(
        self,
        inventory: list[str],
        *,
        host: str | None = None,
        lock_dir: str | os.PathLike | None = None,
        poll_s: float = POLL_S,
    ):
        if not inventory:
            raise ValueError("a GPU allocator needs GPUs (an empty inventory runs on CPU)")
        self.inventory = list(inventory)
        self.limit = limit_name(host or socket.gethostname())
        default_dir = Path(tempfile.gettempdir()) / "xlearner-gpu-locks"
        self.lock_dir = Path(lock_dir or os.environ.get(LOCK_DIR_ENV) or default_dir)
        self.poll_s = poll_s

    @contextlib.contextmanager
    def allocate(self, stage: str, count: int, log: LogFn | None = None) -> Iterator[list[str]]:
        """``count`` ids no other stage holds while the block runs; waits until there are."""
        from prefect.concurrency.sync import concurrency

        if not 0 < count <= len(self.inventory):
            raise ValueError(f"{count} GPU(s) asked of an inventory of {len(self.inventory)}")
        self._ensure_limit()
        (log or logger.info)(f"{stage}: asking for {count} GPU(s) (concurrency limit {self.limit})")
        # strict: a limit deleted meanwhile fails the stage instead of letting it through
        with concurrency(self.limit, occupy=count, strict=True):
            held = self._lock_ids(stage, count, log or logger.info)
            try:
                yield [gpu for gpu, _ in held]
            finally:
                for _, fd in held:
                    os.close(fd)  # releases its flock

    def _ensure_limit(self) -> None:
        """The limit exists with one slot per GPU of the inventory (once per process)."""
        key = (self.limit, len(self.inventory))
        with _once.lock:
            if key in _once.limits:
                return
            from prefect.client.orchestration import get_client
            from prefect.exceptions import ObjectAlreadyExists

            with get_client(sync_client=True) as client:
                try:
                    client.upsert_global_concurrency_limit_by_name(self.limit, len(self.inventory))
                except ObjectAlreadyExists:  # another process made it between read and create
                    client.upsert_global_concurrency_limit_by_name(self.limit, len(self.inventory))
            _once.limits.add(key)

    def _lock_ids(self, stage: str, count: int, log: LogFn) -> list[tuple[str, int]]:
        """Take the lock files of ``count`` free ids; hold none while waiting for more."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            held: list[tuple[str, int]] = []
            for gpu in self.inventory:
                fd = os.open(self.lock_dir / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                held.append((gpu, fd))
                if len(held) == count:
                    log(f"{stage}: on GPU(s) {','.join(g for g, _ in held)}")
                    return held
            for _, fd in held:
                os.close(fd)
            if not told:  # held by flow runs that another Prefect server counts
                told = True
                log(f"{stage}: waiting for {count} free GPU(s) of {','.join(self.inventory)}")
            time.sleep(self.poll_s)


@contextlib.contextmanager
def stage_gpus(
    cfg: PipelineConfig, stage: str, host: Callable[[], str], log: LogFn | None = None
) -> Iterator[tuple[StageResources, list[str] | None]]:
    """A stage's resources resolved for the ``host()`` it runs on and the GPU ids it holds
    meanwhile: ``[]`` on CPU; None on Ray, whose scheduler places the GPUs itself."""
    resources = cfg.resources.for_stage(stage)
    if cfg.runner.kind == "ray":
        yield resources, None
        return
    inventory = gpu_inventory(cfg.runner.docker.gpu_ids)
    resolved = resolve_resources(stage, resources, inventory)
    if resolved.gpus == 0:
        yield resolved, []
        return
    with GpuAllocator(inventory, host=host()).allocate(stage, resolved.gpus, log) as gpu_ids:
        yield resolved, gpu_ids
