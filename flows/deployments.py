"""Deploy the pipeline: a deployment per config, a schedule, the retraining trigger.

Each config gets a deployment ``xlearner-pipeline/<config name>`` whose ``config``
parameter defaults to that config (the Prefect UI shows it as a form: "Custom run"
edits any field), runs at most one at a time (deployment concurrency limit 1; more
runs wait their turn), optionally on a cron schedule, and starts a run when a source
lands (:mod:`flows.trigger`). Beside it, the sensor deployment
``xlearner-source-sensor/<config name>`` scans the store's ``sources/`` on an interval.

Two ways to run them:

- :func:`deploy` registers both with a work pool; a worker of that pool runs them. On a
  Docker pool (``xlearner-docker``, production) every flow run is a container of the
  worker image, which has the code installed; nothing is built or pushed here. On a
  process pool (dev, the tests) the worker runs the flow from this checkout.
- :func:`serve` registers both and runs them in this process (``flow.serve`` style).

``xlearner deploy deploy --config C --pool P`` / ``xlearner deploy serve --config C``.
Prefect and the flows are imported inside the functions: the ``xlearner`` command reads
this module's defaults without paying for them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flows.images import PULL_POLICY, worker_image
from xlearner.config import ConfigError, PipelineConfig, load_config
from xlearner.secrets import fields_with_url_credentials

REPO_ROOT = Path(__file__).resolve().parent.parent
PIPELINE_ENTRYPOINT = "flows/pipeline.py:xlearner_pipeline"
SENSOR_ENTRYPOINT = "flows/trigger.py:watch_sources"
DOCKER_POOL = "xlearner-docker"
FLOW_IMAGE = worker_image()  # docker/Dockerfile.worker: prefect + this package
COMPOSE_NETWORK = "xlearner"  # docker-compose.yml: the services and the stage containers
SENSOR_EVERY_S = 300
SERVE_SENSOR_EVERY_S = 60  # serve: the sensor runs here, beside the pipeline
# Variables a flow-run container gets as Prefect Secret blocks (resolved by the worker
# when it starts the container; the UI never shows them).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")


def pipeline_deployment_name(cfg: PipelineConfig, name: str | None = None) -> str:
    """``flow/deployment`` of a config's pipeline deployment."""
    from flows.pipeline import xlearner_pipeline

    return f"{xlearner_pipeline.name}/{name or cfg.name}"


def check_no_url_credentials(cfg: PipelineConfig) -> None:
    """Refuse a config that writes a credential inside a URL: a deployment's parameters are
    shown to every Prefect UI user, so credentials come from the worker's environment."""
    if fields := fields_with_url_credentials(cfg.model_dump(mode="json")):
        raise ConfigError(
            f"config {cfg.name!r}: {', '.join(fields)} holds a credential inside a URL "
            "(user:password@ or a secret query parameter); a deployment's parameters are "
            "visible in the Prefect UI: remove it from the URL and give it to the worker's "
            "environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD)"
        )


