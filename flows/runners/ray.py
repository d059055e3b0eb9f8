"""The Ray runner: each stage as Ray work on an existing cluster (``runner.kind: ray``).

A stage is the same command as elsewhere, ``python -m stages.<name> <args>``, run in a
subprocess on a node by a Ray *streaming generator task* (:func:`_stage_task`) that
yields the node it landed on, then each output line, then the exit code: the base
(:class:`~flows.runners.base.StageRunner`) streams those lines to the Prefect task log,
enforces the timeout, and fails the stage with its log tail. The task asks Ray for the
stage's :class:`~xlearner.config.StageResources` (CPUs, GPUs, memory per node; Ray's
scheduler places the GPUs and sets ``CUDA_VISIBLE_DEVICES``), spread over the nodes
(``SPREAD``) so parallel expansions land on different machines.

A stage of several processes runs under torchrun: on one node ``--standalone``; on
``nodes`` > 1, one task per node in a placement group with one bundle per node
(``STRICT_SPREAD``), node 0's task picking the c10d rendezvous endpoint (its address
and a free port) that the others join. Lines of nodes other than 0 are shown prefixed
``[node i]``; only node 0's can be the stage's result line.

Stopping (cancellation, timeout) cancels the Ray work: the task gets ``KeyboardInterrupt``
and sends SIGTERM to the stage's process group (it checkpoints and exits), SIGKILL after
a grace; a task that did not end by then is force-cancelled (its worker exits, and the
stage, which dies with its parent, gets SIGTERM). A node lost mid-stage fails the stage
as ``ExitCode.TRANSIENT``, Ray itself never retrying it: the Prefect retry reruns it,
and it resumes from its checkpoint in the store.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError, TaskCancelledError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from flows.runners.base import (
    StageRunner,
    processes_per_node,
    stage_command,
    stage_environment,
    torchrun_command,
)
from xlearner.config import RayRunnerConfig, StageResources
from xlearner.contract import ExitCode
from xlearner.parent_death import die_with_parent

NODE_PYTHON = "python"  # in a command: the interpreter of the node's Ray worker
TASK_PREFIX = "xlearner-"  # Ray task names: xlearner-<stage>[-node<i>]
KILL_GRACE_S = 10.0  # between SIGTERM (checkpoint and exit) and SIGKILL
SIZE_UNITS = {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

_connect_lock = threading.Lock()


def connect(address: str | None) -> None:
    """Connect this process to the cluster at ``address`` (default ``RAY_ADDRESS``), once.

    Never starts a local cluster: without an address it fails the stage, saying what to set.
    """
    with _connect_lock:
        if ray.is_initialized():
            return
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise ValueError(
                "runner.kind is ray but no cluster is given: set runner.ray.address in the "
                "config (ray://head:10001 or head:6379) or RAY_ADDRESS in the worker's "
                "environment"
            )
        # The stages' output comes back through the task, not through the driver's stdout.
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def memory_bytes(size: str | None) -> int | None:
    """``64g`` (StageResources.memory) as bytes, Ray's unit."""
    if size is None:
        return None
    size = size.lower()
    unit = size[-1] if size[-1] in SIZE_UNITS else "b"
    return int(size.rstrip("bkmg")) * SIZE_UNITS[unit]


