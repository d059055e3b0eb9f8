"""Transfer stage: evaluate backbones on the downstream sources and write the report.

Classification: a linear probe on frozen, pooled C5 features (L-BFGS, L2 chosen on a
split of the train set). Detection and segmentation: fine-tune a fresh head. The same
protocol and seed for every backbone; one report row per backbone.
"""

from __future__ import annotations

import sys

from stages.main import stage_main
from xlearner import tracking
from xlearner.config import PipelineConfig
from xlearner.contract import StageResult, TransferCall
from xlearner.outputs import StageOutput
from xlearner.transfer.evaluate import publish_report, transfer_evaluation


def body(call: TransferCall, cfg: PipelineConfig, out: StageOutput) -> StageResult:
    evaluation = transfer_evaluation(cfg, call.backbones, call.downstream, call.train_images)
    with tracking.stage_run(cfg.tracking, call.mlflow_parent_run_id, evaluation.name) as tracker:
        tracker.log_source_inputs(call.downstream, "evaluation")
        report = evaluation.run(tracker)
        return publish_report(out, report, tracker)


def main(argv: list[str] | None = None) -> int:
    return stage_main(TransferCall, body, argv)


if __name__ == "__main__":
    sys.exit(main())
