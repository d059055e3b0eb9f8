"""The servers of the local stack: SeaweedFS (S3), ``mlflow server``, ``prefect server``."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from devstack.service import Service, find_tool, free_port, free_ports, http_status

DEFAULT_REGION = "us-east-1"


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
            find_tool("weed"),
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
        gateway = http_status(f"{self.endpoint_url}/")
        if gateway is None or gateway >= 500:
            return False
        bucket = http_status(f"{self.endpoint_url}/{self.bucket}", method="HEAD")
        return bucket is not None and bucket != 404 and bucket < 500


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
    upload artifacts through the server (``mlflow-artifacts:/``). With ``username`` and
    ``password`` it runs MLflow's basic-auth app: that user is its admin (created at the
    first start, its users database beside the tracking one), every other request than
    ``/health`` needs a user's credentials, and a user MLflow knows may read every
    experiment (``default_permission = READ``).
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
        username: str = "",
        password: str = "",
    ):
        self.workdir = Path(workdir)
        super().__init__(self.workdir / "mlflow.log")
        self.s3 = s3
        self.username = username
        self.password = password
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
            *(["--app-name", "basic-auth"] if self.auth else []),
        ]  # fmt: skip

    @property
    def auth(self) -> bool:
        return bool(self.username and self.password)

    @property
    def auth_config(self) -> Path:
        return self.workdir / "mlflow-auth.ini"

    def environment(self) -> dict[str, str]:
        env = {
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_DEFAULT_REGION": self.s3.region,
            "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint_url,
            # no GenAI job runners: they are seven more processes the pipeline never uses
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        if self.auth:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.auth_config.write_text(mlflow_auth_ini(self.workdir / "mlflow-auth.db"))
            env |= {
                "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
                # read at the first start only (an empty users database), never logged
                "MLFLOW_AUTH_ADMIN_USERNAME": self.username,
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.password,
                # signs the UI's CSRF tokens; a new one per start only logs UI users out
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
            }
        return env

    def is_ready(self) -> bool:
        return http_status(f"{self.url}/health") == 200


def mlflow_auth_ini(database: Path) -> str:
    """MLflow's basic-auth config: its users database and what a known user may do.

    The admin comes from ``MLFLOW_AUTH_ADMIN_USERNAME``/``_PASSWORD`` (no password here).
    """
    return (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{database.resolve()}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
    )


class PrefectServer(Service):
    """``prefect server start`` (API, UI and services) with its home and SQLite in ``workdir``.

    With ``auth_string`` (``user:password``) the API refuses every request without it
    (HTTP basic auth; ``/api/health`` and ``/api/ready`` excepted) and the UI asks for it.
    """

    name = "prefect"
    start_timeout_s = 180.0  # a loaded 2-core machine took 75 s

    def __init__(
        self,
        workdir: str | Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        auth_string: str = "",
    ):
        self.workdir = Path(workdir)
        super().__init__(self.workdir / "prefect.log")
        self.host = host
        self.port = port or free_port(host)
        self.auth_string = auth_string

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
            **({"PREFECT_SERVER_API_AUTH_STRING": self.auth_string} if self.auth_string else {}),
        }

    def is_ready(self) -> bool:
        return http_status(f"{self.api_url}/health") == 200
