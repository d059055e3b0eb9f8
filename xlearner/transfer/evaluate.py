"""Every backbone on every downstream data set: the rows of the comparison report.

Classification: a linear probe on frozen, pooled features (``transfer.probe_level``,
C5 by default; L-BFGS, L2 chosen on a split of the train set), or with
``transfer.cls_protocol: finetune`` a full fine-tune like detection and segmentation,
which fine-tune a fresh head (detection scored by COCO mAP and the PASCAL VOC AP50).
The same protocol and seed for every backbone; one report row per backbone
(docs/transfer.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xlearner import tracking
from xlearner.config import PipelineConfig
from xlearner.contract import RANDOM_BACKBONE, StageResult
from xlearner.engine import resolve_device
from xlearner.models.backbone import count_parameters
from xlearner.models.loading import load_backbone
from xlearner.models.registry import create_backbone
from xlearner.outputs import StageOutput, fetch_dir
from xlearner.tasks import label_format
from xlearner.transfer.finetune import finetune_score
from xlearner.transfer.probe import probe_top1
from xlearner.transfer.report import build_report, write_report

RUN_NAME = "transfer"
REPORT_DIR = "report"


def open_backbone(uri: str, seed: int) -> nn.Module:
    """A published backbone folder, or ``random:<architecture>`` (the random-init baseline)."""
    if uri.startswith(RANDOM_BACKBONE):
        torch.manual_seed(seed)
        return create_backbone(uri.removeprefix(RANDOM_BACKBONE))
    return load_backbone(fetch_dir(uri))


@dataclass
class TransferEvaluation:
    """Opened backbones and the downstream sets they are evaluated on."""

    cfg: PipelineConfig
    backbones: dict[str, nn.Module]  # name -> backbone, on ``device``
    downstream: dict[str, str]  # name -> manifest URI
    formats: dict[str, str]  # downstream name -> format (cls, det, seg)
    train_images: dict[str, int]  # backbone name -> images it was trained on
    device: torch.device
    name: str = RUN_NAME

    def row(self, name: str, backbone: nn.Module) -> dict:
        row = {
            "name": name,
            "cls": {},
            "det": {},
            "seg": {},
            "ap50": {},
            "eval_images": {},
            "parameters": count_parameters(backbone),
            "train_images": self.train_images.get(name),
        }
        for ds_name, manifest in self.downstream.items():
            fmt = self.formats[ds_name]
            if fmt == "cls" and self.cfg.transfer.cls_protocol == "linear_probe":
                row["cls"][ds_name] = probe_top1(backbone, manifest, ds_name, self.cfg, self.device)
                continue
            score = finetune_score(backbone, manifest, fmt, self.cfg, f"{name}-{ds_name}")
            row[fmt][ds_name] = score.score
            if score.ap50 is not None:
                row["ap50"][ds_name] = score.ap50
            row["eval_images"][ds_name] = [score.evaluated, score.val_images]
        return row

    @property
    def protocol(self) -> dict[str, str]:
        """How each task is measured, in words (the notes under the report's table)."""
        transfer = self.cfg.transfer
        cls = (
            f"linear-probe ({transfer.probe_level})"
            if transfer.cls_protocol == "linear_probe"
            else f"fine-tune (steps: {transfer.finetune.steps})"
        )
        return {"cls": cls, "ap50": transfer.voc_ap.replace("_", " ")}

    def run(self, tracker: tracking.StageTracker) -> dict:
        """The report (:func:`~xlearner.transfer.report.build_report`); logs its metrics."""
        rows = [self.row(name, b) for name, b in self.backbones.items()]
        report = build_report(rows, self.protocol)
        for row in report["rows"]:
            metrics = {
                f"transfer/{row['name']}/{k}": v for k, v in row.items() if isinstance(v, float)
            }
            tracker.log_metrics(metrics)
        return report


def transfer_evaluation(
    cfg: PipelineConfig,
    backbones: dict[str, str],
    downstream: dict[str, str],
    train_images: dict[str, str | int] | None = None,
) -> TransferEvaluation:
    """Check the downstream sets against the config and open the backbones (NAME -> URI
    or ``random:<architecture>``) on the engine's device."""
    images = {k: int(v) for k, v in (train_images or {}).items()}
    formats = {d.name: label_format(d.format).value for d in cfg.downstream}
    unknown = sorted(set(downstream) - set(formats))
    if unknown:
        raise ValueError(
            f"--downstream {unknown}: not in the config's downstream list {sorted(formats)}"
        )
    device = resolve_device(cfg.engine)
    opened = {name: open_backbone(uri, cfg.seed).to(device) for name, uri in backbones.items()}
    return TransferEvaluation(cfg, opened, downstream, formats, images, device)


def publish_report(out: StageOutput, report: dict, tracker: tracking.StageTracker) -> StageResult:
    """Publish ``report/report.{json,md,png}`` (also as tracking artifacts), then finish."""
    paths = write_report(report, out.work / REPORT_DIR)
    for path in paths.values():
        out.publish_file(path)
        tracker.log_artifact(path, REPORT_DIR)
    report_md = out.store.uri(f"{REPORT_DIR}/report.md")
    return out.finish(StageResult(report=report, report_md=report_md))
