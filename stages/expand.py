"""Expand stage: train one task's sub-backbone with its heads on all sources of the task.

``--task all`` trains the hard-sharing baseline (one backbone, every head, every source);
``--init-backbone`` starts the trunk from a published backbone (Squeeze-Expansion).
"""

from __future__ import annotations

import sys

from stages.main import stage_main
from xlearner import tracking
from xlearner.config import PipelineConfig
from xlearner.contract import ExpandCall, StageResult
from xlearner.expand import expand_job
from xlearner.outputs import StageOutput, publish_trained


def body(call: ExpandCall, cfg: PipelineConfig, out: StageOutput) -> StageResult:
    job = expand_job(
        cfg,
        call.task,
        call.manifests,
        source=call.source,
        steps=call.steps,
        init_backbone=call.init_backbone,
    )
    with tracking.stage_run(cfg.tracking, call.mlflow_parent_run_id, job.name) as tracker:
        tracker.log_source_inputs(call.manifests, "training")
        trained = job.run(out.checkpointer(), tracker)
        return publish_trained(out, cfg, trained)


def main(argv: list[str] | None = None) -> int:
    return stage_main(ExpandCall, body, argv)


if __name__ == "__main__":
    sys.exit(main())
