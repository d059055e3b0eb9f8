"""The Docker work-pool path as deployed (issue 15 item 6), with the project's own images.

``docker/Dockerfile.stage`` and ``docker/Dockerfile.worker`` are built on a private
engine under their versioned tags (:mod:`tests.integration.project_images`). A real
Prefect Docker worker (prefect-docker) takes the deployment's flow run and starts it in
a container of the worker image, pulled never (``image_pull_policy``: no registry
here); that container runs the pipeline with ``runner.kind: docker``, each stage in a
container of the stage image that it starts through the engine's socket, as the compose
stack's worker does. The run completes on the authenticated stack, and every stage ran
in the stage image: the cache keys hold that image's id.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flows.caching import stage_image_id
from flows.deployments import deploy, ensure_pool
from flows.images import PULL_POLICY, stage_image, worker_image
from flows.operator import IMAGE_ENV, NETWORK_ENV
from flows.runners.docker import STAGE_LABEL
from tests.flows.conftest import BUILD_ENGINE_ENV, DockerEngine, build_docker_engine  # noqa: F401
from tests.integration.deploy_helpers import Background, wait_for_final, worker_env, write_config
from tests.integration.project_images import (
    BUILD_DISK_BYTES,
    build_image,
    local_index_dirs,
    make_base_image,
    project_build_args,
    served_indexes,
)
from xlearner.store import open_store
from xlearner.store_keys import RUNS, is_stage_result

pytest.importorskip("prefect_docker", reason="prefect-docker (the Docker worker) is missing")
# Building both images takes about 15 min of the test's setup on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2700)]
ENGINE_SOCKET = "/var/run/docker.sock"  # where the flow-run container finds the engine


class DockerWorker(Background):
    """``prefect worker start --type docker`` for one pool, on the test's engine."""

    def __init__(self, pool: str, env: dict[str, str], log_path: Path):
        command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                   "--type", "docker"]  # fmt: skip
        super().__init__(command, env, log_path)


@pytest.fixture(scope="module")
def project_images(
    build_docker_engine: DockerEngine,  # noqa: F811
    tmp_path_factory,
) -> Iterator[dict[str, str]]:
    """``{tag: image id}`` of the stage and worker images, built from the Dockerfiles."""
    workdir = tmp_path_factory.mktemp("images")
    engine = build_docker_engine
    free = shutil.disk_usage(engine.client.info()["DockerRootDir"]).free
    if free < BUILD_DISK_BYTES:
        pytest.skip(f"building the images needs {BUILD_DISK_BYTES >> 30} GB free, not {free >> 30}")
    try:
        make_base_image(engine.client, workdir)
    except (OSError, RuntimeError) as err:
        pytest.skip(f"cannot make the base image here: {err}")
    log = workdir / "build.log"
    with served_indexes(local_index_dirs()) as index_urls:
        # the socket's group is added when the container starts (DOCKER_GID, as in compose)
        args = project_build_args(index_urls, docker_gid="0")
        for dockerfile, tag in (
            ("docker/Dockerfile.stage", stage_image()),
            ("docker/Dockerfile.worker", worker_image()),
        ):
            build_image(engine.base_url, dockerfile, tag, args, log)
    if not os.environ.get(BUILD_ENGINE_ENV):  # a private engine: its builder stages, ~15 GB
        engine.client.images.prune(filters={"dangling": True})
    yield {tag: engine.client.images.get(tag).id for tag in (stage_image(), worker_image())}


def test_a_docker_worker_runs_the_pipeline_in_the_project_images(
    local_stack,
    s3_data_root,
    build_docker_engine: DockerEngine,  # noqa: F811
    project_images,
    tmp_path,
    monkeypatch,
):
    engine = build_docker_engine
    assert not any(tag.endswith(":latest") for tag in project_images)
    config = write_config(
        tmp_path / "docker-pool.yaml",
        local_stack,
        s3_data_root,
        "docker-pool",
        runner={"kind": "docker"},
    )
    data = yaml.safe_load(config.read_text())
    pool = f"xlearner-docker-{uuid.uuid4().hex[:6]}"
    assert ensure_pool(pool, "docker") == "docker"
    socket = engine.base_url.removeprefix("unix://")
    monkeypatch.setenv("DOCKER_GID", str(os.stat(socket).st_gid))  # the flow-run container's
    monkeypatch.setenv(NETWORK_ENV, "host")  # stage containers: the stack is on loopback
    monkeypatch.setenv(IMAGE_ENV, stage_image())
    ids = deploy(
        config,
        pool=pool,
        name="docker-pool",
        sensor_every_s=None,
        job_variables={
            "networks": [],
            "network_mode": "host",  # the engine has no bridge
            "volumes": [f"{socket}:{ENGINE_SOCKET}"],
        },
    )
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(uuid.UUID(ids["xlearner-pipeline/docker-pool"]))
    variables = deployment.job_variables
    assert variables["image"] == worker_image() and variables["image_pull_policy"] == PULL_POLICY

    env = {**worker_env(local_stack), "DOCKER_HOST": engine.base_url}
    with DockerWorker(pool, env, tmp_path / "docker-worker.log") as worker:
        started = run_deployment(
            "xlearner-pipeline/docker-pool", parameters={"config": data}, timeout=0
        )
        run = wait_for_final(started.id, worker=worker)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{worker.log_tail()}"
    assert run.infrastructure_pid  # a container of the engine ran the flow
    for tag, image_id in project_images.items():  # used as built, never pulled over
        assert engine.client.images.get(tag).id == image_id

    # every stage ran (the store is fresh: nothing to reuse), keyed by the stage image id
    monkeypatch.setenv("DOCKER_HOST", engine.base_url)
    assert stage_image_id(stage_image()) == project_images[stage_image()]
    store = open_store(data["store"]["uri"], data["store"]["endpoint_url"])
    stages = {key.split("/")[1] for key in store.list(RUNS) if is_stage_result(key)}
    assert {"ingest", "expand", "reconcile", "squeeze", "transfer"} <= stages
    assert not engine.client.containers.list(all=True, filters={"label": STAGE_LABEL})
