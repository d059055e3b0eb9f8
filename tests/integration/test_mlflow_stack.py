"""The pipeline run on the authenticated stack, read back from the MLflow server as its
users would (issue 15 items 2 and 7): the servers refuse anonymous requests, yet the run
(``stack_run``) completed; its parent run has the manifests as dataset inputs, the report
chart and table; stage runs have system metrics and grouped metric names; the registered
backbone loads through the server with ``mlflow.pyfunc.load_model``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from tests.integration.stack_helpers import StackRun

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def status(url: str, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_pipeline_ran_although_anonymous_requests_are_refused(local_stack, stack_run: StackRun):
    assert stack_run.result["registered"] is not None  # the run talked to both servers
    assert status(f"{local_stack.prefect_api_url}/flow_runs/filter", b"{}") == 401
    run_id = stack_run.result["mlflow_parent_run_id"]
    assert status(f"{local_stack.mlflow_uri}/api/2.0/mlflow/runs/get?run_id={run_id}") == 401


def test_parent_run_has_dataset_inputs_chart_and_table(stack_run: StackRun):
    client = MlflowClient(stack_run.cfg.tracking.uri)
    parent = client.get_run(stack_run.result["mlflow_parent_run_id"])
    inputs = {
        i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"])
        for i in parent.inputs.dataset_inputs
    }
    cfg = stack_run.cfg
    expected = {s.name: "training" for s in cfg.sources} | {
        d.name: "evaluation" for d in cfg.downstream
    }
    assert {name: context for name, (_, context) in inputs.items()} == expected
    for name, (digest, _) in inputs.items():
        assert parent.data.tags[f"source.{name}.version"] == digest  # the manifest's hash
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.png", "report/rows.json", "report/report.json"} <= artifacts
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/report/rows.json"))
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert {row["name"] for row in rows} == {r["name"] for r in stack_run.result["report"]["rows"]}


def parent_and_stage_runs(stack_run: StackRun) -> tuple[Run, list[Run]]:
    """The pipeline's MLflow run and its stages' child runs."""
    client = MlflowClient(stack_run.cfg.tracking.uri)
    parent_id = stack_run.result["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100
    )
    return parent, children


def test_each_stage_run_has_the_manifests_it_read_as_dataset_inputs(stack_run: StackRun):
    parent, children = parent_and_stage_runs(stack_run)
    downstream = {d.name for d in stack_run.cfg.downstream}
    trained_on: set[str] = set()
    for child in children:
        inputs = child.inputs.dataset_inputs
        assert inputs, child.info.run_name
        for i in inputs:
            context = {t.key: t.value for t in i.tags}["mlflow.data.context"]
            assert context == ("evaluation" if i.dataset.name in downstream else "training")
            assert i.dataset.digest == parent.data.tags[f"source.{i.dataset.name}.version"]
            trained_on.update({i.dataset.name} - downstream)
    assert trained_on == {s.name for s in stack_run.cfg.sources}


def test_stage_runs_have_system_metrics_and_grouped_names(stack_run: StackRun):
    _, children = parent_and_stage_runs(stack_run)
    assert children
    for child in children:
        names = set(child.data.metrics)
        assert not [k for k in names if "/" not in k], (child.info.run_name, names)
    expand = [c for c in children if c.info.run_name.startswith("expand-")]
    assert all("train/lr" in c.data.metrics for c in expand)
    assert any(k.startswith("system/") for c in children for k in c.data.metrics)


def test_registered_backbone_loads_from_the_server(stack_run: StackRun):
    model = mlflow.pyfunc.load_model(stack_run.result["registered"]["model_uri"])
    size = stack_run.cfg.model.image_size
    example = np.zeros((2, 3, size, size), dtype=np.float32)
    features = model.predict(example)
    width = model.metadata.signature.outputs.to_dict()[0]["tensor-spec"]["shape"][1]
    assert features.shape == (2, width)
