"""The infrastructure sections: where stages run, where artefacts and metrics are kept."""

from __future__ import annotations

import posixpath
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from xlearner.config.base import LocalOrS3, StrictModel

# Stage-container settings that could reach the host: the operator's, from the worker's
# environment (flows/operator.py), never from the parameter form.
OPERATOR_DOCKER_SETTINGS = {
    "image": "XLEARNER_DOCKER_IMAGE",
    "network_mode": "XLEARNER_DOCKER_NETWORK",
    "env_passthrough": "XLEARNER_DOCKER_ENV_PASSTHROUGH",
}
DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
BIND_MODES = ("ro", "rw")
SIZE = re.compile(r"^[1-9][0-9]*[bkmg]?$")
USER = re.compile(r"^(?P<uid>[0-9]+)(:(?P<gid>[0-9]+))?$")


def check_bind(bind: str) -> str:
    """A ``host:container[:ro|rw]`` bind of absolute paths that exposes neither the host's
    root nor a Docker socket (whose holder controls the host)."""
    parts = bind.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]) or parts[2:] not in ([], ["ro"], ["rw"]):
        raise ValueError(f"{bind!r}: expected host_folder:container_folder[:ro|rw]")
    host, container = (posixpath.normpath(p) for p in parts[:2])
    if not (host.startswith("/") and container.startswith("/")):
        raise ValueError(f"{bind!r}: both folders must be absolute paths")
    if host == "/" or any(s == host or s.startswith(host + "/") for s in DOCKER_SOCKETS):
        raise ValueError(
            f"{bind!r}: binding {host} gives the container the host (its root or the Docker "
            "socket); bind a data folder under the operator's XLEARNER_DATA_ROOTS"
        )
    if posixpath.basename(host) == "docker.sock":
        raise ValueError(f"{bind!r}: a Docker socket gives the container the host")
    return bind


class DockerRunnerConfig(StrictModel):
    """What a config may choose about its stage containers (runner.kind: docker).

    The image, network and passed-through variables are the operator's
    (:data:`OPERATOR_DOCKER_SETTINGS`); binds must lie under the operator's data roots,
    checked where the stages start (``flows.runners.make_runner``).
    """

    gpus: int = Field(default=0, ge=-1, description="0: no GPU request; -1: all GPUs; N: N GPUs")
    shm_size: str = Field(default="2g", description="/dev/shm size: a number with b, k, m or g")
    user: str = Field(
        default="10001:10001", description="uid:gid in the container, numeric and not root (0)"
    )
    timeout_s: int = Field(default=24 * 3600, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    volumes: list[str] = Field(
        default_factory=list,
        description="host:container[:ro|rw] binds of folders under the operator's "
        "XLEARNER_DATA_ROOTS",
    )

    @model_validator(mode="before")
    @classmethod
    def _operator_settings_are_not_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and (given := sorted(set(data) & set(OPERATOR_DOCKER_SETTINGS))):
            where = ", ".join(f"{name}: {OPERATOR_DOCKER_SETTINGS[name]}" for name in given)
            raise ValueError(
                f"runner.docker.{', runner.docker.'.join(given)}: set by whoever runs the stack, "
                f"in the worker's environment ({where}), not in the config; remove it"
            )
        return data

    @field_validator("shm_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not SIZE.match(value.lower()):
            raise ValueError(f"{value!r}: expected a size such as 512m or 2g")
        return value

    @field_validator("user")
    @classmethod
    def _non_root(cls, value: str) -> str:
        if not (match := USER.match(value)):
            raise ValueError(f"{value!r}: expected a numeric uid:gid such as 10001:10001")
        if int(match["uid"]) == 0 or (match["gid"] is not None and int(match["gid"]) == 0):
            raise ValueError(f"{value!r}: stage containers never run as root (uid or gid 0)")
        return value

    @field_validator("volumes")
    @classmethod
    def _binds(cls, value: list[str]) -> list[str]:
        return [check_bind(bind) for bind in value]


class RunnerConfig(StrictModel):
    kind: Literal["process", "docker"] = "process"
    warm_start: bool = Field(
        default=True,
        description="process runner: fork stages from an interpreter that has imported them "
        "(saves seconds of imports per stage); off: a new `python -m stages.<name>` each",
    )
    docker: DockerRunnerConfig = DockerRunnerConfig()


class StoreConfig(StrictModel):
    uri: LocalOrS3 = Field(
        default=".xlearner/store", description="Local folder or s3://bucket/prefix"
    )
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; default: AWS_ENDPOINT_URL or AWS"
    )


class TrackingConfig(StrictModel):
    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; default: MLFLOW_TRACKING_URI or a local SQLite file",
    )
    experiment: str = "xlearner"
    register_model: str = "xlearner-backbone"
