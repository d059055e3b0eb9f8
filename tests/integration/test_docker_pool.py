"""The Docker work-pool path as deployed (issue 15 item 6): a real Prefect Docker worker
(prefect-docker) on the real engine starts the flow-run container of a deployment, from
a locally built image under a versioned tag with ``image_pull_policy`` set (no registry
here: a pull would fail), and the run completes on the authenticated stack.

The image is the engine fixture's busybox root file system tagged as the worker image;
this host's Python and the project's virtual environment are bound read-only into the
container at their own paths (a root file system holding them, 7 GB with PyTorch, is too
heavy for the engine's vfs storage). The run's config is the session's ``stack_run``
under a new name, so every stage is reused from the store and the run takes seconds.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import yaml
from prefect.deployments import run_deployment

from flows.deployments import deploy, ensure_pool
from flows.images import PULL_POLICY, worker_image
from tests.flows.conftest import docker_engine  # noqa: F401  (the real engine)
from tests.integration.deploy_helpers import REPO, Background, wait_for_final, worker_env

pytest.importorskip("prefect_docker", reason="prefect-docker (the Docker worker) is missing")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

PYTHON_HOME = Path(sys.base_prefix)  # the interpreter the virtual environment links to


def host_binds() -> list[tuple[Path, Path]]:
    """(host path, container path): the interpreter, its C libraries and the project."""
    libs = [(Path("/usr/lib"), Path("/usr/lib")), (Path("/usr/lib"), Path("/lib"))]
    libs += [(Path("/usr/lib64"), Path("/lib64")), (Path("/etc/ld.so.cache"),) * 2]
    return [*libs, (PYTHON_HOME, PYTHON_HOME), (REPO, REPO)]


class DockerWorker(Background):
    """``prefect worker start --type docker`` for one pool, on the test's engine."""

    def __init__(self, pool: str, env: dict[str, str], log_path: Path):
        command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                   "--type", "docker"]  # fmt: skip
        super().__init__(command, env, log_path)


def test_docker_worker_runs_a_deployment_from_a_local_versioned_image(
    local_stack,
    stack_run,
    docker_engine,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    image = worker_image()
    assert not image.endswith(":latest")
    repository, tag = image.split(":")
    docker_engine.client.images.get(docker_engine.image).tag(repository, tag)

    data = stack_run.cfg.model_dump(mode="json")
    data["store"]["endpoint_url"] = local_stack.s3.endpoint_url  # the container's only way
    config = tmp_path / "docker-pool.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    pool = f"xlearner-docker-{uuid.uuid4().hex[:6]}"
    assert ensure_pool(pool, "docker") == "docker"
    monkeypatch.setenv("DOCKER_GID", "0")
    ids = deploy(
        config,
        pool=pool,
        name="docker-pool",
        sensor_every_s=None,
        job_variables={
            "networks": [],
            "network_mode": "host",  # the engine has no bridge; the stack is on loopback
            "volumes": [f"{path}:{mount}:ro" for path, mount in host_binds()],
            "container_create_kwargs": {"working_dir": "/tmp"},
            "command": f"{REPO / '.venv' / 'bin' / 'python'} -m prefect flow-run execute",
        },
    )
    deployment_id = ids["xlearner-pipeline/docker-pool"]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        variables = client.read_deployment(uuid.UUID(deployment_id)).job_variables
    assert variables["image"] == image and variables["image_pull_policy"] == PULL_POLICY

    env = {**worker_env(local_stack), "DOCKER_HOST": docker_engine.base_url}
    with DockerWorker(pool, env, tmp_path / "docker-worker.log") as worker:
        started = run_deployment(
            "xlearner-pipeline/docker-pool",
            parameters={"config": {**data, "name": "docker-pool-run"}},
            timeout=0,
        )
        run = wait_for_final(started.id, timeout_s=600, worker=worker)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{worker.log_tail()}"
    assert run.infrastructure_pid  # a container of the engine ran it
    assert docker_engine.client.images.get(image)  # used as built, never pulled over
