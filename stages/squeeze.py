"""Squeeze stage: condense the expanded model into one backbone of normal size.

``squeeze.method: distill`` (default) trains a student with the FitNet loss against
every task's reconciled features; ``prune`` prunes the expanded trunk down to the size of
one student and fine-tunes it. ``--sub-model`` instead of ``--teacher`` distils straight
from the sub-backbones (no reconciliation: the Squeeze-Expansion variant's first step);
``--hint`` adds single-task single-source backbones as extra teachers (X-Learner++).
"""

from __future__ import annotations

import sys

from stages.main import stage_main
from xlearner import tracking
from xlearner.config import PipelineConfig
from xlearner.contract import SqueezeCall, StageResult
from xlearner.outputs import StageOutput, publish_trained
from xlearner.squeeze import squeeze_job


def body(call: SqueezeCall, cfg: PipelineConfig, out: StageOutput) -> StageResult:
    job = squeeze_job(
        cfg, call.manifests, teacher=call.teacher, sub_models=call.sub_models, hints=call.hints
    )
    with tracking.stage_run(cfg.tracking, call.mlflow_parent_run_id, job.name) as tracker:
        tracker.log_source_inputs(call.manifests, "training")
        squeezed = job.run(out.checkpointer(), tracker)
        return publish_trained(out, cfg, squeezed)


def main(argv: list[str] | None = None) -> int:
    return stage_main(SqueezeCall, body, argv)


if __name__ == "__main__":
    sys.exit(main())
