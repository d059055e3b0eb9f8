"""Reconcile stage: join the trained sub-backbones with reconciliation layers, train jointly.

``reconcile.mode`` selects full reconciliation, same-level only (ablation) or none
(the sub-backbones trained on, side by side: "X-Learner w/o reconciliation").
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
from xlearner.train import build_reconciled_model, count_images, fit, load_streams, load_sub_models


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("reconcile", __doc__)
    parser.add_argument("--sub-model", action="append", default=[], metavar="TASK=URI")
    parser.add_argument("--manifest", action="append", default=[], metavar="SOURCE=URI")
    parser.add_argument("--out", required=True, metavar="URI")
    args = parser.parse_args(argv)

    def body() -> dict:
        cfg = load_config_uri(args.config, args.overrides)
        out = StageOutput(args.out)
        if done := already_done(out, "reconcile"):
            return done
        streams = load_streams(cfg, parse_pairs(args.manifest, "--manifest"))
        paths = {
            task: fetch_dir(uri) for task, uri in parse_pairs(args.sub_model, "--sub-model").items()
        }
        model = build_reconciled_model(cfg, streams, load_sub_models(paths), cfg.reconcile.mode)
        with tracking.stage_run(cfg.tracking, args.mlflow_parent_run_id, "reconcile") as tracker:
            tracker.log_params({"stage": "reconcile", "reconcile": cfg.reconcile.model_dump()})
            tracker.log_metrics({"gamma_parameters": float(model.trunk.num_gamma_parameters())})
            metrics, start = fit(
                model,
                streams,
                cfg.reconcile.train,
                cfg,
                name="reconcile",
                checkpointer=out.checkpointer(),
                on_metrics=tracker.log_metrics,
            )
            tracker.log_metrics(tracking.flatten_metrics(metrics, "val"))
            extra = {
                "train_images": count_images(streams),
                "resumed_from_step": start,
                "mode": cfg.reconcile.mode,
            }
            return publish_trained(out, cfg, model, metrics, extra)

    return run_stage("reconcile", body)


if __name__ == "__main__":
    sys.exit(main())
