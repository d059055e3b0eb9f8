"""Expansion, reconciliation and hard-sharing training: what the training stages call.

Each function builds its model and streams from the config and the ingested source
manifests, trains with the one engine and returns the trained model with its
validation metrics. Publishing is the stage's job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from xlearner.config import HeadsConfig, PipelineConfig, TaskType, TrainConfig
from xlearner.data.shards import ShardDataset, collate_fn
from xlearner.engine import Checkpointer, MetricsCallback, Stream, Trainer, evaluate
from xlearner.models.backbones import load_backbone
from xlearner.models.multitask import (
    MultiTaskModel,
    backbone_trunk_spec,
    build_model,
    load_model,
    reconciled_trunk_spec,
    stream_name,
)

log = logging.getLogger("xlearner.train")


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


def fit(
    model: MultiTaskModel,
    streams: list[Stream],
    train_cfg: TrainConfig,
    cfg: PipelineConfig,
    *,
    name: str,
    checkpointer: Checkpointer | None,
    on_metrics: MetricsCallback | None,
) -> tuple[dict[str, dict[str, float]], int]:
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


def init_trunk_from_backbone(model: MultiTaskModel, backbone_path: str | Path) -> None:
    """Start a single-trunk model from a published backbone (Squeeze-Expansion)."""
    source = load_backbone(backbone_path)
    model.trunk.load_state_dict(source.state_dict())


def build_single_trunk_model(
    cfg: PipelineConfig, streams: list[Stream], architecture: str | None = None
) -> MultiTaskModel:
    torch.manual_seed(cfg.seed)
    return build_model(
        {
            "trunk": backbone_trunk_spec(architecture or cfg.model.backbone),
            "streams": stream_specs(streams, cfg.heads),
            "image_size": cfg.model.image_size,
        }
    )


def build_reconciled_model(
    cfg: PipelineConfig, streams: list[Stream], sub_models: dict[str, MultiTaskModel], mode: str
) -> MultiTaskModel:
    """The expanded model: every task's trained sub-backbone and heads, joined by gammas."""
    missing = sorted({s.task for s in streams} - set(sub_models))
    if missing:
        raise TrainingInputError(
            f"no trained sub-backbone for tasks {missing}; pass --sub-model TASK=<uri>"
        )
    architectures = {task: m.spec["trunk"]["architecture"] for task, m in sub_models.items()}
    torch.manual_seed(cfg.seed)
    spec = {
        "trunk": reconciled_trunk_spec(
            architectures, mode, cfg.reconcile.detach_other_tasks, cfg.reconcile.receive_stages
        ),
        "streams": stream_specs(streams, cfg.heads),
        "image_size": cfg.model.image_size,
    }
    model = build_model(spec)
    for task, sub in sub_models.items():
        model.trunk.sub_backbones[task].load_state_dict(sub.trunk.state_dict())
        for stream, head in sub.heads.items():
            if stream in model.heads:
                model.heads[stream].load_state_dict(head.state_dict())
    return model


def load_sub_models(paths: dict[str, str | Path]) -> dict[str, MultiTaskModel]:
    models = {}
    for task, path in paths.items():
        model = load_model(path)
        if model.spec["trunk"]["kind"] != "backbone":
            raise TrainingInputError(f"--sub-model {task}={path}: not a single sub-backbone model")
        models[task] = model
    return models