def cluster_gpus_per_node() -> int:
    """The most GPUs any live node has (0 on a CPU cluster)."""
    return max(
        (int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0
    )


@dataclass(frozen=True)
class NodeLaunch:
    """What one node of a stage runs: the command, and how torchrun wraps it there."""

    command: list[str]
    env: dict[str, str]
    cwd: str | None
    procs: int  # processes on this node (torchrun when > 1 or nodes > 1)
    nodes: int
    node_rank: int
    rdzv_id: str
    rdzv_endpoint: str | None  # node 0 picks it (None), the others are given it

    def node_command(self, python: str, endpoint: str) -> list[str]:
        command = [python if self.command[0] == NODE_PYTHON else self.command[0], *self.command[1:]]
        if self.procs == 1 and self.nodes == 1:
            return command
        if command[1:2] != ["-m"] or len(command) < 3:
            raise ValueError(f"{command}: only a `python -m <module>` command runs under torchrun")
        return torchrun_command(
            command[2],
            command[3:],
            python=python,
            nproc_per_node=self.procs,
            nnodes=self.nodes,
            node_rank=self.node_rank,
            rdzv_endpoint=endpoint if self.nodes > 1 else None,
            rdzv_id=self.rdzv_id if self.nodes > 1 else None,
        )


def _free_port() -> int:
    """A port free now on this node (torchrun's c10d store binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _end_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the stage's process group (it checkpoints), SIGKILL after ``grace_s``."""
    for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


@ray.remote(max_retries=0)  # a lost node fails the stage; the Prefect retry resumes it
def _stage_task(launch: NodeLaunch) -> Iterator[Any]:
    """On a node: run the stage, yield ``{"node_id", "ip", "endpoint"}``, its output lines,
    then ``{"exit": code}``."""
    ip = ray.util.get_node_ip_address()
    endpoint = launch.rdzv_endpoint or f"{ip}:{_free_port()}"
    yield {"node_id": ray.get_runtime_context().get_node_id(), "ip": ip, "endpoint": endpoint}
    env = stage_environment(os.environ, launch.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    process = subprocess.Popen(
        launch.node_command(sys.executable, endpoint),
        cwd=launch.cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
        preexec_fn=functools.partial(die_with_parent, os.getpid()),  # a force-cancel kills it
    )
    # Read on a thread: ray.cancel raises KeyboardInterrupt in this (main) thread only
    # between bytecodes, never inside a blocking read.
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in iter(process.stdout.readline, ""):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name="stage-output", daemon=True).start()
    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            yield line
        yield {"exit": process.wait()}
    finally:  # ray.cancel: KeyboardInterrupt here
        _end_process_group(process, KILL_GRACE_S)


def _failure(err: RayError) -> tuple[int, str]:
    """The exit code and reason of a node's task that Ray reports failed."""
    if isinstance(err, TaskCancelledError):
        return ExitCode.STOPPED, "its Ray task was cancelled"
    if isinstance(err, RayTaskError):  # our task code raised: the same again on a rerun
        return ExitCode.FAILED, f"its Ray task failed: {str(err).strip().splitlines()[-1]}"
    # a node, a worker or an object lost: infrastructure, worth a retry
    return ExitCode.TRANSIENT, f"its Ray node was lost ({type(err).__name__})"


class _NodeStream:
    """One node's task of a stage: its generator, where it runs, how it ended."""

    def __init__(self, generator: ray.ObjectRefGenerator, rank: int):
        self.generator = generator
        self.rank = rank
        self.node: dict[str, str] | None = None
        self.returncode: int | None = None
        self.reason = ""

    def first(self) -> dict[str, str] | None:
        """Where it runs (its first item), or None when it failed first."""
        for item in self.items():
            if isinstance(item, dict):
                self.node = item
                return item
        return None

    def items(self) -> Iterator[Any]:
        try:
            for ref in self.generator:
                item = ray.get(ref)
                if isinstance(item, dict) and "exit" in item:
                    self.returncode = item["exit"]
                    return
                yield item
        except RayError as err:
            self.returncode, self.reason = _failure(err)

    def lines(self) -> Iterator[str]:
        prefix = f"[node {self.rank}] " if self.rank else ""
        for item in self.items():
            if isinstance(item, str):
                yield prefix + item


class _Stopped(Exception):
    """The stage was stopped while its nodes were being started."""


class RayStage:
    """A stage on the cluster, as :meth:`StageRunner.run_command` supervises it."""

    def __init__(
        self,
        stage: str,
        command: list[str],
        env: Mapping[str, str] | None,
        resources: StageResources,
        cwd: str | None,
        environment: dict[str, str],
    ):
        self.stage = stage
        self.environment = environment
        gpus = resources.gpus if resources.gpus >= 0 else cluster_gpus_per_node()
        if gpus and not cluster_gpus_per_node():
            gpus = 0  # a CPU cluster: every stage on CPU, as on a host without GPUs
        self.nodes = resources.nodes
        procs = processes_per_node(resources.model_copy(update={"gpus": gpus}), None)
        self.bundle = {"CPU": resources.cpus or 1.0, "GPU": gpus}
        if (memory := memory_bytes(resources.memory)) is not None:
            self.bundle["memory"] = memory
        self.launch = NodeLaunch(
            command, dict(env or {}), cwd, procs, self.nodes, 0, uuid.uuid4().hex, None
        )
        self.launch.node_command(NODE_PYTHON, "node0:0")  # a command torchrun cannot run: here
        self.group: PlacementGroup | None = None
        self.streams: list[_NodeStream] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.failed_first: _NodeStream | None = None  # of several nodes: the cause
        if self.nodes == 1:
            self.streams.append(_NodeStream(self._submit(self.launch, "SPREAD"), 0))

    def _submit(self, launch: NodeLaunch, strategy: Any) -> ray.ObjectRefGenerator:
        name = TASK_PREFIX + self.stage + (f"-node{launch.node_rank}" if self.nodes > 1 else "")
        options: dict[str, Any] = {
            "name": name,
            "num_cpus": self.bundle["CPU"],
            "num_gpus": self.bundle["GPU"],
            "scheduling_strategy": strategy,
        }
        if "memory" in self.bundle:
            options["memory"] = self.bundle["memory"]
        return _stage_task.options(**options).remote(launch)

    def _start_nodes(self) -> Iterator[str]:
        """Reserve one bundle per node, start node 0, then the others at its endpoint."""
        bundles = [{k: v for k, v in self.bundle.items() if v}] * self.nodes
        with self.lock:
            if self.stopped.is_set():
                return
            self.group = placement_group(bundles, strategy="STRICT_SPREAD")
        ready = self.group.ready()
        if not ray.wait([ready], timeout=1.0)[0]:
            yield f"[ray] waiting for {self.nodes} nodes with {bundles[0]} each"
            while not ray.wait([ready], timeout=1.0)[0]:
                if self.stopped.is_set():
                    return

        def submit(rank: int, endpoint: str | None) -> _NodeStream:
            launch = dataclasses.replace(self.launch, node_rank=rank, rdzv_endpoint=endpoint)
            at = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank)
            with self.lock:
                if self.stopped.is_set():
                    raise _Stopped
                stream = _NodeStream(self._submit(launch, at), rank)
                self.streams.append(stream)
            return stream

        first = submit(0, None).first()
        if first is None:
            return
        yield self._where(self.streams[0])
        for rank in range(1, self.nodes):
            submit(rank, first["endpoint"])

    @staticmethod
    def _where(stream: _NodeStream) -> str:
        node = stream.node or {}
        return f"[ray] node {stream.rank} of the stage on {node.get('node_id')} ({node.get('ip')})"

    def lines(self) -> Iterator[str]:
        try:
            if self.nodes == 1:
                if self.streams[0].first() is not None:
                    yield self._where(self.streams[0])
                yield from self.streams[0].lines()
                return
            yield from self._start_nodes()
            yield from self._merged()
        except _Stopped:
            return

    def _merged(self) -> Iterator[str]:
        """Every node's lines as they come; the first node to fail ends the others."""
        pending: queue.Queue = queue.Queue()

        def read(stream: _NodeStream) -> None:
            try:
                if stream.rank and stream.first() is not None:
                    pending.put(self._where(stream))
                for line in stream.lines():
                    pending.put(line)
            finally:
                pending.put(stream)

        for stream in self.streams:
            threading.Thread(target=read, args=(stream,), daemon=True).start()
        running = len(self.streams)
        while running:
            item = pending.get()
            if isinstance(item, str):
                yield item
                continue
            running -= 1
            if item.returncode != 0 and not self.stopped.is_set():
                self.failed_first = self.failed_first or item
                threading.Thread(target=self.stop, name="ray-stage-stop", daemon=True).start()

    def wait(self, deadline: float | None) -> tuple[int | None, str]:
        if not self.streams:
            return ExitCode.STOPPED, "stopped before its nodes were reserved"
        for stream in [s for s in [self.failed_first] if s] + self.streams:
            if stream.returncode is None:
                stream.returncode = ExitCode.TRANSIENT
                stream.reason = stream.reason or "its Ray task ended without an exit code"
            if stream.returncode:  # the first node to fail: the cause
                node = f"node {stream.rank}: " if self.nodes > 1 else ""
                return stream.returncode, node + stream.reason
        return 0, ""

    def stop(self) -> None:
        """Cancel every node's task (SIGTERM to the stage, SIGKILL after the grace);
        force-cancel those that did not end by then."""
        with self.lock:
            self.stopped.set()
            generators = [s.generator for s in self.streams]
        for generator in generators:
            ray.cancel(generator, force=False)
        done = [g.completed() for g in generators]
        _, unfinished = ray.wait(done, num_returns=len(done), timeout=KILL_GRACE_S + 15.0)
        for generator, ref in zip(generators, done, strict=True):
            if ref in unfinished:
                ray.cancel(generator, force=True)

    def close(self) -> None:
        with self.lock:
            self.stopped.set()
            if self.group is not None:
                remove_placement_group(self.group)
                self.group = None


class RayRunner(StageRunner):
    """Runs each stage as Ray work on the cluster at ``config.address`` (or RAY_ADDRESS),
    with the stage's resources; the project is installed on the nodes (the stage image)."""

    python = NODE_PYTHON
    timeout_ends = "cancelled on the Ray cluster"

    def __init__(self, config: RayRunnerConfig):
        self.config = config
        self.timeout_s = config.timeout_s

    def command(
        self,
        stage: str,
        args: list[str],
        resources: StageResources | None,
        gpu_ids: list[str] | None,
    ) -> list[str]:
        """The stage command as it is; torchrun wraps it on the nodes (where the
        rendezvous endpoint is known). ``gpu_ids`` are ignored: Ray places GPUs."""
        return stage_command(stage, args, self.python)

    def start(
        self,
        command: list[str],
        *,
        stage: str,
        env: Mapping[str, str] | None,
        resources: StageResources | None = None,
        gpu_ids: list[str] | None = None,
    ) -> RayStage:
        connect(self.config.address)
        return RayStage(
            stage,
            command,
            env,
            resources or StageResources(),
            self.config.working_dir,
            stage_environment(os.environ, env),  # masked in its log: the flow's secrets
        )
