"""Expand stage: train one task's sub-backbone with its heads on all sources of the task.

``--task all`` trains the hard-sharing baseline (one backbone, every head, every source);
``--init-backbone`` starts the trunk from a published backbone (Squeeze-Expansion).
"""

from __future__ import annotations

import math
import sys

from stages.common import (
    StageOutput,
    already_done,
    base_parser,
    fetch_dir,
    load_config_uri,
    parse_pairs,
    publish_trained,
    run_stage,
)
from xlearner import tracking
from xlearner.config import TaskType, TrainConfig
from xlearner.train import (
    build_single_trunk_model,
    count_images,
    fit,
    init_trunk_from_backbone,
    load_streams,
)

ALL_TASKS = "all"


def hard_sharing_budget(cfg) -> TrainConfig:
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


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("expand", __doc__)
    parser.add_argument(
        "--task", required=True, help=f"task type, or {ALL_TASKS!r} for hard sharing"
    )
    parser.add_argument("--manifest", action="append", default=[], metavar="SOURCE=URI")
    parser.add_argument("--init-backbone", default=None, metavar="URI")
    parser.add_argument(
        "--source", default=None, help="train on this source only (single-task baselines)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="override the number of optimiser steps"
    )
    parser.add_argument("--out", required=True, metavar="URI")
    args = parser.parse_args(argv)

    def body() -> dict:
        cfg = load_config_uri(args.config, args.overrides)
        out = StageOutput(args.out)
        if done := already_done(out, "expand"):
            return done
        if args.task == ALL_TASKS:
            tasks, train_cfg, name = cfg.task_types, hard_sharing_budget(cfg), "hard_sharing"
        else:
            try:
                task = TaskType(args.task)
            except ValueError:
                raise ValueError(
                    f"--task {args.task!r}: unknown; tasks: {[t.value for t in TaskType]}"
                ) from None
            if task not in cfg.task_types:
                raise ValueError(
                    f"--task {task.value}: no source feeds it; "
                    f"fed tasks: {[t.value for t in cfg.task_types]}"
                )
            tasks, train_cfg, name = [task], cfg.train_config(task), f"expand-{task.value}"
        if args.steps:
            train_cfg = train_cfg.model_copy(update={"steps": args.steps})
        streams = load_streams(
            cfg, parse_pairs(args.manifest, "--manifest"), tasks, only_source=args.source
        )
        model = build_single_trunk_model(cfg, streams)
        if args.init_backbone:
            init_trunk_from_backbone(model, fetch_dir(args.init_backbone))
        with tracking.stage_run(cfg.tracking, args.mlflow_parent_run_id, name) as tracker:
            tracker.log_params(
                {"stage": name, "train": train_cfg.model_dump(), "backbone": cfg.model.backbone}
            )
            metrics, start = fit(
                model,
                streams,
                train_cfg,
                cfg,
                name=name,
                checkpointer=out.checkpointer(),
                on_metrics=tracker.log_metrics,
            )
            tracker.log_metrics(tracking.flatten_metrics(metrics, "val"))
            extra = {
                "task": args.task,
                "train_images": count_images(streams),
                "resumed_from_step": start,
            }
            return publish_trained(out, cfg, model, metrics, extra, backbone=model.trunk)

    return run_stage("expand", body)


if __name__ == "__main__":
    sys.exit(main())
