"""The X-Learner pipeline as a Prefect flow.

    sources --ingest--> manifests --expand (one per task, in parallel)--> sub-backbones
        --reconcile--> expanded model --squeeze--> backbone --transfer--> report --publish

Every box is a stage command run by a runner (a local process or a Docker container);
the flow only decides *which* stage runs with *which* inputs (:class:`flows.plan.Plan`)
and where its output goes (``runs/<stage>/<cache key>/`` in the store). A stage whose
output already exists is skipped, so a failed pipeline rerun starts where it failed and
a changed source re-runs only what depends on it. ``config.compare`` adds the paper's
other variants (one function each, :data:`VARIANTS`); they share every stage they have
in common. ``config.seeds`` runs the variants and the transfer once per seed (the
ingests are shared) and summarises them: means, intervals, claims
(:mod:`xlearner.transfer.results`). Publishing (MLflow, the registered backbone, the
Prefect artifact) is :mod:`flows.publish`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import publish
from flows.plan import Plan, Result, absolute_store_uri, publish_config
from flows.redaction import redacted_flow
from flows.runners import warm_start
from xlearner import tracking
from xlearner.claims import RANDOM_ROW
from xlearner.config import PipelineConfig, Variant
from xlearner.config.pipeline import WITHOUT
from xlearner.contract import PARALLEL_STAGES_ENV, RANDOM_BACKBONE
from xlearner.store import endpoint_environment, open_store
from xlearner.store_keys import results_latest

Rows = dict[str, Result]  # report row name -> the stage result with its backbone


# the variants ----------------------------------------------------------------------------
def xlearner(plan: Plan) -> Rows:
    """The paper's method: one sub-backbone per task, reconciled, squeezed into one."""
    expanded = plan.reconcile(plan.expand_all())
    return {"xlearner": plan.squeeze(expanded, "squeeze-xlearner")}


def no_reconciliation(plan: Plan) -> Rows:
    """Ablation: the sub-backbones are joined without reconciliation layers."""
    expanded = plan.reconcile(plan.expand_all(), mode="none")
    return {"no_reconciliation": plan.squeeze(expanded, "squeeze-no_reconciliation")}


def prune(plan: Plan) -> Rows:
    """X-Learner with the expanded model pruned instead of distilled."""
    expanded = plan.reconcile(plan.expand_all())
    return {"prune": plan.squeeze(expanded, "squeeze-prune", method="prune")}


def xlearner_pp(plan: Plan) -> Rows:
    """X-Learner++: the squeeze also matches single-source expert backbones (hints), one
    per source, and the external hint checkpoints of ``squeeze.hints``."""
    expanded = plan.reconcile(plan.expand_all())
    hints = plan.experts()
    return {"xlearner_pp": plan.squeeze(expanded, "squeeze-xlearner_pp", hints=hints)}


def xlearner_r(plan: Plan) -> Rows:
    """X-Learner_r: half-width sub-backbones (``reconcile.r_sub_backbone``, HalfResNet-50)
    squeezed into the configured student. Pretrained files are for the configured
    architecture, so the half-width sub-backbones start from random weights."""
    cfg = plan.cfg
    half = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(
                update={"backbone": cfg.reconcile.r_sub_backbone, "pretrained_path": None}
            ),
            "tasks": {
                t: train.model_copy(update={"pretrained_path": None})
                for t, train in cfg.tasks.items()
            },
            "squeeze": cfg.squeeze.model_copy(update={"student": cfg.student_backbone}),
        }
    )
    return {"xlearner_r": xlearner(plan.derived(half))["xlearner"]}


def xlearner_t(plan: Plan) -> Rows:
    """X-Learner_t (our reading of the paper's table, docs/results.md): reconciliation
    layers that receive the same level only (Observation 4's ablation)."""
    expanded = plan.reconcile(plan.expand_all(), mode="same_level")
    return {"xlearner_t": plan.squeeze(expanded, "squeeze-xlearner_t")}


