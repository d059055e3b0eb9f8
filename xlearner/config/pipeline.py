"""The whole pipeline: :class:`PipelineConfig`, its sections and what is derived from them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from xlearner.config.base import NAME_PATTERN, StrictModel
from xlearner.config.data import (
    DownstreamConfig,
    IngestConfig,
    SourceConfig,
    SynthConfig,
    check_held_out,
)
from xlearner.config.infra import ResourcesConfig, RunnerConfig, StoreConfig, TrackingConfig
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
    xlearner_r = "xlearner_r"  # half-width sub-backbones (HalfResNet-50), the same student
    xlearner_t = "xlearner_t"  # reconciliation receiving the same level only


WITHOUT = "without:"  # compare entry `without:<task or source>`: X-Learner with it left out
CompareEntry = Annotated[Variant | str, Field(union_mode="left_to_right")]


class PipelineConfig(StrictModel):
    name: str = Field(default="xlearner", pattern=NAME_PATTERN)
    seed: int = 0
    seeds: list[int] | None = Field(
        default=None,
        description="Train and evaluate every variant once per seed (one store; ingest is "
        "shared): the report gives means, 95% intervals and the claims table. "
        "None: once, with `seed`.",
    )
    variant: Variant = Variant.xlearner
    compare: list[CompareEntry] = Field(
        default_factory=list,
        description="Extra variants trained and evaluated beside `variant` for the report: "
        f"{', '.join(v.value for v in Variant)}, or `{WITHOUT}<task or source>` "
        "(X-Learner with that task or source left out).",
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
    resources: ResourcesConfig = ResourcesConfig()
    synth: SynthConfig = SynthConfig()

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and not seeds:
            raise ValueError(
                "an empty list runs nothing; give at least one seed, e.g. `seeds: [0, 1, 2]`, "
                "or leave `seeds` out to run once with `seed`"
            )
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct; got {seeds}")
        return seeds

    @field_validator("compare", mode="before")
    @classmethod
    def _known_entries(cls, entries: Any) -> Any:
        if not isinstance(entries, list):
            return entries
        choices = [v.value for v in Variant]
        for entry in entries:
            if isinstance(entry, str) and entry not in choices and not entry.startswith(WITHOUT):
                raise ValueError(
                    f"unknown variant {entry!r}; choose from {choices} "
                    f"or `{WITHOUT}<task or source>`"
                )
        return entries

    @model_validator(mode="after")
    def _check_pipeline(self) -> PipelineConfig:
        if not self.sources:
            raise ValueError("sources: at least one source is needed")
        names = [s.name for s in self.sources] + [d.name for d in self.downstream]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique across sources and downstream: {dupes}")
        check_held_out(self.sources, self.downstream)
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
        taken = sorted({h.name for h in self.squeeze.hints} & {s.name for s in self.sources})
        if taken:
            raise ValueError(
                f"squeeze.hints: {taken} are source names (xlearner_pp names its single-source "
                "experts after their sources); rename the hints"
            )
        for entry in self.compare:
            if isinstance(entry, str) and entry.startswith(WITHOUT):
                self.without(entry.removeprefix(WITHOUT))  # raises naming the fix
        multi_node = [
            n for n in ResourcesConfig.model_fields if self.resources.for_stage(n).nodes > 1
        ]
        if multi_node and self.runner.kind != "ray":
            nodes = self.resources.for_stage(multi_node[0]).nodes
            raise ValueError(
                f"resources.{multi_node[0]}.nodes={nodes}: runner.kind {self.runner.kind!r} "
                "runs on one host; set nodes: 1 or runner.kind: ray"
            )
        return self

    @property
    def run_seeds(self) -> list[int]:
        """The seeds a run trains with: ``seeds``, else ``[seed]``."""
        return list(self.seeds) if self.seeds is not None else [self.seed]

    def with_seed(self, seed: int) -> PipelineConfig:
        """This config for one seed of a multi-seed run."""
        return self.model_copy(update={"seed": seed, "seeds": None})

    def without(self, name: str) -> PipelineConfig:
        """This config (as plain X-Learner) with task or source ``name`` left out: a task
        leaves every source's task list (a source left with none is dropped), a source
        leaves the sources. Raises ``ValueError`` (naming the compare entry and the fix)
        for an unknown name or one whose removal would leave a task without a source."""
        entry = f"compare entry {WITHOUT}{name}"
        tasks = {t.value for t in self.task_types}
        sources = {s.name for s in self.sources}
        if name in tasks and name in sources:
            raise ValueError(f"{entry}: {name!r} is both a task and a source; rename the source")
        if name not in tasks | sources:
            raise ValueError(
                f"{entry}: {name!r} is neither a task nor a source of this pipeline; "
                f"tasks: {sorted(tasks)}, sources: {sorted(sources)}"
            )
        if name in sources:
            kept = [s for s in self.sources if s.name != name]
            fed = {t for s in kept for t in s.resolved_tasks}
            orphans = sorted(t.value for t in self.task_types if t not in fed)
            if orphans:
                raise ValueError(
                    f"{entry}: {name!r} is the only source of task(s) {orphans}; "
                    f"use `{WITHOUT}<task>` to leave the task out"
                )
            return self._restricted(kept, set(self.task_types))
        kept_tasks = set(self.task_types) - {TaskType(name)}
        if not kept_tasks:
            raise ValueError(f"{entry}: {name!r} is the only task; nothing would be left")
        kept = []
        for source in self.sources:
            remaining = [t for t in source.resolved_tasks if t in kept_tasks]
            if remaining:
                kept.append(source.model_copy(update={"tasks": remaining}))
        return self._restricted(kept, kept_tasks)

    def _restricted(self, sources: list[SourceConfig], tasks: set[TaskType]) -> PipelineConfig:
        """This config as plain X-Learner over ``sources``, keeping the options of ``tasks``."""
        weights = {t: w for t, w in self.squeeze.target_weights.items() if t in tasks}
        return self.model_copy(
            update={
                "sources": sources,
                "tasks": {t: v for t, v in self.tasks.items() if t in tasks},
                "squeeze": self.squeeze.model_copy(update={"target_weights": weights}),
                "variant": Variant.xlearner,
                "compare": [],
            }
        )

    def without_ssl(self) -> PipelineConfig:
        """This config minus the self-supervised tasks (and the sources that fed only them)."""
        sources = []
        for source in self.sources:
            tasks = [t for t in source.resolved_tasks if t not in SELF_SUPERVISED]
            if tasks:
                sources.append(source.model_copy(update={"tasks": tasks}))
        return self._restricted(sources, set(self.task_types) - SELF_SUPERVISED)

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
