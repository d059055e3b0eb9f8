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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from xlearner.models.spec import BACKBONE_FORMAT, SPEC_FILE, WEIGHTS_FILE, BackboneError
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
    """Load ``file`` (safetensors, or a ``torch.save`` state dict read with weights_only)
    into ``backbone`` strictly: every tensor present, no extra tensor, same shapes."""
    file = Path(file)
    state = _remap_torchvision(_read_tensors(file))
    expected = backbone.state_dict()
    if not state.keys() & expected.keys():
        raise BackboneError(
            f"{file}: not a {backbone.name} backbone: none of its {len(expected)} tensors "
            f"(e.g. {_some(expected)}) is in the file, which holds {_some(state) or 'no tensors'}"
        )
    # Old torchvision checkpoints lack the BN counters; they are bookkeeping, not weights.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise BackboneError(
            f"{file}: {len(missing)} tensors of {backbone.name} are missing, e.g. {_some(missing)}"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise BackboneError(
            f"{file}: {len(unexpected)} tensors are not part of {backbone.name}, "
            f"e.g. {_some(unexpected)}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise BackboneError(
                f"{file}: tensor {key!r} has shape {list(tensor.shape)} but {backbone.name} "
                f"expects {list(expected[key].shape)}"
            )
    backbone.load_state_dict(state, strict=False)
    return backbone


def _read_tensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise BackboneError(f"{file}: weights file does not exist")
    if file.suffix == ".safetensors":
        try:
            return load_file(file)
        except (SafetensorError, OSError) as err:
            raise BackboneError(f"{file}: not a readable safetensors file ({err})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure means "not usable"
        raise BackboneError(
            f"{file}: not a safetensors file and not a weights-only torch state dict ({err})"
        ) from None
    if (
        isinstance(state, Mapping)
        and len(state) == 1
        and isinstance(next(iter(state.values())), Mapping)
    ):
        state = next(iter(state.values()))  # {"state_dict": {...}} / {"model": {...}}
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"{file}: expected a mapping of tensor names to tensors")
    return dict(state)


def _remap_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ResNet names (conv1, bn1, layer1..4, fc) -> ours (stem.*, stages.0..3)."""
    if "conv1.weight" not in state:
        return state
    renamed = {}
    for key, tensor in state.items():
        if key.startswith("fc."):
            continue
        if key.startswith("conv1."):
            key = "stem.conv." + key.removeprefix("conv1.")
        elif key.startswith("bn1."):
            key = "stem.bn." + key.removeprefix("bn1.")
        elif key.startswith("layer") and key[5:6].isdigit():
            key = f"stages.{int(key[5]) - 1}{key[6:]}"
        renamed[key] = tensor
    return renamed


def _some(names: Sequence[str] | Mapping[str, Any], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
