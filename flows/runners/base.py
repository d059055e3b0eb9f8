"""What every stage runner shares: the stage protocol, log streaming, timeout, cancellation.

A stage is the command ``python -m stages.<name> <args...>`` (docs/architecture.md,
"Stages"): it prints one line ``XLEARNER_RESULT {json}`` (:data:`xlearner.contract.RESULT_PREFIX`)
and exits non-zero on failure; a stage of more than one process (its
:class:`~xlearner.config.StageResources`) runs under torchrun (:func:`torchrun_command`).
:meth:`StageRunner.run_command` starts it (the runner
kind says how: :meth:`StageRunner.start` returns a :class:`ChildProcess`), streams its
output line by line to a ``log`` callback as it comes, secrets masked, enforces a
timeout, stops it on cancellation (any ``BaseException``: Ctrl-C, Prefect's termination
signal) and raises :class:`StageFailed` with the tail of the log. :func:`stop_all` stops
every stage running in this process and starts no new one (``xlearner run`` on SIGINT or
SIGTERM); a runner that cannot start a stage fails it as ``ExitCode.TRANSIENT``.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from xlearner.config import StageResources
from xlearner.contract import RESULT_PREFIX, ExitCode
from xlearner.secrets import redact, secret_values

LOG_TAIL_LINES = 50
# MLflow lets an exported MLFLOW_RUN_ID override the parent run a stage is given
# (shared/NOTES.md): a stage environment never carries it.
FORBIDDEN_ENV = ("MLFLOW_RUN_ID",)

LogFn = Callable[[str], None]
logger = logging.getLogger("xlearner.stages")


@dataclass
class StageRun:
    """What a finished stage run gave back."""

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


class _Running:
    """The stages this process supervises now, and whether it is stopping them all."""

    def __init__(self) -> None:
        self.children: set[ChildProcess] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def add(self, child: ChildProcess) -> None:
        with self.lock:
            self.children.add(child)

    def discard(self, child: ChildProcess) -> None:
        with self.lock:
            self.children.discard(child)


_running = _Running()


def stopping() -> bool:
    """Whether :func:`stop_all` was called: no stage starts, none is retried."""
    return _running.stopping.is_set()


def stop_all() -> None:
    """Stop every stage this process runs (each its runner's way: SIGTERM, a grace period
    to checkpoint, SIGKILL) and start no new one; returns once they all ended."""
    _running.stopping.set()
    with _running.lock:
        children = list(_running.children)
    stoppers = [threading.Thread(target=child.stop, name="stage-stop") for child in children]
    for thread in stoppers:
        thread.start()
    for thread in stoppers:
        thread.join()


def stage_command(stage: str, args: list[str], python: str = "python") -> list[str]:
    return [python, "-m", f"stages.{stage}", *args]


TORCHRUN_MODULE = "torch.distributed.run"  # what the ``torchrun`` script runs


def torchrun_command(
    module: str,
    args: list[str],
    *,
    python: str,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> list[str]:
    """``python -m <module> <args>`` as ``nproc_per_node`` processes on each of ``nnodes``.

    One node: ``--standalone`` (a rendezvous on a free local port). Several: the c10d
    rendezvous at ``rdzv_endpoint`` (host:port of node 0), ``rdzv_id`` naming the job. A
    failed process fails the stage (``--max-restarts 0``): the Prefect retry resumes it
    from its checkpoint.
    """
    launch = [python, "-m", TORCHRUN_MODULE, "--nproc-per-node", str(nproc_per_node)]
    if nnodes == 1:
        launch.append("--standalone")
    else:
        if rdzv_endpoint is None or rdzv_id is None:
            raise ValueError(f"a launch on {nnodes} nodes needs rdzv_endpoint and rdzv_id")
        launch += ["--nnodes", str(nnodes), "--node-rank", str(node_rank)]
        launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
        launch += ["--rdzv-id", rdzv_id]
    return [*launch, "--max-restarts", "0", "-m", module, *args]


def processes_per_node(resources: StageResources | None, gpu_ids: list[str] | None) -> int:
    """How many processes a stage starts on a node: ``procs_per_node``, whose 0 is one per
    GPU it was given (one on CPU); one without ``resources``."""
    if resources is None:
        return 1
    if resources.procs_per_node:
        return resources.procs_per_node
    return len(gpu_ids) if gpu_ids else max(resources.gpus, 1)


def stage_environment(base: Mapping[str, str], env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` overlaid on ``base``, without the variables no stage may inherit."""
    merged = {**base, **(env or {})}
    for name in FORBIDDEN_ENV:
        merged.pop(name, None)
    return merged


