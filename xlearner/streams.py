"""What the training steps share: the streams of the ingested sources, one training job.

A *stream* is one (source, task) pair: a source feeding two tasks gives two streams. A
:class:`TrainingJob` is a model with its streams and budget, made before the stage's
tracking run starts; :meth:`TrainingJob.run` trains it with the one engine, evaluates it
and returns what to publish (:class:`Trained`). Publishing is :mod:`xlearner.outputs`'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from xlearner import tracking
from xlearner.checkpoint import Checkpointer
from xlearner.config import HeadsConfig, PipelineConfig, TrainConfig
from xlearner.data.shards import ShardDataset, collate_fn
from xlearner.engine import MetricsCallback, Trainer, evaluate
from xlearner.loaders import Stream
from xlearner.models.multitask import MultiTaskModel, stream_name
from xlearner.tasks import TaskType

log = logging.getLogger("xlearner.streams")


class TrainingInputError(ValueError):
    """A training stage's inputs do not fit its config."""


def load_streams(
    cfg: PipelineConfig,
    manifests: dict[str, str],
    tasks: list[TaskType] | None = None,
    only_source: str | None = None,
) -> list[Stream]:
    """One stream per (source, task) for the given tasks (all of the config's when None)."""
    wanted = tasks or cfg.task_types
    if only_source and only_source not in {s.name for s in cfg.sources}:
        raise TrainingInputError(f"--source {only_source!r}: not a source of the config")
    streams = []
    for source in cfg.sources:
        if only_source and source.name != only_source:
            continue
        for task in source.resolved_tasks:
            if task not in wanted:
                continue
            if source.name not in manifests:
                raise TrainingInputError(
                    f"source {source.name!r} feeds task {task.value!r} "
                    "but no manifest was given for it; "
                    f"pass --manifest {source.name}=<manifest uri> (got: {sorted(manifests)})"
                )
            uri = manifests[source.name]
            streams.append(
                Stream(
                    name=stream_name(source.name, task.value),
                    task=task.value,
                    train=ShardDataset(uri, "train", cfg.model.image_size, train=True),
                    val=ShardDataset(uri, "val", cfg.model.image_size),
                    collate=collate_fn(source.format.value),
                    weight=source.loss_weight,
                )
            )
    if not streams:
        raise TrainingInputError(
            f"no source feeds the tasks {[t.value for t in wanted]}; check `sources` in the config"
        )
    return streams


def stream_specs(streams: list[Stream], heads: HeadsConfig) -> dict[str, dict]:
    """The model spec's streams: task, classes and head options (saved with the model)."""
    specs = {}
    for s in streams:
        specs[s.name] = {"task": s.task, "num_classes": getattr(s.train, "num_classes", 0)}
        if options := heads.options(s.task):
            specs[s.name]["options"] = options
    return specs


def count_images(streams: list[Stream]) -> int:
    """Training images used: each source counted once, however many tasks it feeds."""
    sizes = {s.name.split(":")[0]: s.size for s in streams}
    return sum(sizes.values())


def fit_and_evaluate(
    model: MultiTaskModel,
    streams: list[Stream],
    train_cfg: TrainConfig,
    cfg: PipelineConfig,
    *,
    name: str,
    checkpointer: Checkpointer | None,
    on_metrics: MetricsCallback | None,
) -> tuple[dict[str, dict[str, float]], int]:
    """Train (resuming from ``checkpointer``), then evaluate on every stream's val split.

    Returns the validation metrics per stream and the step training resumed from.
    """
    trainer = Trainer(
        model,
        streams,
        train_cfg,
        cfg.engine,
        seed=cfg.seed,
        name=name,
        checkpointer=checkpointer,
        on_metrics=on_metrics,
    )
    start_step = trainer.fit()
    metrics = evaluate(trainer.model, streams, cfg.engine)
    for stream, values in metrics.items():
        log.info(f"[{name}] val {stream}: " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))
    return metrics, start_step


@dataclass
class Trained:
    """What a training step hands to :func:`xlearner.outputs.publish_trained`."""

    metrics: dict[str, Any]  # validation metrics (also ``metrics.json``)
    extra: dict[str, Any]  # further fields of the stage result
    model: MultiTaskModel | None = None  # published as ``model/``
    backbone: nn.Module | None = None  # published as ``backbone/``
    # how the backbone is saved into a folder (returns its spec); None: save_backbone
    save_backbone: Callable[[nn.Module, Path], dict[str, Any]] | None = None


@dataclass
class TrainingJob:
    """A multi-task model ready to train: its streams, budget and what the run logs."""

    cfg: PipelineConfig
    name: str  # the tracking run's and the engine's name
    model: MultiTaskModel
    streams: list[Stream]
    train_cfg: TrainConfig
    params: dict[str, Any]  # logged as the tracking run's parameters
    extra: dict[str, Any] = field(default_factory=dict)  # further result fields
    start_metrics: dict[str, float] = field(default_factory=dict)  # logged before training
    publish_backbone: bool = False  # publish the trunk as the single backbone too

    def run(self, checkpointer: Checkpointer | None, tracker: tracking.StageTracker) -> Trained:
        tracker.log_params(self.params)
        if self.start_metrics:
            tracker.log_metrics(self.start_metrics)
        metrics, start = fit_and_evaluate(
            self.model,
            self.streams,
            self.train_cfg,
            self.cfg,
            name=self.name,
            checkpointer=checkpointer,
            on_metrics=tracker.log_metrics,
        )
        tracker.log_metrics(tracking.flatten_metrics(metrics, "val"))
        extra = {
            **self.extra,
            "train_images": count_images(self.streams),
            "resumed_from_step": start,
        }
        backbone = self.model.trunk if self.publish_backbone else None
        return Trained(metrics, extra, model=self.model, backbone=backbone)
