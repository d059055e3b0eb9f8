"""The pipeline deployed to the real Prefect server: a worker runs it with custom parameters.

``deploy`` registers the pipeline with a process work pool, a worker subprocess of this
test polls the pool, and a run started through the Prefect API with a changed config
(name and seed) completes; its MLflow runs and its artifacts in S3 are then looked up.
"""

from __future__ import annotations

import uuid

import boto3
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from flows.deployments import deploy, ensure_pool
from flows.trigger import LANDED_EVENT
from tests.integration.deploy_helpers import Worker, wait_for_final, worker_env, write_config
from xlearner.config import load_config
from xlearner.store import open_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def read_deployment(deployment_id: str):
    with get_client(sync_client=True) as client:
        return client.read_deployment(uuid.UUID(deployment_id))


def automations_of(deployment_id: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_resource_related_automations(f"prefect.deployment.{deployment_id}")


def test_deployed_pipeline_runs_with_custom_parameters(local_stack, s3_data_root, tmp_path):
    path = write_config(
        tmp_path / "deployed.yaml", local_stack, s3_data_root, "deploy", name="tiny-deploy"
    )
    cfg = load_config(path)
    pool = f"xlearner-process-{uuid.uuid4().hex[:6]}"
    ids = deploy(path, pool=pool, schedule_cron="0 3 * * *", sensor_every_s=120)

    pipeline = read_deployment(ids["xlearner-pipeline/tiny-deploy"])
    assert pipeline.parameters == {"config": cfg.model_dump(mode="json")}  # the form's defaults
    assert "config" in pipeline.parameter_openapi_schema["properties"]
    assert pipeline.global_concurrency_limit.limit == 1
    assert pipeline.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert [s.schedule.cron for s in pipeline.schedules] == ["0 3 * * *"]
    assert pipeline.entrypoint == "flows/pipeline.py:xlearner_pipeline"
    (trigger,) = automations_of(ids["xlearner-pipeline/tiny-deploy"])
    assert trigger.trigger.expect == {LANDED_EVENT}
    sensor = read_deployment(ids["xlearner-source-sensor/tiny-deploy"])
    assert sensor.parameters == {"deployment": "xlearner-pipeline/tiny-deploy"}
    assert [s.schedule.interval.total_seconds() for s in sensor.schedules] == [120]

    custom = cfg.model_copy(update={"name": "tiny-custom", "seed": 7}).model_dump(mode="json")
    with Worker(pool, worker_env(local_stack), tmp_path / "worker.log") as worker:
        started = run_deployment(
            "xlearner-pipeline/tiny-deploy", parameters={"config": custom}, timeout=0
        )
        run = wait_for_final(started.id, worker=worker)
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{worker.log_tail()}"
    assert run.parameters["config"]["seed"] == 7

    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(local_stack.mlflow_uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    (parent,) = mlflow.search_runs(
        [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'"
    )
    assert parent.info.run_name == "tiny-custom" and parent.info.status == "FINISHED"
    assert parent.data.params["seed"] == "7"
    assert "transfer/avg_cls" in parent.data.metrics
    stages = mlflow.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    ran = {r.data.tags.get("xlearner.stage", "") for r in stages}  # e.g. "expand-cls"
    for stage in ("expand", "reconcile", "squeeze", "transfer"):  # ingest logs no MLflow run
        assert any(label.startswith(stage) for label in ran), (stage, ran)

    # Its artifacts in S3: the stage outputs in the store, the report through MLflow's proxy.
    store = open_store(cfg.store.uri, cfg.store.endpoint_url)
    published = store.list("")
    for source in ("shapes_cls", "down_cls_a"):
        assert store.exists(f"sources/{source}/latest.json")
    for stage in ("ingest", "expand", "reconcile", "squeeze", "transfer"):
        assert any(
            k.startswith(f"runs/{stage}/") and k.endswith("/result.json") for k in published
        ), stage
    s3 = boto3.client("s3", endpoint_url=local_stack.s3.endpoint_url)
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=local_stack.s3.bucket, Prefix="mlartifacts/")["Contents"]
    ]
    assert any(parent.info.run_id in k and k.endswith("report/report.json") for k in keys)


def test_docker_deployment_references_the_image_and_secret_blocks(
    local_stack, tmp_path, monkeypatch
):
    """Production: a Docker pool, the worker image, module entrypoints, no plain credentials."""
    path = write_config(
        tmp_path / "docker.yaml", local_stack, tmp_path, "docker", name="tiny-docker",
        runner={"kind": "docker"}, tracking={"uri": "http://mlflow:5000"},
    )  # fmt: skip
    monkeypatch.setenv("DOCKER_GID", "998")
    pool = f"xlearner-docker-{uuid.uuid4().hex[:6]}"
    assert ensure_pool(pool, "docker") == "docker"
    ids = deploy(path, pool=pool, image="xlearner-worker:test", sensor_every_s=None)

    deployment = read_deployment(ids["xlearner-pipeline/tiny-docker"])
    assert deployment.entrypoint == "flows.pipeline.xlearner_pipeline"
    assert deployment.pull_steps in (None, [])
    variables = deployment.job_variables
    assert variables["image"] == "xlearner-worker:test"
    assert variables["volumes"] == ["/var/run/docker.sock:/var/run/docker.sock"]
    assert variables["container_create_kwargs"] == {"group_add": ["998"]}
    env = variables["env"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == local_stack.s3.endpoint_url
    assert (
        env["AWS_SECRET_ACCESS_KEY"] == "{{ prefect.blocks.secret.xlearner-aws-secret-access-key }}"
    )
    assert local_stack.s3.secret_key not in str(deployment.model_dump())

    from prefect.blocks.system import Secret

    assert Secret.load("xlearner-aws-secret-access-key").get() == local_stack.s3.secret_key


def test_served_deployment_runs_one_at_a_time(local_stack, stack_run, tmp_path):
    """``serve``: two runs started together of one config do not overlap (limit 1).

    The config is the session's ``stack_run`` under new names: every stage is reused from
    the store, so each run takes seconds.
    """
    from tests.integration.deploy_helpers import Served

    config = tmp_path / "served.yaml"
    config.write_text(yaml.safe_dump(stack_run.cfg.model_dump(mode="json"), sort_keys=False))
    with Served(config, "tiny-served", worker_env(local_stack), tmp_path / "serve.log") as served:
        served.wait_for_deployment("xlearner-pipeline/tiny-served")
        started = [
            run_deployment(
                "xlearner-pipeline/tiny-served",
                parameters={
                    "config": {**stack_run.cfg.model_dump(mode="json"), "name": f"served-{i}"}
                },
                timeout=0,
            )
            for i in range(2)
        ]
        runs = [wait_for_final(r.id, worker=served) for r in started]
    assert all(r.state.is_completed() for r in runs), [
        (r.state.name, r.state.message) for r in runs
    ]
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert first.end_time <= second.start_time, "two runs of one config overlapped"
