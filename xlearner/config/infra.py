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
# A GPU as Docker and CUDA name it: an index (0) or a UUID (GPU-..., MIG-...).
GPU_ID = re.compile(r"^[0-9]{1,4}$|^(GPU|MIG)-[A-Za-z0-9-]{1,80}$")


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

    gpu_ids: list[str] | None = Field(
        default=None,
        max_length=1024,
        description="the host's GPUs (indexes or UUIDs) the stages share; None: detected "
        "with nvidia-smi (none when it is absent); []: every stage on CPU",
    )
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
        if isinstance(data, dict) and "gpus" in data:
            raise ValueError(
                "runner.docker.gpus: replaced by per-stage GPU counts; remove it and set "
                "resources.<stage>.gpus (e.g. resources.expand.gpus: 1, resources.reconcile."
                "gpus: -1 for all), with the host's GPUs in runner.docker.gpu_ids"
            )
        return data

    @field_validator("gpu_ids", mode="before")
    @classmethod
    def _indexes_as_text(cls, value: Any) -> Any:
        """YAML's ``[0, 1]`` means the ids ``"0"`` and ``"1"``."""
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("gpu_ids")
    @classmethod
    def _gpu_ids(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if bad := [gpu for gpu in value if not GPU_ID.match(gpu)]:
            raise ValueError(
                f"{bad}: expected GPU indexes (0, 1, ...) or UUIDs (GPU-..., MIG-...) as "
                "nvidia-smi --query-gpu=index,uuid lists them"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: each GPU once")
        return value

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


class RayRunnerConfig(StrictModel):
    """Where the stages run on a Ray cluster (runner.kind: ray)."""

    address: str | None = Field(
        default=None,
        description="Ray cluster address (ray://host:10001 or host:6379); default: RAY_ADDRESS",
    )
    working_dir: str | None = Field(
        default=None,
        description="Folder the stage commands run in on the cluster's nodes; default: where "
        "the stage image (or the nodes' install) has the project",
    )
    timeout_s: int = Field(default=24 * 3600, ge=1)


class RunnerConfig(StrictModel):
    kind: Literal["process", "docker", "ray"] = "process"
    warm_start: bool = Field(
        default=True,
        description="process runner: fork stages from an interpreter that has imported them "
        "(saves seconds of imports per stage); off: a new `python -m stages.<name>` each",
    )
    docker: DockerRunnerConfig = DockerRunnerConfig()
    ray: RayRunnerConfig = RayRunnerConfig()


class StageResources(StrictModel):
    """What one stage run gets: GPUs, CPUs and memory per node, nodes, processes per node.

    GPU counts are resolved against the host's GPU inventory when a stage starts
    (``runner.docker.gpu_ids``, or detected): ``-1`` is all of them, and on a host
    without GPUs every stage runs on CPU. More than one process (``nodes`` x
    ``procs_per_node``) runs the stage under torchrun (DDP).
    """

    gpus: int = Field(default=0, ge=-1, le=1024, description="per node; -1: all GPUs")
    cpus: float | None = Field(
        default=None, gt=0, le=4096, description="CPU cores per node; None: no limit"
    )
    memory: str | None = Field(
        default=None, description="memory per node (512m, 64g); None: no limit"
    )
    nodes: int = Field(default=1, ge=1, le=1024, description="machines (runner.kind: ray)")
    procs_per_node: int = Field(
        default=1, ge=0, le=1024, description="processes per node; 0: one per GPU (1 on CPU)"
    )

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and not SIZE.match(value.lower()):
            raise ValueError(f"{value!r}: expected a size such as 512m or 64g")
        return value

    @model_validator(mode="after")
    def _processes_fit_the_gpus(self) -> StageResources:
        if self.gpus > 0 and self.procs_per_node > self.gpus:
            raise ValueError(
                f"procs_per_node={self.procs_per_node} is more than gpus={self.gpus}: each "
                "process of a GPU stage trains on a GPU of its own; lower procs_per_node or "
                "raise gpus (procs_per_node: 0 is one process per GPU)"
            )
        return self


class ResourcesConfig(StrictModel):
    """Per-stage resources: ingest on CPU, one GPU per expansion, the joint stages on all
    GPUs given to them, transfer on one GPU (its linear probe fits on CPU)."""

    ingest: StageResources = StageResources()
    expand: StageResources = StageResources(gpus=1)
    reconcile: StageResources = StageResources(gpus=-1, procs_per_node=0)
    squeeze: StageResources = StageResources(gpus=-1, procs_per_node=0)
    transfer: StageResources = StageResources(gpus=1)

    def for_stage(self, stage: str) -> StageResources:
        return getattr(self, stage)


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