def hard_sharing(plan: Plan) -> Rows:
    """Baseline: one trunk trained on every source at once."""
    return {"hard_sharing": plan.hard_sharing()}


def squeeze_expansion(plan: Plan) -> Rows:
    """The order reversed: squeeze the sub-backbones first, then expand the result
    (hard sharing from the squeezed backbone)."""
    squeezed = plan.squeeze_subs(plan.expand_all(), "squeeze-before-expansion")
    expanded = plan.hard_sharing(
        squeezed["backbone"], plan.cfg.reconcile.train.steps, "expand-after-squeeze"
    )
    return {"squeeze_expansion": expanded}


def single_task(plan: Plan) -> Rows:
    """Baselines: one backbone per source, trained on that source alone."""
    return {f"single_task:{name}": r for name, r in plan.expand_per_source().items()}


def no_ssl(plan: Plan) -> Rows:
    """X-Learner without the self-supervised tasks (nor the sources only they use)."""
    return {"no_ssl": xlearner(plan.derived(plan.cfg.without_ssl()))["xlearner"]}


def without(plan: Plan, name: str) -> Rows:
    """X-Learner with task or source ``name`` left out (did it help?)."""
    return {f"{WITHOUT}{name}": xlearner(plan.derived(plan.cfg.without(name)))["xlearner"]}


VARIANTS: dict[Variant, Callable[[Plan], Rows]] = {
    Variant.xlearner: xlearner,
    Variant.hard_sharing: hard_sharing,
    Variant.no_reconciliation: no_reconciliation,
    Variant.prune: prune,
    Variant.squeeze_expansion: squeeze_expansion,
    Variant.xlearner_pp: xlearner_pp,
    Variant.single_task: single_task,
    Variant.no_ssl: no_ssl,
    Variant.xlearner_r: xlearner_r,
    Variant.xlearner_t: xlearner_t,
}


def variant_rows(plan: Plan, variant: Variant | str) -> Rows:
    """The report rows of one variant (a :class:`Variant` or ``without:<task or source>``)."""
    if variant in VARIANTS:
        return VARIANTS[Variant(variant)](plan)
    return without(plan, variant.removeprefix(WITHOUT))


def seed_rows(plan: Plan) -> Rows:
    """Every variant's rows (and the random reference) for the plan's seed."""
    rows: Rows = {}
    for variant in dict.fromkeys([plan.cfg.variant, *plan.cfg.compare]):
        rows |= variant_rows(plan, variant)
    rows[RANDOM_ROW] = random_init(plan.cfg)
    return rows


def random_init(cfg: PipelineConfig) -> Result:
    """The reference row: a randomly initialised student backbone."""
    return {"backbone": f"{RANDOM_BACKBONE}{cfg.student_backbone}", "train_images": 0}


# the flow --------------------------------------------------------------------------------
@redacted_flow(
    name="xlearner-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True
)
def xlearner_pipeline(config: PipelineConfig, no_repair: bool = False) -> dict:
    """Ingest every source, expand one sub-backbone per task, reconcile, squeeze, transfer.

    ``no_repair``: a published output whose files no longer match their recorded sha256
    fails the run (naming them) instead of being re-run."""
    cfg, t0 = config, time.perf_counter()
    start_stage_interpreter(cfg)  # no-op if `run_pipeline` started it already
    if cfg.synth.enabled:
        synthesize_sources(cfg)
    config_uri = publish_config(cfg, absolute_store_uri(cfg.store.uri))
    with publish.parent_run(cfg, config_uri) as parent_run_id:
        plan = Plan.start(cfg, config_uri, parent_run_id, env=stage_env(cfg))
        plan.ctx.no_repair = no_repair
        publish.tag_source_versions(plan.ingest())
        publish.log_source_inputs(cfg, plan.manifests)
        rows_by_seed, transfers = train_and_transfer(plan)
        results = record_results(cfg, transfers)
        first = cfg.run_seeds[0]  # its backbone is the one registered
        registered = publish.publish_results(
            cfg, transfers[first], rows_by_seed[first], parent_run_id, t0, results=results
        )
    wall = time.perf_counter() - t0
    get_run_logger().info(f"pipeline done in {wall:.1f} s; stages ran: {plan.ctx.ran}")
    return {
        "report": transfers[first]["report"],
        "report_uri": transfers[first].get("out"),
        "reports": {seed: t["report"] for seed, t in transfers.items()},
        "results": results,
        "rows": rows_by_seed[first],
        "rows_by_seed": rows_by_seed,
        "mlflow_parent_run_id": parent_run_id,
        "registered": registered,
        "stages_ran": plan.ctx.ran,
        "stage_seconds": plan.ctx.stage_seconds,
        "wall_seconds": wall,
    }


