"""Reconcile stage: join the trained sub-backbones with reconciliation layers, train jointly.

``reconcile.mode`` selects full reconciliation, same-level only (ablation) or none
(the sub-backbones trained on, side by side: "X-Learner w/o reconciliation").
"""

from __future__ import annotations

import sys

from stages.main import stage_main
from xlearner import tracking
from xlearner.config import PipelineConfig
from xlearner.contract import ReconcileCall, StageResult
from xlearner.outputs import StageOutput, publish_trained
from xlearner.reconcile import reconcile_job


def body(call: ReconcileCall, cfg: PipelineConfig, out: StageOutput) -> StageResult:
    job = reconcile_job(cfg, call.sub_models, call.manifests)
    with tracking.stage_run(cfg.tracking, call.mlflow_parent_run_id, job.name) as tracker:
        tracker.log_source_inputs(call.manifests, "training")
        trained = job.run(out.checkpointer(), tracker)
        return publish_trained(out, cfg, trained)


def main(argv: list[str] | None = None) -> int:
    return stage_main(ReconcileCall, body, argv)


if __name__ == "__main__":
    sys.exit(main())
