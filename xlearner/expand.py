"""Expansion: train one task's sub-backbone with its heads on every source of the task.

The task ``all`` (:data:`~xlearner.contract.HARD_SHARING_TASK`) trains the hard-sharing
baseline instead: one backbone, every head, every source, with as many training images as
expansion and reconciliation together (:func:`hard_sharing_budget`). A trunk can start
from a published backbone (Squeeze-Expansion: :func:`init_trunk_from_backbone`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from xlearner.config import PipelineConfig, TrainConfig
from xlearner.contract import HARD_SHARING_TASK
from xlearner.loaders import Stream
from xlearner.models.loading import load_backbone
from xlearner.models.multitask import MultiTaskModel, backbone_trunk_spec, build_model
from xlearner.models.pretrained import init_from_pretrained
from xlearner.outputs import fetch_dir
from xlearner.streams import TrainingJob, load_streams, stream_specs
from xlearner.tasks import TaskType

HARD_SHARING_NAME = "hard_sharing"


def hard_sharing_budget(cfg: PipelineConfig) -> TrainConfig:
    """Hard sharing sees as many training images as expansion + reconciliation together.

    A step draws one batch from every stream (a source feeding a task), so a step of
    expand-<task> costs ``batch x streams of the task`` images, one of hard sharing
    ``batch x all streams``; hard sharing trains with the reconcile hyper-parameters.
    """
    streams = {t: sum(t in s.resolved_tasks for s in cfg.sources) for t in cfg.task_types}
    joint = cfg.reconcile.train
    images = sum(cfg.train_config(t).steps * cfg.train_config(t).batch_size * n
                 for t, n in streams.items())  # fmt: skip
    images += joint.steps * joint.batch_size * sum(streams.values())
    return joint.model_copy(
        update={"steps": math.ceil(images / (joint.batch_size * sum(streams.values())))}
    )


def resolve_tasks(cfg: PipelineConfig, task: str) -> tuple[list[TaskType], TrainConfig, str]:
    """The tasks a ``--task`` value trains, their budget and the run's name."""
    if task == HARD_SHARING_TASK:
        return cfg.task_types, hard_sharing_budget(cfg), HARD_SHARING_NAME
    try:
        resolved = TaskType(task)
    except ValueError:
        raise ValueError(
            f"--task {task!r}: unknown; tasks: {[t.value for t in TaskType]}"
        ) from None
    if resolved not in cfg.task_types:
        raise ValueError(
            f"--task {resolved.value}: no source feeds it; "
            f"fed tasks: {[t.value for t in cfg.task_types]}"
        )
    return [resolved], cfg.train_config(resolved), f"expand-{resolved.value}"


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


def init_trunk_from_backbone(model: MultiTaskModel, backbone_path: str | Path) -> None:
    """Start a single-trunk model from a published backbone (Squeeze-Expansion)."""
    source = load_backbone(backbone_path)
    model.trunk.load_state_dict(source.state_dict())


def expand_job(
    cfg: PipelineConfig,
    task: str,
    manifests: dict[str, str],
    *,
    source: str | None = None,
    steps: int | None = None,
    init_backbone: str | None = None,
) -> TrainingJob:
    """The expand stage's training: ``task``'s (or every task's, for hard sharing) model.

    ``source``: train on this source only (single-task baselines); ``steps``: override
    the optimiser steps; ``init_backbone``: the URI of a published backbone to start from.
    """
    tasks, train_cfg, name = resolve_tasks(cfg, task)
    if steps:
        train_cfg = train_cfg.model_copy(update={"steps": steps})
    streams = load_streams(cfg, manifests, tasks, only_source=source)
    model = build_single_trunk_model(cfg, streams)
    path = cfg.pretrained_path_for(None if task == HARD_SHARING_TASK else tasks[0])
    pretrained = {}
    if init_backbone:
        init_trunk_from_backbone(model, fetch_dir(init_backbone))
    elif path:
        pretrained = init_from_pretrained(model.trunk, path).params()
    return TrainingJob(
        cfg=cfg,
        name=name,
        model=model,
        streams=streams,
        train_cfg=train_cfg,
        params={
            "stage": name,
            "train": train_cfg.model_dump(),
            "backbone": cfg.model.backbone,
            **pretrained,
        },
        extra={"task": task, **pretrained},
        publish_backbone=True,
    )
