"""The whole pipeline on the real stack (issue 5, test 1).

One tiny run (``stack_run``: synthetic sources read from S3, store on SeaweedFS, stages as
local processes, the Prefect server and an ``mlflow server`` subprocess) is checked from
every side: the flow's result, the Prefect API, the S3 store and the MLflow server. A
second run with the same config must reuse every stage.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tests.integration.stack_helpers import StackRun, run_flow
from xlearner.config import PipelineConfig
from xlearner.store import open_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def expected_labels(cfg: PipelineConfig) -> set[str]:
    """The stage calls of a single-variant (``compare=[]``) xlearner run."""
    return {
        *(f"ingest-{s.name}" for s in [*cfg.sources, *cfg.downstream]),
        *(f"expand-{t.value}" for t in cfg.task_types),
        f"reconcile-{cfg.reconcile.mode}",
        f"squeeze-{cfg.variant.value}",
        "transfer",
    }


def task_runs(flow_run_id: str) -> list:
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(flow_run_id))
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.flow_id == client.read_flow_by_name("xlearner-pipeline").id
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)]))
        )


def test_every_stage_ran_exactly_once(stack_run: StackRun):
    labels = expected_labels(stack_run.cfg)
    ran = stack_run.result["stages_ran"]
    assert sorted(ran) == sorted(labels)  # each label once: no stage ran twice
    assert set(stack_run.result["stage_seconds"]) == labels

    runs = [r for r in task_runs(stack_run.flow_run_id) if r.task_key.startswith("run_stage")]
    assert sorted(r.name for r in runs) == sorted(labels)
    for run in runs:
        assert run.state.is_completed(), (run.name, run.state)
        assert run.run_count == 1, f"{run.name} was retried ({run.run_count} attempts)"


def test_report_is_published_to_s3(stack_run: StackRun):
    report_uri = stack_run.result["report_uri"]
    assert report_uri.startswith(stack_run.cfg.store.uri + "/runs/transfer/")
    store = open_store(report_uri)
    assert {"report/report.json", "report/report.md", "report/report.png"} <= set(
        store.list("report")
    )
    assert store.read_json("report/report.json") == stack_run.result["report"]
    names = {row["name"] for row in stack_run.result["report"]["rows"]}
    assert {"xlearner", "random_init"} <= names
    assert store.read_bytes("report/report.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_parent_run_has_one_child_per_stage(stack_run: StackRun):
    client = MlflowClient(stack_run.cfg.tracking.uri)
    parent_id = stack_run.result["mlflow_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == stack_run.flow_run_id
    assert "transfer/avg_cls" in parent.data.metrics

    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100
    )
    assert all(child.info.status == "FINISHED" for child in children)
    # The ingest stage opens no MLflow run; every other stage that ran opens one, named
    # after its kind (expand-<task>, reconcile, squeeze-<method>, transfer).
    tracked = [label for label in stack_run.result["stages_ran"] if not label.startswith("ingest-")]
    kinds = Counter(label.split("-")[0] for label in tracked)
    assert Counter(child.info.run_name.split("-")[0] for child in children) == kinds
    expand_runs = {c.info.run_name for c in children if c.info.run_name.startswith("expand-")}
    assert expand_runs == {label for label in tracked if label.startswith("expand-")}
    assert all(child.data.tags.get("xlearner.stage") == child.info.run_name for child in children)


def test_backbone_is_registered_with_champion_alias(stack_run: StackRun):
    registered = stack_run.result["registered"]
    name = stack_run.cfg.tracking.register_model
    assert registered["model"] == name == "xlearner-backbone"
    client = MlflowClient(stack_run.cfg.tracking.uri)
    version = client.get_model_version(name, registered["version"])
    assert version.run_id == stack_run.result["mlflow_parent_run_id"]
    champion = client.get_model_version_by_alias(name, "champion")
    if registered["champion"]:  # it took the alias; later runs of the session may take it on
        assert int(champion.version) >= int(version.version)
    else:  # another test registered a better backbone on this server first
        assert int(champion.version) != int(version.version)
    assert float(champion.tags["avg_cls"]) >= float(version.tags["avg_cls"])


def test_second_run_reuses_every_stage(stack_run: StackRun):
    again = run_flow(stack_run.cfg)
    result = again.result
    assert again.flow_run_id != stack_run.flow_run_id
    assert result["stages_ran"] == []
    assert set(result["stage_seconds"]) == expected_labels(stack_run.cfg)
    assert result["report"] == stack_run.result["report"]
    assert result["report_uri"] == stack_run.result["report_uri"]
