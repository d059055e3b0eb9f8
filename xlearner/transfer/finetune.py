"""Transfer by fine-tuning: a detection or segmentation head on a downstream source.

The backbone under test is the trunk; a fresh head is trained with it (the whole
network, the same protocol and seed for every backbone compared) and scored on the
downstream source's val split: COCO mAP for detection, mIoU for segmentation (percent).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from xlearner.config import PipelineConfig
from xlearner.data.shards import ShardDataset, collate_fn
from xlearner.engine import Trainer, evaluate
from xlearner.loaders import Stream
from xlearner.models.heads import create_head
from xlearner.models.multitask import MultiTaskModel, stream_name

PRIMARY = {"det": "mAP", "seg": "mIoU"}


def finetune_score(
    backbone: nn.Module, manifest_uri: str, task: str, cfg: PipelineConfig, name: str
) -> float:
    """Fine-tune a copy of ``backbone`` with a new ``task`` head; returns the val metric in %."""
    train = ShardDataset(manifest_uri, "train", cfg.model.image_size, train=True)
    val = ShardDataset(manifest_uri, "val", cfg.model.image_size)
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
    metrics = evaluate(model, [stream], cfg.engine)[stream.name]
    return 100.0 * metrics[PRIMARY[task]]
