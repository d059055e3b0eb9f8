"""The backbone: a ResNet without its classifier, and its safetensors files.

A :class:`Backbone` takes images in [0, 1] (the ImageNet mean/std normalisation is a
buffer of its stem) and returns the four stage outputs [C2, C3, C4, C5] at strides 4,
8, 16 and 32. The blocks are torchvision's ``BasicBlock`` / ``Bottleneck``; the stages
are built here so that the per-stage widths are free (``half_resnet50`` halves every
width of ResNet-50, which ``width_per_group`` alone cannot do). The named architectures
are registered in :mod:`xlearner.models.resnets`. Weights never download:
``create_backbone(name, weights=path)`` reads a local file, either one written by
:func:`save_backbone` or a torchvision ResNet state dict (``conv1``/``bn1``/``layerN``).

On disk a backbone is ``backbone.safetensors`` + ``backbone.json`` (see
:mod:`xlearner.models.spec`); :func:`xlearner.models.loading.load_backbone` reads both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from xlearner.models.pretrained import load_weights
from xlearner.models.spec import BACKBONE_FORMAT, SPEC_FILE, WEIGHTS_FILE
from xlearner.store import atomic_write
from xlearner.tasks import IMAGENET_MEAN, IMAGENET_STD

Block = type[BasicBlock] | type[Bottleneck]


class Stem(nn.Module):
    """[0, 1] images -> ImageNet normalisation -> 7x7/2 conv, BN, ReLU -> 3x3/2 max-pool."""

    def __init__(self, width: int) -> None:
        super().__init__()
        # Constants, not weights: non-persistent, so checkpoints hold learnable state only.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.conv = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.mean) / self.std
        return self.maxpool(self.relu(self.bn(self.conv(x))))


def make_stage(
    block: Block, in_channels: int, planes: int, depth: int, stride: int
) -> nn.Sequential:
    """``depth`` blocks of ``planes``, the first with ``stride`` (torchvision's ``_make_layer``)."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
        )
    layers = [block(in_channels, planes, stride, downsample)]
    layers += [block(out_channels, planes) for _ in range(depth - 1)]
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """A ResNet without its classifier: ``forward(x) -> [C2, C3, C4, C5]``."""

    def __init__(
        self,
        name: str,
        block: Block,
        depths: Sequence[int],
        planes: Sequence[int],
        stem_width: int,
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(planes) != 4:
            raise ValueError(f"a backbone has 4 stages; got depths {depths}, planes {planes}")
        self.name = name
        self.channels = tuple(p * block.expansion for p in planes)
        self.stem = Stem(stem_width)
        in_channels = stem_width
        stages = []
        for index, (depth, width) in enumerate(zip(depths, planes, strict=True)):
            stages.append(
                make_stage(block, in_channels, width, depth, stride=1 if index == 0 else 2)
            )
            in_channels = width * block.expansion
        self.stages = nn.ModuleList(stages)
        self._init_weights()

    def _init_weights(self) -> None:
        """As torchvision's ResNet."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def load_weights(self, file: str | Path) -> Backbone:
        """Load a local weights file strictly (see :func:`load_backbone_weights`)."""
        return load_backbone_weights(self, file)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_backbone(
    backbone: nn.Module, out_dir: str | Path, extra_spec: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``backbone.safetensors`` then ``backbone.json`` into ``out_dir``; return the json.

    ``backbone`` is a :class:`Backbone` or any module with ``.name`` and ``.channels``
    (e.g. a pruned network, whose loader needs ``extra_spec`` fields in the json).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    spec = {
        "format": BACKBONE_FORMAT,
        "architecture": backbone.name,
        "channels": list(backbone.channels),
        "num_parameters": count_parameters(backbone),
        **(extra_spec or {}),
    }
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write(out / SPEC_FILE, lambda tmp: tmp.write_text(json.dumps(spec, indent=2)))
    return spec


def load_backbone_weights(backbone: Backbone, file: str | Path) -> Backbone:
    """Load ``file`` (safetensors, or a ``torch.save`` state dict read with weights_only;
    xlearner or torchvision names) into ``backbone`` strictly: see
    :func:`xlearner.models.pretrained.load_weights`."""
    load_weights(backbone, file)
    return backbone
