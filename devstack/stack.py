"""The whole local stack: SeaweedFS (S3) + MLflow + Prefect, in-process or detached.

:class:`LocalStack` runs the three as a context manager (the integration tests);
:func:`stack_up` / :func:`stack_down` (``xlearner stack up`` / ``down``) start them
detached, record their pids in ``stack.json`` and the client variables in ``stack.env``.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devstack.credentials import ApiCredentials
from devstack.servers import MlflowServer, PrefectServer, S3Settings, SeaweedFS
from devstack.service import Service, ServiceError, group_alive, start_time, stop_group

STACK_STATE = "stack.json"
STACK_ENV = "stack.env"


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
    in parallel (each waits for its own health check) and stop in reverse order. Prefect
    and MLflow require ``credentials`` (default: :meth:`ApiCredentials.resolve`).
    """

    def __init__(
        self,
        workdir: str | Path,
        access_key: str | None = None,
        secret_key: str | None = None,
        bucket: str = "xlearner",
        host: str = "127.0.0.1",
        credentials: ApiCredentials | None = None,
    ):
        self.workdir = Path(workdir).resolve()
        if not (access_key and secret_key):
            access_key, secret_key = generated_credentials()
        self.credentials = credentials or ApiCredentials.resolve()
        self.host = host
        self.seaweedfs = SeaweedFS(
            self.workdir / "s3",
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            host=host,
        )
        self.s3 = S3Settings(self.seaweedfs.endpoint_url, bucket, access_key, secret_key)
        self.mlflow = MlflowServer(
            self.workdir,
            self.s3,
            host=host,
            username=self.credentials.mlflow_username,
            password=self.credentials.mlflow_password,
        )
        self.prefect = PrefectServer(
            self.workdir, host=host, auth_string=self.credentials.prefect_auth_string
        )

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
        """Variables for a client: Prefect API, MLflow tracking, S3 endpoint, credentials."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            **self.credentials.client_env(),
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


def _previous_env(workdir: Path) -> dict[str, str]:
    """The ``stack.env`` of a previous ``stack up`` in ``workdir`` ({} when there is none)."""
    env_file = workdir / STACK_ENV
    return read_env_file(env_file) if env_file.is_file() else {}


def _stack_credentials(workdir: Path) -> tuple[str | None, str | None]:
    """The identity of a previous ``stack up`` in ``workdir`` (its S3 data stays readable)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return None, None  # generated_credentials() takes them from the environment
    env = _previous_env(workdir)
    return env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")


def running_services(workdir: str | Path) -> dict[str, int]:
    """Services of ``workdir/stack.json`` still running (same pid and start time): name -> pid."""
    state_file = Path(workdir) / STACK_STATE
    if not state_file.is_file():
        return {}
    state = json.loads(state_file.read_text())
    return {
        name: info["pid"]
        for name, info in state["services"].items()
        if start_time(info["pid"]) == info["start_time"] and group_alive(info["pid"])
    }


def stack_up(workdir: str | Path) -> Path:
    """Start the stack detached (it outlives this process); returns ``workdir/stack.env``.

    The pids go to ``workdir/stack.json`` for :func:`stack_down`; ``stack.env`` (mode
    0600) holds the client variables, the S3 secret and the Prefect and MLflow
    credentials included (taken from the environment or ``*_FILE`` variables, else from
    the previous ``stack.env``, else generated).
    """
    workdir = Path(workdir).resolve()
    if running := running_services(workdir):
        raise ServiceError(
            f"a stack already runs from {workdir} ({', '.join(running)}); "
            f"use {workdir / STACK_ENV} or stop it with `xlearner stack down --workdir {workdir}`"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    credentials = ApiCredentials.resolve(previous=_previous_env(workdir))
    stack = LocalStack(workdir, *_stack_credentials(workdir), credentials=credentials)
    stack.start()
    state = {
        "services": {
            service.name: {
                "pid": service.process.pid,
                "start_time": start_time(service.process.pid),
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
        "# written by `xlearner stack up`; holds the S3, Prefect and MLflow secrets\n"
        + "\n".join(lines)
        + "\n",
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