class ChildProcess(Protocol):
    """A started stage as :meth:`StageRunner.run_command` supervises it.

    A local process (a subprocess or a fork) or a container. ``wait`` is called once its
    output ended and returns its exit code (None when ``deadline``, a ``time.monotonic()``
    value, passed first) and why it died, if known; ``close`` is called last, whatever
    happened.
    """

    environment: Mapping[str, str]  # what it was started with: these secrets are masked

    def lines(self) -> Iterator[str]: ...  # its merged stdout and stderr, line by line
    def wait(self, deadline: float | None) -> tuple[int | None, str]: ...
    def stop(self) -> None: ...  # end it (and what it started) now
    def close(self) -> None: ...  # release what it holds


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

    def finish(self, returncode: int, started: float) -> StageRun:
        if returncode != 0:
            raise self.failed(returncode)
        if self.bad_result is not None:
            raise self.failed(
                returncode, f"printed a malformed {RESULT_PREFIX.strip()} line: {self.bad_result}"
            )
        return StageRun(returncode, self.result, self.tail_text(), time.monotonic() - started)


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


def _default_log(line: str) -> None:
    logger.info("%s", line)


class StageRunner:
    """Runs a stage under the stage protocol; a subclass says how to :meth:`start` one."""

    python = "python"  # the interpreter that runs ``-m stages.<name>``
    timeout_s: float | None = None  # of a call that gives none
    timeout_ends = "stopped"  # what a timeout does to the stage, for the message

    def gpu_host(self) -> str:
        """The machine whose GPUs this runner's stages use (:mod:`flows.gpus` names its
        concurrency limit after it): this one."""
        return socket.gethostname()

    def start(
        self,
        command: list[str],
        *,
        stage: str,
        env: Mapping[str, str] | None,
        resources: StageResources | None = None,
        gpu_ids: list[str] | None = None,
    ) -> ChildProcess:
        """Start ``command`` with ``env`` overlaid on the runner's base environment, on the
        GPUs ``gpu_ids`` (None: not pinned) within ``resources`` (None: no limits)."""
        raise NotImplementedError

    def run(
        self,
        stage: str,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        log: LogFn | None = None,
        timeout_s: float | None = None,
        resources: StageResources | None = None,
        gpu_ids: list[str] | None = None,
    ) -> StageRun:
        """Run a stage on ``gpu_ids`` (the host GPUs allocated to it; None: not pinned)
        within ``resources`` (None: one process, no GPU request)."""
        return self.run_command(
            self.command(stage, args, resources, gpu_ids),
            stage=stage,
            env=env,
            log=log,
            timeout_s=timeout_s,
            resources=resources,
            gpu_ids=gpu_ids,
        )

    def command(
        self,
        stage: str,
        args: list[str],
        resources: StageResources | None,
        gpu_ids: list[str] | None,
    ) -> list[str]:
        """The stage's command on this host: under torchrun for more than one process."""
        nodes = resources.nodes if resources is not None else 1
        if nodes > 1:
            raise StageFailed(
                stage,
                ExitCode.BAD_INPUT,
                "",
                f"was not started: resources.{stage}.nodes={nodes} needs runner.kind: ray "
                f"({type(self).__name__} runs on one host)",
            )
        procs = processes_per_node(resources, gpu_ids)
        if procs > 1:
            return torchrun_command(
                f"stages.{stage}", args, python=self.python, nproc_per_node=procs
            )
        return stage_command(stage, args, self.python)

    def run_command(
        self,
        command: list[str],
        *,
        stage: str,
        env: Mapping[str, str] | None = None,
        log: LogFn | None = None,
        timeout_s: float | None = None,
        resources: StageResources | None = None,
        gpu_ids: list[str] | None = None,
    ) -> StageRun:
        """Run any command under the stage protocol (tests pass their own).

        Streams the child's output, enforces the timeout (default :attr:`timeout_s`),
        stops the child on any interruption and closes it whatever happens.
        """
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        if stopping():
            raise StageFailed(stage, ExitCode.STOPPED, "", "was not started: the run is stopping")
        try:
            child = self.start(command, stage=stage, env=env, resources=resources, gpu_ids=gpu_ids)
        except Exception as err:  # noqa: BLE001 - a container or a fork that did not start
            code = ExitCode.BAD_INPUT if isinstance(err, ValueError) else ExitCode.TRANSIENT
            reason = f"could not be started: {type(err).__name__}: {err}"
            raise StageFailed(stage, code, "", redact(reason, secret_values(env or {}))) from None
        _running.add(child)
        # From its start on: a warm-started stage's first fork may wait for the preloads.
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            collector = _LogCollector(stage, log or _default_log, secret_values(child.environment))
            returncode, reason = None, ""
            if _pump(child.lines(), collector, deadline):
                returncode, reason = child.wait(deadline)
            if returncode is None:
                child.stop()
                raise collector.failed(
                    None, f"timed out after {timeout_s:g} s and was {self.timeout_ends}"
                )
        except BaseException as err:
            if not isinstance(err, StageFailed):  # a timeout stopped it already
                child.stop()
            raise
        finally:
            _running.discard(child)
            child.close()
        if returncode != 0 and stopping():
            raise collector.failed(ExitCode.STOPPED, f"was stopped (exit code {returncode})")
        if returncode != 0 and reason:
            raise collector.failed(returncode, f"failed with exit code {returncode} ({reason})")
        return collector.finish(returncode, started)
