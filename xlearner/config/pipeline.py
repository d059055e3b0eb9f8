"""The whole pipeline: :class:`PipelineConfig`, its sections and what is derived from them."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator

from xlearner.config.base import NAME_PATTERN, StrictModel
from xlearner.config.data import DownstreamConfig, IngestConfig, SourceConfig, SynthConfig
from xlearner.config.infra import RunnerConfig, StoreConfig, TrackingConfig
from xlearner.config.methods import ReconcileConfig, SqueezeConfig, TransferConfig
from xlearner.config.model import HeadsConfig, ModelConfig
from xlearner.config.training import EngineConfig, TaskTrainConfig
from xlearner.tasks import SELF_SUPERVISED, TaskType


class Variant(StrEnum):
    """The paper's comparisons (METHOD.md): what the pipeline trains and squeezes."""

    xlearner = "xlearner"
    hard_sharing = "hard_sharing"
    no_reconciliation = "no_reconciliation"
    squeeze_expansion = "squeeze_expansion"
    xlearner_pp = "xlearner_pp"
    prune = "prune"
    single_task = "single_task"
    no_ssl = "no_ssl"  # X-Learner with the self-supervised tasks left out


class PipelineConfig(StrictModel):
    name: str = Field(default="xlearner", pattern=NAME_PATTERN)
    seed: int = 0
    variant: Variant = Variant.xlearner
    compare: list[Variant] = Field(
        default_factory=list,
        description="Extra variants trained and evaluated beside `variant` for the report.",
    )
    sources: list[SourceConfig]
    downstream: list[DownstreamConfig] = Field(default_factory=list)
    model: ModelConfig = ModelConfig()
    heads: HeadsConfig = HeadsConfig()
    tasks: dict[TaskType, TaskTrainConfig] = Field(
        default_factory=dict,
        description="Per-task hyper-parameters (and pretrained_path) of the expansion stage.",
    )
    reconcile: ReconcileConfig = ReconcileConfig()
    squeeze: SqueezeConfig = SqueezeConfig()
    transfer: TransferConfig = TransferConfig()
    engine: EngineConfig = EngineConfig()
    ingest: IngestConfig = IngestConfig()
    store: StoreConfig = StoreConfig()
    tracking: TrackingConfig = TrackingConfig()
    runner: RunnerConfig = RunnerConfig()
    synth: SynthConfig = SynthConfig()

    @model_validator(mode="after")
    def _check_pipeline(self) -> PipelineConfig:
        if not self.sources:
            raise ValueError("sources: at least one source is needed")
        names = [s.name for s in self.sources] + [d.name for d in self.downstream]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique across sources and downstream: {dupes}")
        fed = set(self.task_types)
        orphan = sorted(t.value for t in self.tasks if t not in fed)
        if orphan:
            raise ValueError(
                f"tasks: {orphan} have hyper-parameters but no source feeds them; "
                f"tasks fed by the sources: {sorted(t.value for t in fed)}"
            )
        unweighed = sorted(t.value for t in self.squeeze.target_weights if t not in fed)
        if unweighed:
            raise ValueError(
                f"squeeze.target_weights: {unweighed} are not tasks of this pipeline; "
                f"tasks fed by the sources: {sorted(t.value for t in fed)}"
            )
        ssl_variants = [v for v in (self.variant, *self.compare) if v == Variant.no_ssl]
        if ssl_variants and not fed & SELF_SUPERVISED:
            raise ValueError(
                "variant no_ssl compares X-Learner with and without the self-supervised tasks, "
                "but no source feeds mim or contrastive; add an unlabeled source or "
                "`tasks: [<label task>, contrastive]` to a source"
            )
        if ssl_variants and not set(self.without_ssl().task_types):
            raise ValueError("variant no_ssl: every source feeds only self-supervised tasks")
        return self

    def without_ssl(self) -> PipelineConfig:
        """This config minus the self-supervised tasks (and the sources that fed only them)."""

        def supervised(per_task: dict[TaskType, Any]) -> dict[TaskType, Any]:
            return {t: v for t, v in per_task.items() if t not in SELF_SUPERVISED}

        sources = []
        for source in self.sources:
            tasks = [t for t in source.resolved_tasks if t not in SELF_SUPERVISED]
            if tasks:
                sources.append(source.model_copy(update={"tasks": tasks}))
        weights = supervised(self.squeeze.target_weights)
        return self.model_copy(
            update={
                "sources": sources,
                "tasks": supervised(self.tasks),
                "squeeze": self.squeeze.model_copy(update={"target_weights": weights}),
                "variant": Variant.xlearner,
                "compare": [],
            }
        )

    @property
    def task_types(self) -> list[TaskType]:
        """Tasks fed by the sources, in a stable order: one sub-backbone each."""
        seen: list[TaskType] = []
        for source in self.sources:
            for task in source.resolved_tasks:
                if task not in seen:
                    seen.append(task)
        return sorted(seen, key=list(TaskType).index)

    def sources_for(self, task: TaskType) -> list[SourceConfig]:
        return [s for s in self.sources if task in s.resolved_tasks]

    def train_config(self, task: TaskType) -> TaskTrainConfig:
        return self.tasks.get(task, TaskTrainConfig())

    def pretrained_path_for(self, task: TaskType | None) -> str | None:
        """The file task ``task``'s sub-backbone starts from (None: random init); for
        ``task=None`` (the hard-sharing trunk, which trains every task) the model's file."""
        override = self.train_config(task).pretrained_path if task is not None else None
        return override or self.model.pretrained_path

    @property
    def student_backbone(self) -> str:
        return self.squeeze.student or self.model.backbone
