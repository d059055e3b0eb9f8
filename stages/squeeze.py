"""Squeeze stage: condense the expanded model into one backbone of normal size.

``squeeze.method: distill`` (default) trains a student with the FitNet loss against
every task's reconciled features; ``prune`` prunes the expanded trunk down to the size of
one student and fine-tunes it. ``--sub-model`` instead of ``--teacher`` distils straight
from the sub-backbones (no reconciliation: the Squeeze-Expansion variant's first step);
``--hint`` adds single-task single-source backbones as extra teachers (X-Learner++).
"""

from __future__ import annotations

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
from xlearner.models.backbones import count_parameters, create_backbone, load_backbone
from xlearner.models.multitask import load_model
from xlearner.squeeze import distill, prune, save_pruned_backbone
from xlearner.train import build_reconciled_model, count_images, load_streams, load_sub_models


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("squeeze", __doc__)
    parser.add_argument(
        "--teacher", default=None, metavar="URI", help="the expanded model (reconcile's output)"
    )
    parser.add_argument("--sub-model", action="append", default=[], metavar="TASK=URI")
    parser.add_argument(
        "--hint", action="append", default=[], metavar="NAME=URI", help="extra hint backbone"
    )
    parser.add_argument("--manifest", action="append", default=[], metavar="SOURCE=URI")
    parser.add_argument("--out", required=True, metavar="URI")
    args = parser.parse_args(argv)

    def body() -> dict:
        cfg = load_config_uri(args.config, args.overrides)
        if bool(args.teacher) == bool(args.sub_model):
            raise ValueError(
                "give either --teacher (the expanded model) or --sub-model TASK=URI, "
                "not both/neither"
            )
        out = StageOutput(args.out)
        if done := already_done(out, "squeeze"):
            return done
        streams = load_streams(cfg, parse_pairs(args.manifest, "--manifest"))
        if args.teacher:
            teacher = load_model(fetch_dir(args.teacher))
        else:
            paths = {
                task: fetch_dir(uri)
                for task, uri in parse_pairs(args.sub_model, "--sub-model").items()
            }
            teacher = build_reconciled_model(cfg, streams, load_sub_models(paths), "none")
        hints = {
            name: load_backbone(fetch_dir(uri))
            for name, uri in parse_pairs(args.hint, "--hint").items()
        }
        method = cfg.squeeze.method
        name = f"squeeze-{method}"
        common = dict(seed=cfg.seed, checkpointer=out.checkpointer(), name=name)
        with tracking.stage_run(cfg.tracking, args.mlflow_parent_run_id, name) as tracker:
            tracker.log_params(
                {
                    "stage": name,
                    "squeeze": cfg.squeeze.model_dump(),
                    "student": cfg.student_backbone,
                }
            )
            common["on_metrics"] = tracker.log_metrics
            if method == "distill":
                backbone, report = distill(
                    teacher,
                    cfg.student_backbone,
                    streams,
                    cfg.squeeze,
                    cfg.engine,
                    hints=hints,
                    **common,
                )
            else:
                target = count_parameters(create_backbone(cfg.student_backbone))
                backbone, report = prune(
                    teacher, target, streams, cfg.squeeze, cfg.engine, **common
                )
            tracker.log_metrics(
                {k: float(v) for k, v in report.items() if isinstance(v, int | float)}
            )
            extra = {"method": method, "train_images": count_images(streams), "squeeze": report}
            if method == "distill":
                return publish_trained(
                    out, cfg, None, report.get("val", {}), extra, backbone=backbone
                )
            spec = save_pruned_backbone(backbone, out.work / "backbone")
            extra |= {
                "backbone": out.publish_dir(out.work / "backbone"),
                "parameters": spec["num_parameters"],
            }
            return publish_trained(out, cfg, None, report.get("val", {}), extra)

    return run_stage("squeeze", body)


if __name__ == "__main__":
    sys.exit(main())