def pipeline_options(cfg: PipelineConfig, name: str | None, schedule_cron: str | None) -> dict:
    """What both ways of deploying give the pipeline deployment."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.trigger import landed_trigger

    return {
        "name": name or cfg.name,
        "parameters": {"config": cfg.model_dump(mode="json")},
        "description": f"X-Learner pipeline, config {cfg.name!r}: edit `config` in a custom run.",
        "tags": ["xlearner", f"config:{cfg.name}"],
        "cron": schedule_cron,
        # Two retrainings of one config would race on the same stage outputs: one at a time.
        "concurrency_limit": ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        "triggers": [landed_trigger(name or cfg.name)],
    }


def sensor_options(cfg: PipelineConfig, name: str | None, every_s: int) -> dict:
    return {
        "name": name or cfg.name,
        "parameters": {"deployment": pipeline_deployment_name(cfg, name)},
        "description": f"Announces new source versions in {cfg.store.uri} (retrains {cfg.name!r}).",
        "tags": ["xlearner", f"config:{cfg.name}"],
        "interval": every_s,
    }


def docker_job_variables(cfg: PipelineConfig, environ: dict[str, str]) -> dict[str, Any]:
    """What a flow-run container of the Docker pool needs to run the pipeline.

    It starts stage containers (``runner.kind: docker``) through the host's Docker
    socket (``DOCKER_GID``: the socket's group), reaches the services by name on the
    compose network, and reads the store and MLflow at the config's addresses. The S3
    credentials of ``environ`` are saved as Secret blocks and referenced, not copied. The
    operator's stage-container settings (:data:`flows.operator.OPERATOR_ENV`) set where
    this runs are passed on; the stage containers join the compose network by default.
    The host's GPU lock folder (``XLEARNER_GPU_LOCK_DIR``, :mod:`flows.gpus`), when set,
    is bound in at the same path: the flow runs, each in a container of its own, then
    see each other's GPU locks.
    """
    from prefect.blocks.system import Secret

    from flows.gpus import LOCK_DIR_ENV
    from flows.operator import NETWORK_ENV, OPERATOR_ENV

    env = {"AWS_DEFAULT_REGION": environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if cfg.store.endpoint_url:
        env["AWS_ENDPOINT_URL"] = cfg.store.endpoint_url
    if cfg.tracking.uri:
        env["MLFLOW_TRACKING_URI"] = cfg.tracking.uri
    if environ.get("MLFLOW_TRACKING_USERNAME"):  # its password: a Secret block (SECRET_ENV)
        env["MLFLOW_TRACKING_USERNAME"] = environ["MLFLOW_TRACKING_USERNAME"]
    env[NETWORK_ENV] = COMPOSE_NETWORK
    env |= {name: environ[name] for name in OPERATOR_ENV if environ.get(name)}
    for variable in SECRET_ENV:
        if value := environ.get(variable):
            block = "xlearner-" + variable.lower().replace("_", "-")
            Secret(value=value).save(block, overwrite=True)
            env[variable] = f"{{{{ prefect.blocks.secret.{block} }}}}"
    volumes = ["/var/run/docker.sock:/var/run/docker.sock"]
    if lock_dir := environ.get(LOCK_DIR_ENV):
        volumes.append(f"{lock_dir}:{lock_dir}")
        env[LOCK_DIR_ENV] = lock_dir
    variables: dict[str, Any] = {
        "volumes": volumes,
        "networks": [COMPOSE_NETWORK],
        "env": env,
        "image_pull_policy": PULL_POLICY,  # a local build under a versioned tag (flows/images.py)
    }
    if gid := environ.get("DOCKER_GID"):
        variables["container_create_kwargs"] = {"group_add": [gid]}
    return variables


def ensure_pool(pool: str, pool_type: str | None = None) -> str:
    """The pool's type; creates the pool when missing (docker for ``xlearner-docker``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    async def ensure() -> str:
        async with get_client() as client:
            try:
                return (await client.read_work_pool(pool)).type
            except ObjectNotFound:
                kind = pool_type or ("docker" if pool == DOCKER_POOL else "process")
                template = await get_default_base_job_template_for_infrastructure_type(kind)
                await client.create_work_pool(
                    WorkPoolCreate(name=pool, type=kind, base_job_template=template or {})
                )
                return kind

    return run_coro_as_sync(ensure())


def deploy(
    config_path: str | Path,
    *,
    pool: str = DOCKER_POOL,
    schedule_cron: str | None = None,
    name: str | None = None,
    image: str = FLOW_IMAGE,
    sensor_every_s: int | None = SENSOR_EVERY_S,
    overrides: list[str] | None = None,
    job_variables: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Register the pipeline (and its sensor) with ``pool``; returns ``{name: deployment id}``.

    ``sensor_every_s=None``: no sensor (sources then trigger runs only through
    ``xlearner sources add``). ``job_variables``: overrides of the pool's job template.
    """
    from flows.pipeline import xlearner_pipeline
    from flows.trigger import watch_sources

    cfg = load_config(config_path, overrides)
    check_no_url_credentials(cfg)
    kind = ensure_pool(pool)
    docker = kind == "docker"
    common: dict[str, Any] = {"work_pool_name": pool, "build": False, "push": False}
    if docker:  # the image has the code installed: entrypoints are module paths
        from prefect.deployments.runner import EntrypointType

        variables = {**docker_job_variables(cfg, dict(os.environ)), **(job_variables or {})}
        sensor_variables = {k: v for k, v in variables.items() if k in ("env", "networks")}
        common |= {"image": image, "entrypoint_type": EntrypointType.MODULE_PATH}
        pipeline, sensor = xlearner_pipeline, watch_sources
    else:  # the worker runs the flows from this checkout
        variables = sensor_variables = dict(job_variables or {})
        pipeline = xlearner_pipeline.from_source(str(REPO_ROOT), PIPELINE_ENTRYPOINT)
        sensor = watch_sources.from_source(str(REPO_ROOT), SENSOR_ENTRYPOINT)
    options = pipeline_options(cfg, name, schedule_cron)
    ids = {
        pipeline_deployment_name(cfg, name): str(
            pipeline.deploy(
                **options,
                **common,
                job_variables=variables,
                print_next_steps=False,
                ignore_warnings=True,
            )
        )
    }
    if sensor_every_s:
        sensor_id = sensor.deploy(
            **sensor_options(cfg, name, sensor_every_s),
            **common,
            job_variables=sensor_variables,  # the sensor needs no Docker socket
            print_next_steps=False,
            ignore_warnings=True,
        )
        ids[f"{watch_sources.name}/{options['name']}"] = str(sensor_id)
    return ids


def serve(
    config_path: str | Path,
    *,
    schedule_cron: str | None = None,
    name: str | None = None,
    sensor_every_s: int | None = SERVE_SENSOR_EVERY_S,
    overrides: list[str] | None = None,
) -> None:
    """Register the pipeline (and its sensor) and run their flow runs here until stopped."""
    from prefect import serve as prefect_serve

    from flows.pipeline import xlearner_pipeline
    from flows.trigger import watch_sources

    cfg = load_config(config_path, overrides)
    check_no_url_credentials(cfg)
    deployments = [xlearner_pipeline.to_deployment(**pipeline_options(cfg, name, schedule_cron))]
    if sensor_every_s:
        deployments.append(watch_sources.to_deployment(**sensor_options(cfg, name, sensor_every_s)))
    prefect_serve(*deployments)
