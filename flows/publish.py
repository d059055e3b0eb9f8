"""What a pipeline run publishes beside the store: its MLflow run, report and backbone.

- the MLflow parent run (:func:`parent_run`), which every stage logs into as a nested run,
  tagged with the Prefect flow run and the source versions it trained on;
- the results (:func:`publish_results`): the main row's AVG Cls and the run's duration as
  metrics, the table as ``report/report.{json,md}``; the main backbone registered as a
  version of ``tracking.register_model`` (the ``champion`` alias moves to it if it beats
  the current one); a Prefect markdown artifact with the table and the links.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from xlearner import tracking
from xlearner.config import PipelineConfig, Variant
from xlearner.contract import RANDOM_BACKBONE


@contextlib.contextmanager
def parent_run(cfg: PipelineConfig, config_uri: str) -> Iterator[str]:
    """The pipeline's MLflow run (active inside); yields its id for the stages."""
    tags = {
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
        "xlearner.variant": cfg.variant.value,
        "xlearner.config_uri": config_uri,
    }
    with tracking.pipeline_run(
        cfg.tracking, cfg.name, cfg.model_dump(mode="json"), tags
    ) as parent_run_id:
        yield parent_run_id


def tag_source_versions(versions: dict[str, str]) -> None:
    """Tag the active (parent) run with the version of every source it ingested."""
    import mlflow

    mlflow.set_tags({f"source.{n}.version": v for n, v in versions.items()})


@task(cache_policy=NO_CACHE)
def publish_results(
    cfg: PipelineConfig,
    transfer: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    parent_run_id: str | None,
    started: float,
) -> dict | None:
    """Log the report to the parent run, register the backbone of ``cfg.variant``'s row
    (of ``rows``), add the Prefect artifact; returns the registered model version (None
    for a random backbone). ``started``: when the pipeline started (``perf_counter``).

    Called (not submitted) from the flow: it runs in the flow's thread, inside the
    parent MLflow run.
    """
    report, main = transfer["report"], main_row(cfg)
    avg_cls = next(r for r in report["rows"] if r["name"] == main).get("avg_cls") or 0.0
    log_report(report, avg_cls, seconds=time.perf_counter() - started)
    registered = register_backbone(cfg, rows[main]["backbone"], avg_cls)
    url = mlflow_run_url(parent_run_id)
    report_artifact(cfg, transfer, registered, parent_run_id, url)
    return registered


def main_row(cfg: PipelineConfig) -> str:
    """The report row of ``cfg.variant`` (its first source's, for single_task)."""
    if cfg.variant == Variant.single_task:
        return f"single_task:{cfg.sources[0].name}"
    return cfg.variant.value


def log_report(report: dict, avg_cls: float, seconds: float) -> None:
    import mlflow

    from xlearner.transfer.report import format_table

    mlflow.log_metrics({"transfer/avg_cls": avg_cls, "pipeline/seconds": seconds})
    mlflow.log_dict(report, "report/report.json")
    mlflow.log_text(format_table(report), "report/report.md")


def register_backbone(cfg: PipelineConfig, backbone: str, avg_cls: float) -> dict | None:
    """A new version of the registered model from the backbone at URI ``backbone``."""
    if backbone.startswith(RANDOM_BACKBONE):
        return None
    from xlearner.outputs import fetch_dir

    return tracking.register_backbone(cfg.tracking, fetch_dir(backbone), avg_cls)


def mlflow_run_url(parent_run_id: str | None) -> str | None:
    """The parent run's page on an MLflow server (None for a local tracking store)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not parent_run_id or not uri.startswith("http"):
        return None
    run = mlflow.get_run(parent_run_id)
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{parent_run_id}"


def report_artifact(
    cfg: PipelineConfig,
    transfer: dict,
    registered: dict | None,
    parent_run_id: str | None,
    mlflow_url: str | None,
) -> None:
    """The transfer table and its links as a markdown artifact of the flow run."""
    from xlearner.transfer.report import format_table

    links = [f"- Report: `{transfer.get('out', '')}`"]
    if mlflow_url:
        links.append(f"- MLflow run: [{parent_run_id}]({mlflow_url})")
    if registered:
        links.append(
            f"- Registered model: `{registered['model_uri']}` (champion: {registered['champion']})"
        )
    body = (
        f"# X-Learner transfer report: {cfg.name}\n\n{format_table(transfer['report'])}\n\n"
        + "\n".join(links)
    )
    create_markdown_artifact(
        key=f"xlearner-report-{cfg.name}".replace("_", "-"),
        markdown=body,
        description="Transfer table of this pipeline run",
    )
