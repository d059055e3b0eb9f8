"""Reconciliation: join the trained sub-backbones with gamma layers, train them jointly.

``reconcile.mode`` selects full reconciliation, same-level only (ablation) or none (the
sub-backbones trained on side by side: "X-Learner w/o reconciliation"). The squeeze
stage builds the same model with mode ``none`` to distil straight from the sub-backbones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from xlearner.config import PipelineConfig
from xlearner.loaders import Stream
from xlearner.models.gamma_cost import GammaCost, check_gamma_budget, estimate_gamma_cost
from xlearner.models.multitask import (
    MultiTaskModel,
    build_model,
    load_model,
    reconciled_trunk_spec,
)
from xlearner.outputs import fetch_dir
from xlearner.streams import TrainingInputError, TrainingJob, load_streams, stream_specs

RUN_NAME = "reconcile"

log = logging.getLogger("xlearner.reconcile")


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
            architectures,
            mode,
            cfg.reconcile.detach_other_tasks,
            cfg.reconcile.receive_stages,
            gamma=cfg.reconcile.gamma,
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
    """The expand stage's models by task, from local folders."""
    models = {}
    for task, path in paths.items():
        model = load_model(path)
        if model.spec["trunk"]["kind"] != "backbone":
            raise TrainingInputError(f"--sub-model {task}={path}: not a single sub-backbone model")
        models[task] = model
    return models


def fetch_sub_models(uris: dict[str, str]) -> dict[str, MultiTaskModel]:
    """The expand stage's models by task, from their published URIs."""
    return load_sub_models({task: fetch_dir(uri) for task, uri in uris.items()})


def priced_gammas(cfg: PipelineConfig, sub_models: dict[str, MultiTaskModel]) -> GammaCost:
    """The gammas' parameters and FLOPs against the sub-backbones', logged, and checked
    against ``reconcile.max_gamma_ratio`` before anything is built or trained."""
    cost = estimate_gamma_cost(
        {task: model.trunk for task, model in sub_models.items()},
        cfg.model.image_size,
        gamma=cfg.reconcile.gamma,
        mode=cfg.reconcile.mode,
        receive_stages=cfg.reconcile.receive_stages,
    )
    log.info(cost.summary())
    check_gamma_budget(cost, cfg.reconcile)
    return cost


def reconcile_job(
    cfg: PipelineConfig, sub_models: dict[str, str], manifests: dict[str, str]
) -> TrainingJob:
    """The reconcile stage's training: the sub-models (TASK -> URI) joined, on every source."""
    streams = load_streams(cfg, manifests)
    subs = fetch_sub_models(sub_models)
    cost = priced_gammas(cfg, subs)
    model = build_reconciled_model(cfg, streams, subs, cfg.reconcile.mode)
    return TrainingJob(
        cfg=cfg,
        name=RUN_NAME,
        model=model,
        streams=streams,
        train_cfg=cfg.reconcile.train,
        params={"stage": RUN_NAME, "reconcile": cfg.reconcile.model_dump()},
        extra={"mode": cfg.reconcile.mode, "gammas": cost.metrics()},
        start_metrics={f"reconcile/{k}": v for k, v in cost.metrics().items()},
    )
