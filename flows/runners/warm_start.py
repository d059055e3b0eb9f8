"""Stages forked from one interpreter that has imported them already (warm start).

A fresh ``python -m stages.<name>`` spends 3-7 s of CPU importing torch, torchvision,
MLflow and the library before its first line of work, and parallel stages start
together: on the quick start that start-up was most of the orchestration overhead
(docs/benchmarks.md). So the process runner forks stages from multiprocessing's fork
server instead: an interpreter started clean (exec'ed, so none of the flow's threads;
it inherits the flow's ``sys.path``) that imports :data:`PRELOAD` once. Each stage is a
fork of it that runs exactly what ``python -m stages.<name> ARGS`` runs, with its own
environment, working folder, process group and output pipe. The fork server exits when
the flow's process does (multiprocessing's own "alive" pipe), and a stage when the fork
server does (:mod:`xlearner.parent_death`): a killed flow leaves neither running.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import re
import runpy
import sys
import warnings
from collections.abc import Iterator, Mapping
from multiprocessing import forkserver
from multiprocessing.connection import Connection

from xlearner.parent_death import die_with_parent

PRELOAD = [
    "torch",
    "mlflow",
    "stages.ingest",
    "stages.expand",
    "stages.reconcile",
    "stages.squeeze",
    "stages.transfer",
]

_context = multiprocessing.get_context("forkserver")


def start() -> None:
    """Start the fork server if it is not running; it imports :data:`PRELOAD` meanwhile.

    Call it early (the flow does at its start) so that the imports overlap other work;
    the first fork waits for them. Preloading only applies to a server this call starts.
    """
    _context.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def _stage_main(
    module: str, args: list[str], env: dict[str, str], cwd: str, output: Connection
) -> None:
    """In the forked child: become ``python -m module args`` with ``env``, output to the pipe."""
    die_with_parent(os.getppid())  # the fork server, which exits with the flow's process
    # ... once no process holds its "alive" pipe: multiprocessing gives each fork the
    # flow's end of it (to start forks of its own), which would keep the server, and so
    # this stage, alive after the flow died. Stages start no forks from this server.
    alive_fd = forkserver._forkserver._forkserver_alive_fd
    if alive_fd is not None:
        os.close(alive_fd)
        forkserver._forkserver._forkserver_alive_fd = None
    os.setsid()  # its own process group, like start_new_session: a kill reaches its children
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    output.close()
    # New line-buffered streams on fds 1 and 2, for the rest of the child's life.
    sys.stdout = open(1, "w", buffering=1, errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="replace", closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)  # the flow's, at this stage's start (the server's may be another)
    if "OMP_NUM_THREADS" in env and "torch" in sys.modules:  # torch read it at import
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [module, *args]
    # The preloaded module is run again as __main__, which is what `python -m` runs.
    warnings.filterwarnings("ignore", re.escape(f"'{module}' found in sys.modules"), RuntimeWarning)
    try:  # the stage's `sys.exit(main())` ends the child with the stage's exit code
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        # multiprocessing ends children with os._exit: run the atexit handlers (temporary
        # folders, MLflow's active run, ...) as an interpreter exiting normally does.
        atexit._run_exitfuncs()


class ForkedStage:
    """A stage forked from the fork server (a :class:`flows.runners.process.LocalProcess`)."""

    def __init__(
        self, module: str, args: list[str], env: Mapping[str, str], cwd: str | os.PathLike | None
    ):
        start()
        reader, writer = _context.Pipe(duplex=False)
        self._process = _context.Process(
            target=_stage_main,
            args=(module, list(args), dict(env), str(cwd or os.getcwd()), writer),
            name=module,
        )
        self._process.start()
        writer.close()  # the child (and its children) hold the only write ends: EOF at exit
        self._reader = reader
        # Read as text, line by line; closed (with the pipe) in close().
        self._output = open(reader.fileno(), errors="replace", closefd=False)  # noqa: SIM115
        self.pid: int = self._process.pid

    def lines(self) -> Iterator[str]:
        return iter(self._output.readline, "")

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self._process.join(timeout)
        return self._process.exitcode

    def close(self) -> None:
        self._output.close()
        self._reader.close()
