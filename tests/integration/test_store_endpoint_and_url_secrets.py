"""One pipeline run whose S3 endpoint is only in the config and whose MLflow URI carries
the MLflow password (``http://<user>:<password>@host``, no MLFLOW_TRACKING_* variable).

- ``store.endpoint_url`` is honoured everywhere: with ``AWS_ENDPOINT_URL`` unset in this
  process (so in every stage's too), every stage reads and writes the SeaweedFS store;
  without the endpoint they would sign requests for the public AWS endpoint.
- The URL password is masked by value: absent from the Prefect flow-run parameters, logs
  and artifacts and from MLflow's params and tags, while the rest of the URL is there.
"""

from __future__ import annotations

import json
import uuid

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from devstack.credentials import DEFAULT_MLFLOW_USER
from tests.integration.stack_helpers import StackRun, run_flow
from tests.integration.test_pipeline_e2e import expected_labels
from tests.integration.test_secrets import prefect_logs
from tests.pipeline_config import tiny_config
from xlearner.store import ENDPOINT_ENV, open_store
from xlearner.store_keys import RESULT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
USER = DEFAULT_MLFLOW_USER


@pytest.fixture(scope="module")
def password(local_stack) -> str:
    return local_stack.credentials.mlflow_password


@pytest.fixture(scope="module")
def endpoint_run(local_stack, s3_data_root: str, password: str) -> StackRun:
    import boto3

    store = local_stack.s3.uri(f"endpoint-{uuid.uuid4().hex[:8]}")
    assert local_stack.credentials.mlflow_username == USER
    tracking = local_stack.mlflow_uri.replace("://", f"://{USER}:{password}@", 1)
    cfg = tiny_config(
        s3_data_root,
        store,
        tracking,
        compare=[],
        name="tiny_endpoint",
        store={"uri": store, "endpoint_url": local_stack.s3.endpoint_url},
    )
    with pytest.MonkeyPatch.context() as mp:
        for variable in ("AWS_ENDPOINT_URL", ENDPOINT_ENV, *MLFLOW_CREDENTIALS):
            mp.delenv(variable, raising=False)
        mp.setattr(boto3, "DEFAULT_SESSION", None)
        return run_flow(cfg)


def test_every_stage_used_the_configured_endpoint(endpoint_run: StackRun, local_stack):
    assert sorted(endpoint_run.result["stages_ran"]) == sorted(expected_labels(endpoint_run.cfg))
    store = open_store(endpoint_run.cfg.store.uri, local_stack.s3.endpoint_url)
    results = [key for key in store.list("runs") if key.endswith(f"/{RESULT}")]
    assert len(results) == len(endpoint_run.result["stages_ran"])
    report = open_store(endpoint_run.result["report_uri"], local_stack.s3.endpoint_url)
    assert report.read_json("report/report.json") == endpoint_run.result["report"]


def test_url_password_not_in_prefect_parameters_logs_or_artifacts(
    endpoint_run: StackRun, password: str
):
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(endpoint_run.flow_run_id))
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        artifacts = client.read_artifacts(flow_run_filter=runs)
    parameters = json.dumps(flow_run.parameters)
    assert flow_run.parameters["config"]["tracking"]["uri"].startswith(
        f"http://{USER}:***@127.0.0.1:"
    )
    assert password not in parameters
    assert not [a.key for a in artifacts if password in json.dumps(a.data, default=str)]
    messages = prefect_logs(endpoint_run.flow_run_id)
    assert any(m.startswith("[transfer] ") for m in messages)  # stage output is there
    assert not [m for m in messages if password in m]


def test_url_password_not_in_mlflow_params_or_tags(endpoint_run: StackRun, password: str):
    client = MlflowClient(endpoint_run.cfg.tracking.uri)
    parent = client.get_run(endpoint_run.result["mlflow_parent_run_id"])
    assert parent.data.params["tracking.uri"].startswith(f"http://{USER}:***@127.0.0.1:")
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert children
    for run in [parent, *children]:
        assert password not in json.dumps([run.data.params, run.data.tags])
