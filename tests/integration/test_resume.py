"""A failed pipeline resumes where it failed (issue 5, test 3).

The squeeze stage is made to fail: its output folder ``runs/squeeze`` of a local store is
a plain file, so publishing anything under it fails (as root too, unlike a chmod). The
failed run's completed stages stay published; the rerun after the repair runs only
squeeze and what follows it. Prefect is the stack's server (one less server to start in
the integration session); the store is a local folder and MLflow a local SQLite file.
"""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.pipeline import xlearner_pipeline
from tests.integration.stack_helpers import run_flow
from tests.pipeline_config import tiny_config
from xlearner.store import open_store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BEFORE_SQUEEZE = ("ingest", "expand", "reconcile")


def stage_task_runs(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name: r for r in runs if r.task_key.startswith("run_stage")}


def test_failed_pipeline_resumes_at_the_failed_stage(local_stack, synth_data, tmp_path):
    store_root = tmp_path / "store"
    cfg = tiny_config(
        str(synth_data.root), str(store_root), f"sqlite:///{tmp_path / 'mlflow.db'}",
        sources=("shapes_cls", "shapes_seg"), downstream=("down_cls_a",),
        compare=[], name="tiny_resume",
    )  # fmt: skip
    blocker = store_root / "runs" / "squeeze"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a folder: the squeeze stage cannot publish here\n")

    failed = xlearner_pipeline(config=cfg, return_state=True)
    assert failed.is_failed(), failed
    tasks = stage_task_runs(failed.state_details.flow_run_id)
    assert tasks["squeeze-xlearner"].state.is_failed()
    assert tasks["squeeze-xlearner"].run_count == 3  # a transient-looking failure: 2 retries
    assert "transfer" not in tasks  # nothing after the failed stage started
    done_before = sorted(name for name, run in tasks.items() if run.state.is_completed())
    assert done_before == sorted(n for n in tasks if n.startswith(BEFORE_SQUEEZE))
    assert {n.split("-")[0] for n in done_before} == set(BEFORE_SQUEEZE)
    store = open_store(str(store_root))
    published = {key.split("/")[1] for key in store.list("runs") if key.endswith("/result.json")}
    assert published == set(BEFORE_SQUEEZE)

    blocker.unlink()  # the repair
    resumed = run_flow(cfg)
    assert sorted(resumed.result["stages_ran"]) == ["squeeze-xlearner", "transfer"]
    assert set(resumed.result["stage_seconds"]) == set(tasks) | {"transfer"}
    assert resumed.result["report_uri"].startswith(f"{store_root}/runs/transfer/")