def train_and_transfer(plan: Plan) -> tuple[dict[int, Rows], dict[int, Result]]:
    """Every variant and its transfer evaluation once per seed (after the ingests, which
    the seeds share): the rows and the transfer result of each seed."""
    rows_by_seed: dict[int, Rows] = {}
    transfers: dict[int, Result] = {}
    for seed in plan.cfg.run_seeds:
        seeded = plan.seeded(seed)
        rows_by_seed[seed] = seed_rows(seeded)
        transfers[seed] = seeded.transfer(rows_by_seed[seed])
    return rows_by_seed, transfers


def record_results(cfg: PipelineConfig, transfers: dict[int, Result]) -> dict:
    """The results over seeds (means, intervals, claims), and the store's pointer to the
    transfer outputs they came from (``xlearner report`` rebuilds the page from it)."""
    from xlearner.transfer.results import results_index, summarize

    results = summarize({seed: t["report"] for seed, t in transfers.items()}, publish.main_row(cfg))
    store = open_store(absolute_store_uri(cfg.store.uri), cfg.store.endpoint_url)
    store.write_json(
        results_latest(cfg.name),
        results_index(publish.main_row(cfg), {seed: t["out"] for seed, t in transfers.items()}),
    )
    return results


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


def stage_env(cfg: PipelineConfig) -> dict[str, str]:
    """Threads (and data-loading workers) per stage so parallel expansions share the cores
    instead of fighting over them."""
    parallel = min(4, len(cfg.task_types))
    env = {"PYTHONUNBUFFERED": "1", PARALLEL_STAGES_ENV: str(parallel)}  # engine.num_workers
    if cfg.runner.kind == "process" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(parallel, 1)))
    if cfg.tracking.uri is None:  # stages log where the pipeline logs
        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(cfg.tracking)
    return env | endpoint_environment(cfg.store.endpoint_url)  # the stages' open_store


def start_stage_interpreter(cfg: PipelineConfig) -> None:
    """Start the warm-start fork server (process runner): its imports then overlap Prefect's
    start-up and the work before the first stage, instead of delaying that stage."""
    if cfg.runner.kind == "process" and cfg.runner.warm_start:
        warm_start.start()


def run_pipeline(
    cfg: PipelineConfig, echo: Callable[[str], None] = print, no_repair: bool = False
) -> dict:
    """What ``xlearner run`` calls: runs the flow (ephemeral Prefect if no server is set)."""
    from xlearner.transfer.report import format_table
    from xlearner.transfer.results import results_markdown

    start_stage_interpreter(cfg)
    result = xlearner_pipeline(config=cfg, no_repair=no_repair)
    if len(cfg.run_seeds) == 1:
        echo("\n" + format_table(result["report"]))
    else:
        echo("\n" + results_markdown(result["results"]))
    echo(f"\nreport: {result['report_uri']}")
    uri = tracking.tracking_uri(cfg.tracking)
    if uri.startswith("http"):
        echo(f"MLflow UI: {uri}")
    else:
        echo(f"MLflow UI: mlflow ui --backend-store-uri {uri}")
    return result
