"""What a pipeline run publishes beside the store: its MLflow run, report and backbone.

- the MLflow parent run (:func:`parent_run`), which every stage logs into as a nested run,
  tagged with the Prefect flow run and the source versions it trained on, each source's
  manifest one of its dataset inputs (:func:`log_source_inputs`);
- the results (:func:`publish_results`): the main row's AVG Cls and the run's duration as
  metrics, the report as ``report/report.{json,md,png}`` and an MLflow table
  (``report/rows.json``); the main backbone registered as a version of
  ``tracking.register_model`` (the ``champion`` alias moves to it if it beats the current
  one); a Prefect markdown artifact with the table and the links.
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
from xlearner.secrets import redact


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


def log_source_inputs(cfg: PipelineConfig, manifests: dict[str, str]):
    """Every ingested manifest as a dataset input of the active (parent) run: the training
    sources in context ``training``, the downstream sets in ``evaluation``."""
    for names, context in (
        ([s.name for s in cfg.sources], "training"),
        ([d.name for d in cfg.downstream], "evaluation"),
    ):
        chosen = {n: manifests[n] for n in names if n in manifests}
        tracking.log_source_inputs(chosen, context)


@task(cache_policy=NO_CACHE)
def publish_results(
    cfg: PipelineConfig,
    transfer: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    parent_run_id: str | None,
    started: float,
    results: dict | None = None,
) -> dict | None:
    """Log the report to the parent run, register the backbone of ``cfg.variant``'s row
    (of ``rows``), add the Prefect artifact; returns the registered model version (None
    for a random backbone). ``started``: when the pipeline started (``perf_counter``).
    ``results``: the means, intervals and claims over seeds (logged, and in the artifact).

    Called (not submitted) from the flow: it runs in the flow's thread, inside the
    parent MLflow run.
    """
    report, main = transfer["report"], main_row(cfg)
    avg_cls = next(r for r in report["rows"] if r["name"] == main).get("avg_cls") or 0.0
    log_report(report, avg_cls, seconds=time.perf_counter() - started)
    if transfer.get("out"):
        log_report_chart(transfer["out"], cfg.store.endpoint_url)
    if results is not None:
        log_results(results)
    registered = register_backbone(cfg, rows[main]["backbone"], avg_cls)
    url = mlflow_run_url(parent_run_id)
    report_artifact(cfg, transfer, registered, parent_run_id, url, results)
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
    mlflow.log_table(report_rows(report), artifact_file="report/rows.json")


def report_rows(report: dict) -> dict[str, list]:
    """The report's rows as columns (MLflow's table artifact): one row per backbone, one
    column per value (``cls.<dataset>`` for a task's scores; missing ones empty)."""
    flat = [_flat_row(row) for row in report["rows"]]
    columns = dict.fromkeys(k for row in flat for k in row)
    return {column: [row.get(column) for row in flat] for column in columns}


def _flat_row(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat |= {f"{key}.{name}": score for name, score in value.items()}
        else:
            flat[key] = value
    return flat


def log_report_chart(transfer_out: str, endpoint_url: str | None) -> None:
    """The transfer stage's chart (``report/report.png``) on the parent run too."""
    import mlflow

    from xlearner.outputs import fetch_dir

    chart = fetch_dir(transfer_out, endpoint_url) / "report" / "report.png"
    mlflow.log_artifact(str(chart), artifact_path="report")


def log_results(results: dict) -> None:
    """The results over seeds on the parent run: JSON, the page, the chart, the claims."""
    import mlflow

    from xlearner.transfer.results import results_chart, results_markdown

    mlflow.log_dict(results, "report/results.json")
    mlflow.log_text(results_markdown(results), "report/results.md")
    mlflow.log_figure(results_chart(results), "report/results.png")
    claims = results["claims"]
    columns = ("claim", "metric", "difference", "low", "high", "n", "verdict")
    mlflow.log_table({c: [claim[c] for claim in claims] for c in columns}, "report/claims.json")


def register_backbone(cfg: PipelineConfig, backbone: str, avg_cls: float) -> dict | None:
    """A new version of the registered model from the backbone at URI ``backbone``."""
    if backbone.startswith(RANDOM_BACKBONE):
        return None
    from xlearner.outputs import fetch_dir

    return tracking.register_backbone(
        cfg.tracking, fetch_dir(backbone, cfg.store.endpoint_url), avg_cls, cfg.model.image_size
    )


def mlflow_run_url(parent_run_id: str | None) -> str | None:
    """The parent run's page on an MLflow server (None for a local tracking store)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not parent_run_id or not uri.startswith("http"):
        return None
    run = mlflow.get_run(parent_run_id)
    return redact(f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{parent_run_id}")


def report_artifact(
    cfg: PipelineConfig,
    transfer: dict,
    registered: dict | None,
    parent_run_id: str | None,
    mlflow_url: str | None,
    results: dict | None = None,
) -> None:
    """The transfer table (with ``results``: the page over seeds, claims included) and its
    links as a markdown artifact of the flow run."""
    from xlearner.transfer.report import format_table
    from xlearner.transfer.results import results_markdown

    links = [f"- Report: `{transfer.get('out', '')}`"]
    if mlflow_url:
        links.append(f"- MLflow run: [{parent_run_id}]({mlflow_url})")
    if registered:
        links.append(
            f"- Registered model: `{registered['model_uri']}` (champion: {registered['champion']})"
        )
    body = (
        f"# X-Learner transfer report: {cfg.name}\n\n{format_table(transfer['report'])}\n\n"
        + (results_markdown(results) + "\n" if results is not None else "")
        + "\n".join(links)
    )
    create_markdown_artifact(
        key=f"xlearner-report-{cfg.name}".replace("_", "-"),
        markdown=body,
        description="Transfer table of this pipeline run",
    )
