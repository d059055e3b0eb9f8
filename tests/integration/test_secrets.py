"""The stack's secrets never leave the environment of the processes that use them.

Every stage process of ``stack_run`` had AWS_SECRET_ACCESS_KEY, PREFECT_API_AUTH_STRING
and MLFLOW_TRACKING_PASSWORD in its environment; after the run, none of them may be in
the places a user (or an attacker) can read:
Prefect's logs, flow-run parameters and artifacts, MLflow's params and tags, and the
JSON the pipeline published to the store.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogWorker

from tests.integration.stack_helpers import StackRun
from xlearner.store import open_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAGE = 200  # the most logs Prefect's API returns per request


@pytest.fixture(
    scope="module",
    params=["AWS_SECRET_ACCESS_KEY", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_PASSWORD"],
)
def secret(request, local_stack, stack_run: StackRun) -> str:
    value = local_stack.env()[request.param]
    assert len(value) >= 30 and os.environ[request.param] == value  # what stages got
    return value


def prefect_logs(flow_run_id: str) -> list[str]:
    APILogWorker.drain_all(timeout=30)  # logs are sent in batches
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]))
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=log_filter, limit=PAGE, offset=len(messages)):
            messages += [log.message for log in page]
    return messages


def test_secret_not_in_prefect_logs(stack_run: StackRun, secret: str):
    messages = prefect_logs(stack_run.flow_run_id)
    # the stages' own output is forwarded there (so this checks real stage logs)
    for label in stack_run.result["stages_ran"]:
        assert any(m.startswith(f"[{label}] ") for m in messages), f"no log line of {label}"
    leaking = [m for m in messages if secret in m]
    assert not leaking, leaking[:3]


def test_secret_not_in_prefect_flow_run_parameters_or_artifacts(stack_run: StackRun, secret: str):
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(stack_run.flow_run_id))
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        artifacts = client.read_artifacts(flow_run_filter=runs)
    parameters = json.dumps(flow_run.parameters)
    assert stack_run.cfg.store.uri in parameters  # the config is there, its store included
    assert secret not in parameters
    assert artifacts, "the flow run published no artifact"
    assert not [a.key for a in artifacts if secret in json.dumps(a.data, default=str)]


def test_secret_not_in_mlflow_params_or_tags(stack_run: StackRun, secret: str):
    client = MlflowClient(stack_run.cfg.tracking.uri)
    parent = client.get_run(stack_run.result["mlflow_parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert parent.data.params and any(child.data.params for child in children)
    for run in [parent, *children]:
        logged = json.dumps([run.data.params, run.data.tags, sorted(run.data.metrics)])
        assert secret not in logged, f"the S3 secret is in MLflow run {run.info.run_name}"


def test_secret_not_in_published_json(stack_run: StackRun, secret: str):
    store = open_store(stack_run.cfg.store.uri)
    keys = [key for key in store.list() if key.endswith(".json")]
    assert any(key.startswith("runs/config/") for key in keys)  # the published config
    assert sum(key.endswith("/result.json") for key in keys) == len(stack_run.result["stages_ran"])
    leaking = [key for key in keys if secret.encode() in store.read_bytes(key)]
    assert not leaking, leaking
