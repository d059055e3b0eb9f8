"""The names of the project's images and how the Docker worker gets them.

Images are tagged with the package version (``xlearner-worker:0.1.0``), never ``latest``:
prefect-docker treats ``latest`` (or no tag) as "always pull", which fails for an image
built on the host with no registry to pull from. A versioned tag names one build, so the
worker pulls it only when the engine lacks it (:data:`PULL_POLICY`). Stage outputs do
not trust the tag: their cache keys hold the stage image's id (``flows.caching``).
"""

from __future__ import annotations

from importlib.metadata import version

# prefect-docker's `image_pull_policy` job variable: "IfNotPresent" uses the local image
# (built by `docker build` or `docker compose build`) and pulls only a missing one.
PULL_POLICY = "IfNotPresent"


def image_tag() -> str:
    """The tag of this version's images: the package version, without a local label."""
    return version("xlearner").split("+")[0]


def worker_image() -> str:
    """The flow-run and services image (docker/Dockerfile.worker)."""
    return f"xlearner-worker:{image_tag()}"


def stage_image() -> str:
    """The stage image (docker/Dockerfile.stage)."""
    return f"xlearner-stage:{image_tag()}"
