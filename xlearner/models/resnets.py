"""The ResNet family, registered by name: ``create_backbone("resnet18")``."""

from __future__ import annotations

from torchvision.models.resnet import BasicBlock, Bottleneck

from xlearner.models.backbone import Backbone
from xlearner.models.registry import register_backbone


@register_backbone("tiny_resnet")
def tiny_resnet() -> Backbone:
    """One BasicBlock per stage, widths 16/32/64/128 (~0.3M parameters): CPU runs at 64x64."""
    return Backbone("tiny_resnet", BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), stem_width=16)


@register_backbone("resnet18")
def resnet18() -> Backbone:
    return Backbone("resnet18", BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), stem_width=64)


@register_backbone("resnet50")
def resnet50() -> Backbone:
    return Backbone("resnet50", Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), stem_width=64)


@register_backbone("half_resnet50")
def half_resnet50() -> Backbone:
    """ResNet-50 with half the channels everywhere: C2..C5 = 128/256/512/1024 (the paper's _r)."""
    return Backbone("half_resnet50", Bottleneck, (3, 4, 6, 3), (32, 64, 128, 256), stem_width=32)
