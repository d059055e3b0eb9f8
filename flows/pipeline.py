"""The X-Learner pipeline as a Prefect flow.

    sources --ingest--> manifests --expand (one per task, in parallel)--> sub-backbones
        --reconcile--> expanded model --squeeze--> backbone --transfer--> report

Every box is a stage command run by a runner (a local process or a Docker container);
tasks here only decide *which* stage runs with *which* inputs and where its output goes
(``runs/<stage>/<cache key>/`` in the store). A stage whose output already exists is
skipped, so a failed pipeline rerun starts where it failed and a changed source re-runs
only what depends on it. ``config.compare`` adds the paper's other variants; they share
every stage they have in common.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows import warm_start
from flows.caching import source_fingerprint, stage_key, stage_out
from flows.runners import StageFailed, make_runner
from xlearner import tracking
from xlearner.config import PipelineConfig, TaskType, Variant
from xlearner.store import open_store

RESULT_FILE = "result.json"
INPUT_ERROR_EXIT = 2  # stages exit 2 on bad input: retrying cannot help


def absolute_store_uri(uri: str) -> str:
    """A local store as an absolute path (stage processes may run elsewhere); S3 as is."""
    return uri if "://" in uri else str(Path(uri).resolve())


@dataclass
class PipelineContext:
    """What every stage call of one pipeline run shares."""

    cfg: PipelineConfig
    config_uri: str
    parent_run_id: str | None
    env: dict[str, str] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    progress_id: Any = None
    planned: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def store_uri(self) -> str:
        return absolute_store_uri(self.cfg.store.uri)

    def record(self, label: str, seconds: float, ran: bool) -> None:
        with self.lock:
            self.stage_seconds[label] = seconds
            if ran:
                self.ran.append(label)
            if self.progress_id is not None:
                done = min(1.0, len(self.stage_seconds) / max(self.planned, 1))
                update_progress_artifact(self.progress_id, progress=100 * done)


def _transient(task, task_run, state) -> bool:
    """Retry stage failures except bad input (exit 2), which fails the same way again."""
    try:
        state.result()
    except StageFailed as err:
        return err.returncode != INPUT_ERROR_EXIT
    except Exception:  # noqa: BLE001 - store/network/container start errors are worth a retry
        return True
    return False


@task(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
    task_run_name="{label}",
)
def run_stage(ctx: PipelineContext, stage: str, label: str, args: list[str], out: str) -> dict:
    """Run one stage command unless its output is already published."""
    logger = get_run_logger()
    store = open_store(out, ctx.cfg.store.endpoint_url)
    t0 = time.perf_counter()
    if store.exists(RESULT_FILE):
        logger.info(f"{label}: reusing {out}")
        ctx.record(label, 0.0, ran=False)
        return {**store.read_json(RESULT_FILE), "cached": True}
    command = [*args, "--config", ctx.config_uri, "--out", out]
    if ctx.parent_run_id:
        command += ["--mlflow-parent-run-id", ctx.parent_run_id]
    runner = make_runner(ctx.cfg.runner)
    result = runner.run(
        stage, command, env=ctx.env, log=lambda line: logger.info(f"[{label}] {line}")
    )
    ctx.record(label, time.perf_counter() - t0, ran=True)
    if result.result is None:
        raise StageFailed(
            stage, result.returncode, result.log_tail, "printed no XLEARNER_RESULT line"
        )
    return result.result


@task(cache_policy=NO_CACHE)
def synthesize_sources(cfg: PipelineConfig) -> list[str]:
    """Generate the synthetic sources on first use (the quick start and the tests)."""
    from xlearner.data.synth import synthesize

    missing = [
        s.uri
        for s in [*cfg.sources, *cfg.downstream]
        if "://" not in s.uri and not Path(s.uri).exists()
    ]
    if missing:
        synthesize(
            cfg.synth.out,
            seed=cfg.synth.seed,
            images_per_source=cfg.synth.images_per_source,
            image_size=cfg.synth.image_size,
        )
    return missing


class Plan:
    """The stage calls of one pipeline run, memoised so variants share what they share."""

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.memo: dict[str, PrefectFuture] = {}

    def submit(
        self, stage: str, label: str, section: Any, inputs: Any, args: list[str]
    ) -> PrefectFuture:
        out = stage_out(self.ctx.store_uri, stage, stage_key(stage, section, inputs))
        if out not in self.memo:
            self.memo[out] = run_stage.submit(self.ctx, stage, label, args, out)
        return self.memo[out]

    def derived(self, cfg: PipelineConfig) -> Plan:
        """A plan over a variant's own config, sharing this run's ingests and stage calls."""
        ctx = dataclasses.replace(
            self.ctx, cfg=cfg, config_uri=publish_config(cfg, self.ctx.store_uri)
        )
        plan = Plan(ctx)
        plan.memo, plan.manifests, plan.versions = self.memo, self.manifests, self.versions
        return plan

    # ingest -------------------------------------------------------------------------
    def ingest(self) -> dict[str, dict]:
        futures = {}
        for source in [*self.cfg.sources, *self.cfg.downstream]:
            fingerprint = source_fingerprint(source.uri, self.cfg.store.endpoint_url)
            section = {
                "source": source.model_dump(mode="json"),
                "image_size": self.cfg.model.image_size,
            }
            futures[source.name] = self.submit(
                "ingest",
                f"ingest-{source.name}",
                section,
                {"fingerprint": fingerprint, "store": self.ctx.store_uri},
                ["--source", source.name, "--store", self.ctx.store_uri],
            )
        results = {name: f.result() for name, f in futures.items()}
        self.manifests = {name: r["manifests"][name] for name, r in results.items()}
        self.versions = {name: r["versions"][name] for name, r in results.items()}
        return results

    def manifest_args(self, names: list[str]) -> list[str]:
        return [arg for n in names for arg in ("--manifest", f"{n}={self.manifests[n]}")]

    def training_section(self, extra: Any, sources: list[str] | None = None) -> dict:
        """What a training stage's output depends on in the config (its cache key part).

        ``sources``: the sources it trains on (default all), so that a change to another
        source does not re-run it.
        """
        chosen = [s for s in self.cfg.sources if sources is None or s.name in sources]
        return {
            "model": self.cfg.model.model_dump(mode="json"),
            "heads": {  # only the options of the heads it trains (the SSL ones have some)
                t.value: options
                for s in chosen
                for t in s.resolved_tasks
                if (options := self.cfg.heads.options(t))
            },
            "engine": self.cfg.engine.model_dump(mode="json", exclude={"log_every_steps"}),
            "seed": self.cfg.seed,
            "sources": [
                {**s.model_dump(mode="json", exclude={"uri"}), "tasks": s.resolved_tasks}
                for s in chosen
            ],
            "extra": extra,
        }

    # expansion -----------------------------------------------------------------------
    def expand(self, task: TaskType, only_source: str | None = None) -> PrefectFuture:
        sources = [s.name for s in self.cfg.sources_for(task) if only_source in (None, s.name)]
        args = ["--task", task.value, *self.manifest_args(sources)]
        label = f"expand-{task.value}" + (f"-{only_source}" if only_source else "")
        if only_source:
            args += ["--source", only_source]
        section = self.training_section(
            {"task": task.value, "train": self.cfg.train_config(task).model_dump(mode="json")},
            sources,
        )
        return self.submit("expand", label, section, {s: self.versions[s] for s in sources}, args)

    def expand_all(self) -> dict[str, dict]:
        futures = {t.value: self.expand(t) for t in self.cfg.task_types}
        return {task: f.result() for task, f in futures.items()}

    def all_manifests(self) -> list[str]:
        return [s.name for s in self.cfg.sources]

    def source_versions(self) -> dict[str, str]:
        """The versions of this plan's training sources (not the downstream sets, nor the
        sources a derived plan left out): what joint training depends on."""
        return {name: self.versions[name] for name in self.all_manifests()}

    def reconcile(self, subs: dict[str, dict], mode: str) -> dict:
        section = self.training_section(
            {"reconcile": self.cfg.reconcile.model_dump(mode="json"), "mode": mode}
        )
        args = [arg for t, r in subs.items() for arg in ("--sub-model", f"{t}={r['model']}")]
        args += [*self.manifest_args(self.all_manifests()), "--set", f"reconcile.mode={mode}"]
        inputs = {
            "subs": {t: r["out"] for t, r in subs.items()},
            "versions": self.source_versions(),
        }
        return self.submit("reconcile", f"reconcile-{mode}", section, inputs, args).result()

    def squeeze(self, label: str, teacher_args: list[str], inputs: Any, method: str) -> dict:
        section = self.training_section(
            {"squeeze": self.cfg.squeeze.model_dump(mode="json"), "method": method}
        )
        args = [
            *teacher_args,
            *self.manifest_args(self.all_manifests()),
            "--set",
            f"squeeze.method={method}",
        ]
        return self.submit("squeeze", label, section, inputs, args).result()

    def hard_sharing(
        self,
        init_backbone: str | None = None,
        steps: int | None = None,
        label: str = "hard_sharing",
    ) -> dict:
        args = ["--task", "all", *self.manifest_args(self.all_manifests())]
        if init_backbone:
            args += ["--init-backbone", init_backbone]
        if steps:
            args += ["--steps", str(steps)]
        section = self.training_section(
            {
                "hard_sharing": self.cfg.reconcile.train.model_dump(mode="json"),
                "steps": steps,
                "tasks": {
                    t.value: self.cfg.train_config(t).model_dump(mode="json")
                    for t in self.cfg.task_types
                },
            }
        )
        inputs = {"versions": self.source_versions(), "init": init_backbone}
        return self.submit("expand", label, section, inputs, args).result()

    # variants --------------------------------------------------------------------------
    def variant(self, variant: Variant) -> dict[str, dict]:
        """Train one variant; returns its rows: name -> {backbone, parameters, train_images}."""
        if variant == Variant.hard_sharing:
            return {"hard_sharing": self.hard_sharing()}
        if variant == Variant.no_ssl:
            return {
                "no_ssl": self.derived(self.cfg.without_ssl()).variant(Variant.xlearner)[
                    Variant.xlearner.value
                ]
            }
        if variant == Variant.single_task:
            return {
                f"single_task:{s.name}": self.expand(s.resolved_tasks[0], s.name).result()
                for s in self.cfg.sources
            }
        subs = self.expand_all()
        teacher = {"subs": {t: r["out"] for t, r in subs.items()}}
        if variant == Variant.squeeze_expansion:
            sub_args = [
                arg for t, r in subs.items() for arg in ("--sub-model", f"{t}={r['model']}")
            ]
            squeezed = self.squeeze("squeeze-before-expansion", sub_args, teacher, "distill")
            steps = self.cfg.reconcile.train.steps
            return {
                "squeeze_expansion": self.hard_sharing(
                    squeezed["backbone"], steps, "expand-after-squeeze"
                )
            }
        mode = "none" if variant == Variant.no_reconciliation else self.cfg.reconcile.mode
        expanded = self.reconcile(subs, mode)
        teacher_args = ["--teacher", expanded["model"]]
        inputs = {"teacher": expanded["out"]}
        if variant == Variant.xlearner_pp:
            hints = {
                s.name: self.expand(s.resolved_tasks[0], s.name).result() for s in self.cfg.sources
            }
            teacher_args += [
                a for n, r in hints.items() for a in ("--hint", f"{n}={r['backbone']}")
            ]
            inputs["hints"] = {n: r["out"] for n, r in hints.items()}
        method = "prune" if variant == Variant.prune else self.cfg.squeeze.method
        squeezed = self.squeeze(f"squeeze-{variant.value}", teacher_args, inputs, method)
        return {variant.value: {**squeezed, "train_images": expanded.get("train_images")}}

    # transfer --------------------------------------------------------------------------
    def transfer(self, rows: dict[str, dict]) -> dict:
        args = [*[a for n, r in rows.items() for a in ("--backbone", f"{n}={r['backbone']}")]]
        args += [
            a
            for n, r in rows.items()
            if r.get("train_images")
            for a in ("--train-images", f"{n}={r['train_images']}")
        ]
        args += [
            a
            for d in self.cfg.downstream
            for a in ("--downstream", f"{d.name}={self.manifests[d.name]}")
        ]
        section = {
            "transfer": self.cfg.transfer.model_dump(mode="json"),
            "model": self.cfg.model.model_dump(mode="json"),
            "engine": self.cfg.engine.model_dump(mode="json", exclude={"log_every_steps"}),
            "seed": self.cfg.seed,
        }
        inputs = {
            "rows": {n: r.get("out", r["backbone"]) for n, r in rows.items()},
            "downstream": {d.name: self.versions[d.name] for d in self.cfg.downstream},
        }
        return self.submit("transfer", "transfer", section, inputs, args).result()


def publish_config(cfg: PipelineConfig, store_uri: str) -> str:
    """The stages read the config from the store, so containers see exactly this one."""
    from xlearner.config import hash_json

    store = open_store(store_uri, cfg.store.endpoint_url)
    data = cfg.model_dump(mode="json")
    key = f"runs/config/{hash_json(data)[:20]}.json"
    if not store.exists(key):
        store.write_json(key, data)
    return store.uri(key)


def stage_env(cfg: PipelineConfig, parallel: int) -> dict[str, str]:
    """Threads per stage process so parallel expansions share the cores instead of fighting."""
    env = {"PYTHONUNBUFFERED": "1"}
    if cfg.runner.kind == "process" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(parallel, 1)))
    if cfg.tracking.uri is None:  # stages log where the pipeline logs
        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(cfg.tracking)
    return env


def run_report_artifacts(
    ctx: PipelineContext, report: dict, registered: dict | None, mlflow_url: str | None
) -> None:
    from xlearner.report import format_table

    links = [f"- Report: `{report.get('out', '')}`"]
    if mlflow_url:
        links.append(f"- MLflow run: [{ctx.parent_run_id}]({mlflow_url})")
    if registered:
        links.append(
            f"- Registered model: `{registered['model_uri']}` (champion: {registered['champion']})"
        )
    body = (
        f"# X-Learner transfer report: {ctx.cfg.name}\n\n{format_table(report['report'])}\n\n"
        + "\n".join(links)
    )
    create_markdown_artifact(
        key=f"xlearner-report-{ctx.cfg.name}".replace("_", "-"),
        markdown=body,
        description="Transfer table of this pipeline run",
    )


def mlflow_run_url(parent_run_id: str | None) -> str | None:
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not parent_run_id or not uri.startswith("http"):
        return None
    run = mlflow.get_run(parent_run_id)
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{parent_run_id}"


@flow(name="xlearner-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def xlearner_pipeline(config: PipelineConfig) -> dict:
    """Ingest every source, expand one sub-backbone per task, reconcile, squeeze, transfer."""
    logger = get_run_logger()
    cfg = config
    t0 = time.perf_counter()
    start_stage_interpreter(cfg)  # no-op if `run_pipeline` started it already
    if cfg.synth.enabled:
        synthesize_sources(cfg)
    config_uri = publish_config(cfg, absolute_store_uri(cfg.store.uri))
    parallel = min(4, len(cfg.task_types))
    tags = {
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_url": str(flow_run.ui_url or ""),
        "xlearner.variant": cfg.variant.value,
        "xlearner.config_uri": config_uri,
    }
    with tracking.pipeline_run(
        cfg.tracking, cfg.name, cfg.model_dump(mode="json"), tags
    ) as parent_run_id:
        ctx = PipelineContext(cfg, config_uri, parent_run_id, env=stage_env(cfg, parallel))
        ctx.progress_id = create_progress_artifact(progress=0.0, description="stages done")
        plan = Plan(ctx)
        ctx.planned = (
            2 + len(cfg.sources) + len(cfg.downstream) + len(cfg.task_types) + 2 * len(cfg.compare)
        )
        plan.ingest()
        import mlflow

        mlflow.set_tags({f"source.{n}.version": v for n, v in plan.versions.items()})
        rows: dict[str, dict] = {}
        for variant in dict.fromkeys([cfg.variant, *cfg.compare]):
            rows.update(plan.variant(variant))
        rows["random_init"] = {"backbone": f"random:{cfg.student_backbone}", "train_images": 0}
        transfer = plan.transfer(rows)
        report = transfer["report"]
        main_row = next(r for r in report["rows"] if r["name"] == _main_row(cfg))
        avg_cls = main_row.get("avg_cls") or 0.0
        mlflow.log_metrics(
            {"transfer/avg_cls": avg_cls, "pipeline/seconds": time.perf_counter() - t0}
        )
        mlflow.log_dict(report, "report/report.json")
        from xlearner.report import format_table

        mlflow.log_text(format_table(report), "report/report.md")
        registered = None
        main_backbone = rows[_main_row(cfg)]["backbone"]
        if not main_backbone.startswith("random:"):
            from stages.common import fetch_dir

            registered = tracking.register_backbone(cfg.tracking, fetch_dir(main_backbone), avg_cls)
        url = mlflow_run_url(parent_run_id)
    run_report_artifacts(ctx, transfer, registered, url)
    wall = time.perf_counter() - t0
    logger.info(f"pipeline done in {wall:.1f} s; stages ran: {ctx.ran}")
    return {
        "report": report,
        "report_uri": transfer.get("out"),
        "rows": rows,
        "mlflow_parent_run_id": parent_run_id,
        "registered": registered,
        "stages_ran": ctx.ran,
        "stage_seconds": ctx.stage_seconds,
        "wall_seconds": wall,
    }


def _main_row(cfg: PipelineConfig) -> str:
    return (
        cfg.variant.value
        if cfg.variant != Variant.single_task
        else f"single_task:{cfg.sources[0].name}"
    )


def start_stage_interpreter(cfg: PipelineConfig) -> None:
    """Start the warm-start fork server (process runner): its imports then overlap Prefect's
    start-up and the work before the first stage, instead of delaying that stage."""
    if cfg.runner.kind == "process" and cfg.runner.warm_start:
        warm_start.start()


def run_pipeline(cfg: PipelineConfig, echo: Callable[[str], None] = print) -> dict:
    """What ``xlearner run`` calls: runs the flow (ephemeral Prefect if no server is set)."""
    from xlearner.report import format_table

    start_stage_interpreter(cfg)
    result = xlearner_pipeline(config=cfg)
    echo("\n" + format_table(result["report"]))
    echo(f"\nreport: {result['report_uri']}")
    uri = tracking.tracking_uri(cfg.tracking)
    if uri.startswith("http"):
        echo(f"MLflow UI: {uri}")
    else:
        echo(f"MLflow UI: mlflow ui --backend-store-uri {uri}")
    return result
