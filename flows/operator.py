"""What whoever runs the stack sets, and a Prefect UI user cannot: the worker's environment.

A pipeline deployment's parameter (the ``config`` form) is editable by every Prefect UI
user, so nothing in it may reach the host. The settings that could are read here, from
the environment of the process that runs the flow (the worker, its work pool's base job
template, ``xlearner stack up``), never from a flow parameter:

- ``XLEARNER_DOCKER_IMAGE``: the stage image (default :data:`DEFAULT_IMAGE`);
- ``XLEARNER_DOCKER_NETWORK``: the stage containers' network (default ``host``);
- ``XLEARNER_DOCKER_ENV_PASSTHROUGH``: comma-separated variables of this process that
  stage containers get (default :data:`DEFAULT_ENV_PASSTHROUGH`);
- ``XLEARNER_DOCKER_VOLUMES``: comma-separated ``host:container[:mode]`` binds every
  stage container gets (trusted: the operator's);
- ``XLEARNER_DATA_ROOTS``: comma-separated local folders or ``s3://bucket/prefix`` URIs
  where data may live: the host folders a config's ``runner.docker.volumes`` may bind,
  and where a source that the config does not list may come from (:mod:`flows.trigger`).
  Unset: no user bind, no unlisted source.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from flows.images import stage_image

DATA_ROOTS_ENV = "XLEARNER_DATA_ROOTS"
IMAGE_ENV = "XLEARNER_DOCKER_IMAGE"
NETWORK_ENV = "XLEARNER_DOCKER_NETWORK"
ENV_PASSTHROUGH_ENV = "XLEARNER_DOCKER_ENV_PASSTHROUGH"
VOLUMES_ENV = "XLEARNER_DOCKER_VOLUMES"
OPERATOR_ENV = (IMAGE_ENV, NETWORK_ENV, ENV_PASSTHROUGH_ENV, VOLUMES_ENV, DATA_ROOTS_ENV)
DEFAULT_IMAGE = stage_image()  # flows/images.py: the package version, never :latest
DEFAULT_ENV_PASSTHROUGH = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
)


def _list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


@dataclass(frozen=True)
class DockerSettings:
    """The stage containers' settings that only the operator chooses."""

    image: str = DEFAULT_IMAGE
    network_mode: str = "host"
    env_passthrough: tuple[str, ...] = DEFAULT_ENV_PASSTHROUGH
    volumes: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DockerSettings:
        passthrough = _list(environ.get(ENV_PASSTHROUGH_ENV))
        return cls(
            image=environ.get(IMAGE_ENV) or DEFAULT_IMAGE,
            network_mode=environ.get(NETWORK_ENV) or "host",
            env_passthrough=tuple(passthrough) if passthrough else DEFAULT_ENV_PASSTHROUGH,
            volumes=tuple(_list(environ.get(VOLUMES_ENV))),
        )


def data_roots(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The operator's data roots (:data:`DATA_ROOTS_ENV`)."""
    return _list(environ.get(DATA_ROOTS_ENV))


def _normalized(uri: str) -> str:
    """``uri`` with ``..`` and ``.`` resolved (a local path also made absolute, links followed)."""
    if "://" in uri:
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"
    return str(Path(uri).resolve())


def is_under(uri: str, roots: Iterable[str]) -> bool:
    """True when ``uri`` (a local path or an ``s3://`` URI) lies inside one of ``roots``."""
    target = _normalized(uri)
    return any(
        target == (base := _normalized(root)) or target.startswith(base.rstrip("/") + "/")
        for root in roots
    )
