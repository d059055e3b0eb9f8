"""Transfer by fine-tuning: a fresh head trained with the backbone on a downstream source.

The backbone under test is the trunk; a fresh head is trained with it (the whole
network, the same protocol, budget and seed for every backbone compared) and scored on
the downstream source's val split, all of it unless ``transfer.eval_max_images`` caps
it: top-1 for classification (``transfer.cls_protocol: finetune``), COCO mAP and the
PASCAL VOC AP50 for detection, mIoU for segmentation (percent).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from xlearner.config import PipelineConfig
from xlearner.data.shards import ShardDataset, collate_fn
from xlearner.engine import Trainer, evaluate
from xlearner.loaders import Stream
from xlearner.models.heads import create_head
from xlearner.models.multitask import MultiTaskModel, stream_name

PRIMARY = {"cls": "top1", "det": "mAP", "seg": "mIoU"}
VOC_AP_METRIC = {"all_points": "voc_ap50", "11_points": "voc07_ap50"}


@dataclass(frozen=True)
class FinetuneScore:
    """What a fine-tune scored (percent) and on how many of the val images."""

    score: float  # PRIMARY[task]: top-1, COCO mAP or mIoU
    evaluated: int
    val_images: int
    ap50: float | None = None  # detection: the PASCAL VOC AP50 (transfer.voc_ap)


def finetune_score(
    backbone: nn.Module, manifest_uri: str, task: str, cfg: PipelineConfig, name: str
) -> FinetuneScore:
    """Fine-tune a copy of ``backbone`` with a new ``task`` head; score it on val."""
    train = ShardDataset(manifest_uri, "train", cfg.model.image_size, train=True)
    val = ShardDataset(manifest_uri, "val", cfg.model.image_size)
    if len(val) == 0:
        raise ValueError(
            f"downstream source {manifest_uri}: the val split is empty, nothing to score; "
            "raise its val_fraction (or fill its val list)"
        )
    stream = Stream(stream_name(name, task), task, train, val, collate_fn(task))
    torch.manual_seed(cfg.seed)
    trunk = copy.deepcopy(backbone)
    head = create_head(task, tuple(trunk.channels), train.num_classes, cfg.model.image_size)
    spec = {
        "trunk": {"kind": "given"},
        "streams": {stream.name: {"task": task, "num_classes": train.num_classes}},
        "image_size": cfg.model.image_size,
    }
    model = MultiTaskModel(trunk, {stream.name: head}, spec)
    Trainer(
        model, [stream], cfg.transfer.finetune, cfg.engine, seed=cfg.seed, name=f"finetune-{name}"
    ).fit()
    evaluated = min(len(val), cfg.transfer.eval_max_images or len(val))
    engine = cfg.engine.model_copy(update={"eval_max_images": evaluated})
    metrics = evaluate(model, [stream], engine)[stream.name]
    ap50 = 100.0 * metrics[VOC_AP_METRIC[cfg.transfer.voc_ap]] if task == "det" else None
    return FinetuneScore(100.0 * metrics[PRIMARY[task]], evaluated, len(val), ap50)
