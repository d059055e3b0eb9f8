"""The stage calls of one pipeline run: which stage runs with which inputs, and where.

A :class:`Plan` turns "expand the cls task" into a typed call of the stage contract
(:class:`~xlearner.contract.ExpandCall`, ...) and submits it as a :func:`run_stage` task.
Its output goes to ``runs/<stage>/<cache key>/`` in the store, where the key hashes the
stage, the config it depends on (:meth:`Plan.config_section`), its inputs and the code
version (:mod:`flows.caching`). Submissions are memoised by output: the variants of one
run share every stage they have in common, and a stage whose ``result.json`` exists
already (an earlier run's) is reused instead of run, once its files are checked against
their recorded sha256 (:mod:`xlearner.integrity`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.tasks import exponential_backoff

from flows.caching import file_digest, source_fingerprint, stage_key, stage_out
from flows.gpus import stage_gpus
from flows.runners import StageFailed, make_runner, stopping
from xlearner.config import PipelineConfig, hash_json
from xlearner.contract import (
    HARD_SHARING_TASK,
    ExitCode,
    ExpandCall,
    IngestCall,
    ReconcileCall,
    SqueezeCall,
    StageCall,
    TransferCall,
)
from xlearner.data.held_out import check_held_out_content
from xlearner.integrity import IntegrityError, set_aside, verified_result
from xlearner.store import open_store
from xlearner.store_keys import config_key
from xlearner.tasks import TaskType

Result = dict[str, Any]  # what a stage answered (its result.json)
EXPERT_SEED_OFFSET = 10_000  # X-Learner++'s single-source experts train from seed + this


def absolute_store_uri(uri: str) -> str:
    """A local store as an absolute path (stage processes may run elsewhere); S3 as is."""
    return uri if "://" in uri else str(Path(uri).resolve())


def publish_config(cfg: PipelineConfig, store_uri: str) -> str:
    """The stages read the config from the store, so containers see exactly this one."""
    store = open_store(store_uri, cfg.store.endpoint_url)
    data = cfg.model_dump(mode="json")
    key = config_key(hash_json(data))
    if not store.exists(key):
        store.write_json(key, data)
    return store.uri(key)


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
    no_repair: bool = False  # a damaged output fails the run instead of being re-run

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


# a stage's exit codes that a rerun fails the same way (or that were asked for)
NOT_RETRIED = frozenset({ExitCode.BAD_INPUT, ExitCode.STOPPED})


def _transient(task, task_run, state) -> bool:
    """Retry stage failures (FAILED, TRANSIENT, BUSY, a container that did not start)
    except bad input, which fails the same way again, and a stop that was asked for."""
    if stopping():
        return False
    try:
        state.result()
    except StageFailed as err:
        return err.returncode not in NOT_RETRIED
    except Exception:  # noqa: BLE001 - store/network errors of the task itself are worth a retry
        return True
    return False


@task(
    retries=2,  # back-off 5 then 10 s (a store restart, a busy output's writer finishing)
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=_transient,
    cache_policy=NO_CACHE,
    task_run_name="{label}",
)
def run_stage(ctx: PipelineContext, label: str, call: StageCall) -> Result:
    """Run one stage call unless its output is already published."""
    logger = get_run_logger()
    store = open_store(call.out, ctx.cfg.store.endpoint_url)
    t0 = time.perf_counter()
    try:  # reused only when every file it recorded is intact; a damaged one is re-run
        done = verified_result(store)
    except IntegrityError as err:
        if ctx.no_repair:
            bad = ExitCode.BAD_INPUT  # not retried: it fails the same way
            raise StageFailed(call.stage.value, bad, "", f"not reused: {err}") from None
        logger.warning(f"{label}: {err}")
        set_aside(store)
        done = None
    if done is not None:
        logger.info(f"{label}: reusing {call.out} (its files match their recorded sha256)")
        ctx.record(label, 0.0, ran=False)
        return {**done.dump(), "cached": True}
    runner = make_runner(ctx.cfg.runner)
    stage = call.stage.value

    def log(line: str) -> None:
        logger.info(f"[{label}] {line}")

    # the GPUs it holds while it runs (it waits for free ones; Ray places its own)
    with stage_gpus(ctx.cfg, stage, runner.gpu_host, log) as (resources, gpu_ids):
        result = runner.run(
            stage, call.to_argv(), env=ctx.env, log=log, resources=resources, gpu_ids=gpu_ids
        )
    ctx.record(label, time.perf_counter() - t0, ran=True)
    if result.result is None:
        raise StageFailed(
            stage, result.returncode, result.log_tail, "printed no XLEARNER_RESULT line"
        )
    return result.result


def planned_stages(cfg: PipelineConfig) -> int:
    """About how many stage calls a run makes (the progress bar's denominator): the
    ingests once, the rest once per seed."""
    per_seed = 2 + len(cfg.task_types) + 2 * len(cfg.compare)
    return len(cfg.sources) + len(cfg.downstream) + per_seed * len(cfg.run_seeds)


class Plan:
    """The stage calls of one pipeline run, memoised so variants share what they share."""

    def __init__(self, ctx: PipelineContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.memo: dict[str, PrefectFuture] = {}
        self.manifests: dict[str, str] = {}  # source -> manifest URI (after ingest)
        self.versions: dict[str, str] = {}  # source -> version (after ingest)

    @classmethod
    def start(
        cls, cfg: PipelineConfig, config_uri: str, parent_run_id: str | None, env: dict[str, str]
    ) -> Plan:
        """The plan of a pipeline run, with its progress artifact (call it in the flow)."""
        ctx = PipelineContext(cfg, config_uri, parent_run_id, env=env)
        ctx.progress_id = create_progress_artifact(progress=0.0, description="stages done")
        ctx.planned = planned_stages(cfg)
        return cls(ctx)

    def derived(self, cfg: PipelineConfig) -> Plan:
        """A plan over a variant's own config, sharing this run's ingests and stage calls."""
        ctx = dataclasses.replace(
            self.ctx, cfg=cfg, config_uri=publish_config(cfg, self.ctx.store_uri)
        )
        plan = Plan(ctx)
        plan.memo, plan.manifests, plan.versions = self.memo, self.manifests, self.versions
        return plan

    def seeded(self, seed: int) -> Plan:
        """The plan of one seed of a multi-seed run: the seed enters the cache keys of the
        stages that read it (training, transfer: their call's ``reads``), not the ingests'."""
        return self.derived(self.cfg.with_seed(seed))

    # cache keys and submission ---------------------------------------------------------
    def config_section(
        self,
        call: type[StageCall],
        sources: Iterable[str] | None = None,
        tasks: Iterable[TaskType] = (),
        also_reads: tuple[str, ...] = (),
        **decided: Any,
    ) -> dict[str, Any]:
        """What a stage's output depends on in the config: the cache key's config part.

        The sections its call class ``reads`` (plus ``also_reads``), each narrowed to
        what this call uses: ``sources`` are the sources it trains on or ingests (default:
        every training source), so that a change to another source does not re-run it;
        ``heads`` are the options of their heads; ``tasks`` the hyper-parameters of the
        ``tasks`` it trains. Training stages read their data from manifests (whose versions
        are inputs of the key), so a source's ``uri`` counts for ingest only. ``decided``:
        what the plan chose for this call and the config does not say (a reconcile mode,
        a squeeze method, a number of steps).
        """
        cfg = self.cfg
        names = None if sources is None else set(sources)
        ingest = call is IngestCall

        def chosen(entries: list) -> list:
            return [e for e in entries if names is None or e.name in names]

        trained = chosen(cfg.sources)
        narrowed: dict[str, Any] = {
            "sources": (
                [s.model_dump(mode="json") for s in trained]
                if ingest
                else [
                    {**s.model_dump(mode="json", exclude={"uri"}), "tasks": s.resolved_tasks}
                    for s in trained
                ]
            ),
            "downstream": [d.model_dump(mode="json") for d in chosen(cfg.downstream)],
            "heads": {  # only the options of the heads it trains (the SSL ones have some)
                t.value: options
                for s in trained
                for t in s.resolved_tasks
                if (options := cfg.heads.options(t))
            },
            "tasks": {t.value: cfg.train_config(t).model_dump(mode="json") for t in tasks},
            "engine": cfg.engine.model_dump(mode="json", exclude={"log_every_steps"}),
            "store": self.ctx.store_uri,  # where its output and inputs are
        }
        section = {
            name: narrowed[name] if name in narrowed else _config_value(cfg, name)
            for name in (*call.reads, *also_reads)
        }
        return {**section, **decided}

    def submit(
        self, label: str, call: type[StageCall], section: Any, inputs: Any, **fields: Any
    ) -> PrefectFuture:
        """Submit ``call(**fields)`` (once per output); its output folder is its cache key."""
        stage = call.stage.value
        key = stage_key(stage, section, inputs, self.ctx.cfg.runner)
        out = stage_out(self.ctx.store_uri, stage, key)
        if out not in self.memo:
            stage_call = call(
                config=self.ctx.config_uri,
                out=out,
                mlflow_parent_run_id=self.ctx.parent_run_id,
                **fields,
            )
            self.memo[out] = run_stage.submit(self.ctx, label, stage_call)
        return self.memo[out]

    # ingest ----------------------------------------------------------------------------
    def ingest(self) -> dict[str, str]:
        """Ingest every source and downstream set; returns their versions."""
        futures = {}
        for source in [*self.cfg.sources, *self.cfg.downstream]:
            fingerprint = source_fingerprint(source.uri, self.cfg.store.endpoint_url)
            futures[source.name] = self.submit(
                f"ingest-{source.name}",
                IngestCall,
                self.config_section(IngestCall, sources=[source.name]),
                {"fingerprint": fingerprint},
                sources=[source.name],
                store=self.ctx.store_uri,
            )
        results = {name: f.result() for name, f in futures.items()}
        self.manifests = {name: r["manifests"][name] for name, r in results.items()}
        self.versions = {name: r["versions"][name] for name, r in results.items()}
        check_held_out_content(  # the same images in a downstream set and a training source
            self.manifests_of(s.name for s in self.cfg.sources),
            self.manifests_of(d.name for d in self.cfg.downstream),
            self.cfg.store.endpoint_url,
        )
        return self.versions

    def manifests_of(self, names: Iterable[str]) -> dict[str, str]:
        return {n: self.manifests[n] for n in names}

    def training_sources(self) -> list[str]:
        return [s.name for s in self.cfg.sources]

    def source_versions(self) -> dict[str, str]:
        """The versions of this plan's training sources (not the downstream sets, nor the
        sources a derived plan left out): what joint training depends on."""
        return {name: self.versions[name] for name in self.training_sources()}

    # expand ----------------------------------------------------------------------------
    def expand(self, task: TaskType, only_source: str | None = None) -> PrefectFuture:
        """One task's sub-backbone, trained on the task's sources (or on ``only_source``)."""
        sources = [s.name for s in self.cfg.sources_for(task) if only_source in (None, s.name)]
        label = f"expand-{task.value}" + (f"-{only_source}" if only_source else "")
        return self.submit(
            label,
            ExpandCall,
            self.config_section(ExpandCall, sources=sources, tasks=[task]),
            {
                "versions": {s: self.versions[s] for s in sources},
                "pretrained": file_digest(self.cfg.pretrained_path_for(task)),
            },
            task=task.value,
            manifests=self.manifests_of(sources),
            source=only_source,
        )

    def expand_all(self) -> dict[str, Result]:
        """One sub-backbone per task, trained in parallel."""
        futures = {t.value: self.expand(t) for t in self.cfg.task_types}
        return {task: f.result() for task, f in futures.items()}

    def expand_per_source(self) -> dict[str, Result]:
        """One backbone per source, trained on its first task alone, one after the other."""
        return {s.name: self.expand(s.resolved_tasks[0], s.name).result() for s in self.cfg.sources}

    def experts(self) -> dict[str, Result]:
        """X-Learner++'s single-source experts, one per source: trained as
        :meth:`expand_per_source` but from their own seed (``seed + EXPERT_SEED_OFFSET``),
        so an expert is a run of its own even where a task has one source (whose
        sub-backbone would otherwise be the very same output)."""
        offset = self.cfg.with_seed(self.cfg.seed + EXPERT_SEED_OFFSET)
        return self.derived(offset).expand_per_source()

    def hard_sharing(
        self,
        init_backbone: str | None = None,
        steps: int | None = None,
        label: str = "hard_sharing",
    ) -> Result:
        """One trunk with every task's heads, trained on every source at once (with the
        reconcile hyper-parameters), optionally from ``init_backbone``."""
        section = self.config_section(
            ExpandCall, tasks=self.cfg.task_types, also_reads=("reconcile.train",), steps=steps
        )
        return self.submit(
            label,
            ExpandCall,
            section,
            {
                "versions": self.source_versions(),
                "init": init_backbone,
                "pretrained": file_digest(self.cfg.pretrained_path_for(None)),
            },
            task=HARD_SHARING_TASK,
            manifests=self.manifests_of(self.training_sources()),
            init_backbone=init_backbone,
            steps=steps,
        ).result()

    # reconcile -------------------------------------------------------------------------
    def reconcile(self, subs: dict[str, Result], mode: str | None = None) -> Result:
        """Join the sub-backbones with reconciliation layers (``mode``, default the
        config's) and train them jointly: the expanded model."""
        mode = mode or self.cfg.reconcile.mode
        return self.submit(
            f"reconcile-{mode}",
            ReconcileCall,
            self.config_section(ReconcileCall, mode=mode),
            {"subs": {t: r["out"] for t, r in subs.items()}, "versions": self.source_versions()},
            sub_models={t: r["model"] for t, r in subs.items()},
            manifests=self.manifests_of(self.training_sources()),
            overrides=[f"reconcile.mode={mode}"],
        ).result()

    # squeeze ---------------------------------------------------------------------------
    def squeeze(
        self,
        expanded: Result,
        label: str,
        method: str | None = None,
        hints: dict[str, Result] | None = None,
    ) -> Result:
        """Condense the expanded model into one backbone (``method``, default the
        config's; ``hints``: extra backbones to match, X-Learner++). The row keeps the
        number of images the expanded model was trained on."""
        inputs: dict[str, Any] = {"teacher": expanded["out"]}
        if hints is not None:
            inputs["hints"] = {n: r["out"] for n, r in hints.items()}
        squeezed = self._squeeze(
            label,
            method or self.cfg.squeeze.method,
            inputs,
            external_hints=hints is not None,
            teacher=expanded["model"],
            hints={n: r["backbone"] for n, r in (hints or {}).items()},
        )
        return {**squeezed, "train_images": expanded.get("train_images")}

    def squeeze_subs(self, subs: dict[str, Result], label: str) -> Result:
        """Distil the sub-backbones themselves (no expanded model) into one backbone."""
        inputs = {"subs": {t: r["out"] for t, r in subs.items()}}
        return self._squeeze(
            label, "distill", inputs, sub_models={t: r["model"] for t, r in subs.items()}
        )

    def _squeeze(
        self, label: str, method: str, inputs: Any, external_hints: bool = False, **fields: Any
    ) -> Result:
        """Submit a squeeze; ``squeeze.hints`` (and their weight) count for the X-Learner++
        squeeze only (``external_hints``): the others are told there are none."""
        section = self.config_section(SqueezeCall, method=method)
        overrides = [f"squeeze.method={method}"]
        if external_hints:
            hint_files = {h.name: file_digest(h.path) for h in self.cfg.squeeze.hints}
            inputs = {**inputs, "hint_files": hint_files}
        else:
            unused = ("hints", "hint_weight")
            section["squeeze"] = {k: v for k, v in section["squeeze"].items() if k not in unused}
            overrides.append("squeeze.hints=[]")
        student = file_digest(self.cfg.squeeze.student_pretrained_path)
        return self.submit(
            label,
            SqueezeCall,
            section,
            {**inputs, "student_pretrained": student},
            manifests=self.manifests_of(self.training_sources()),
            overrides=overrides,
            **fields,
        ).result()

    # transfer --------------------------------------------------------------------------
    def transfer(self, rows: dict[str, Result]) -> Result:
        """Evaluate every row's backbone on the downstream sets: the report."""
        downstream = [d.name for d in self.cfg.downstream]
        return self.submit(
            "transfer",
            TransferCall,
            self.config_section(TransferCall),
            {
                "rows": {n: r.get("out", r["backbone"]) for n, r in rows.items()},
                "downstream": {d: self.versions[d] for d in downstream},
            },
            backbones={n: r["backbone"] for n, r in rows.items()},
            train_images={
                n: str(r["train_images"]) for n, r in rows.items() if r.get("train_images")
            },
            downstream=self.manifests_of(downstream),
        ).result()


def _config_value(cfg: PipelineConfig, dotted: str) -> Any:
    """The config section ``a.b`` as JSON (None where this config has no such section)."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value
