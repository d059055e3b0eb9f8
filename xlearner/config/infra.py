"""The infrastructure sections: where stages run, where artefacts and metrics are kept."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from xlearner.config.base import StrictModel


class DockerRunnerConfig(StrictModel):
    image: str = "xlearner-stage:latest"
    gpus: int = Field(default=0, description="0: no GPU request; -1: all GPUs; N: N GPUs")
    shm_size: str = "2g"
    network_mode: str = "host"
    user: str = Field(default="10001:10001", description="uid:gid in the container (non-root)")
    timeout_s: int = Field(default=24 * 3600, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    volumes: list[str] = Field(default_factory=list, description="host:container[:mode] binds")
    env_passthrough: list[str] = Field(
        default_factory=lambda: [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "MLFLOW_TRACKING_URI",
            "MLFLOW_S3_ENDPOINT_URL",
        ]
    )


class RunnerConfig(StrictModel):
    kind: Literal["process", "docker"] = "process"
    warm_start: bool = Field(
        default=True,
        description="process runner: fork stages from an interpreter that has imported them "
        "(saves seconds of imports per stage); off: a new `python -m stages.<name>` each",
    )
    docker: DockerRunnerConfig = DockerRunnerConfig()


class StoreConfig(StrictModel):
    uri: str = Field(default=".xlearner/store", description="Local folder or s3://bucket/prefix")
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
