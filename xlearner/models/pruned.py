"""A pruned expanded network exported as one backbone, and its pickle-free file format.

:class:`PrunedReconciledBackbone` wraps a (channel-pruned) :class:`ReconciledNetwork`
and returns, per level, the concatenation over tasks of the reconciled features
F_i^t: a drop-in for a :class:`~xlearner.models.backbone.Backbone` (``.channels``,
``forward(x) -> [C2, C3, C4, C5]``, images in [0, 1]).

On disk it is the backbone layout (``backbone.safetensors`` + ``backbone.json`` with
``"architecture": "pruned_reconciled"``). The json also holds the unpruned trunk's spec
and the shape of every tensor: loading rebuilds the unpruned trunk, shrinks each layer
to the recorded shapes and loads the weights strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from xlearner.models.backbone import save_backbone
from xlearner.models.multitask import build_trunk
from xlearner.models.reconciliation import NUM_STAGES, ReconciledNetwork
from xlearner.models.spec import (
    PRUNED_ARCHITECTURE,
    BackboneError,
    PrunedBackboneSpec,
    backbone_files,
    read_backbone_spec,
    validate_spec,
)

PROBE_SIZE = 64


class PrunedReconciledBackbone(nn.Module):
    """``forward(x) -> [cat_t F_1^t, ..., cat_t F_4^t]`` (tasks in ``trunk.tasks`` order)."""

    def __init__(self, trunk: ReconciledNetwork, trunk_spec: Mapping[str, Any]) -> None:
        super().__init__()
        if not isinstance(trunk, ReconciledNetwork):
            raise TypeError(f"expected a ReconciledNetwork trunk, got {type(trunk).__name__}")
        self.name = PRUNED_ARCHITECTURE
        self.trunk = trunk
        self.trunk_spec = dict(trunk_spec)
        self.channels = self.measure_channels()

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.trunk(x)
        return [
            torch.cat([features[task][i] for task in self.trunk.tasks], dim=1)
            for i in range(NUM_STAGES)
        ]

    @torch.no_grad()
    def measure_channels(self) -> tuple[int, ...]:
        """C2..C5 widths from one small forward (the sub-backbones' ``.channels`` attributes
        describe the unpruned widths, not the pruned layers)."""
        param = next(self.parameters())
        was_training = self.training
        self.eval()
        try:
            probe = torch.zeros(
                1, 3, PROBE_SIZE, PROBE_SIZE, device=param.device, dtype=param.dtype
            )
            return tuple(int(f.shape[1]) for f in self(probe))
        finally:
            self.train(was_training)


def save_pruned_backbone(backbone: PrunedReconciledBackbone, out_dir: str | Path) -> dict[str, Any]:
    """Write ``backbone.safetensors`` then ``backbone.json``; returns the json."""
    shapes = {name: list(t.shape) for name, t in backbone.state_dict().items()}
    return save_backbone(
        backbone, out_dir, extra_spec={"trunk": backbone.trunk_spec, "shapes": shapes}
    )


def load_pruned_backbone(path: str | Path) -> PrunedReconciledBackbone:
    """Rebuild a backbone written by :func:`save_pruned_backbone` (its folder or either file)."""
    spec_path, weights_path = backbone_files(path)
    spec = _read_spec(spec_path)
    trunk_spec = spec.trunk.model_dump()
    try:
        trunk = build_trunk(trunk_spec)
    except (KeyError, TypeError, ValueError) as err:
        raise BackboneError(
            f"{spec_path}: field 'trunk' is not a valid reconciled trunk spec ({err})"
        ) from None
    shrink_to_shapes(
        trunk, {k.removeprefix("trunk."): v for k, v in spec.shapes.items()}, spec_path
    )
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise BackboneError(f"{weights_path}: not a readable safetensors file ({err})") from None
    expected = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape
    )
    if missing or unexpected or mismatched:
        raise BackboneError(
            f"{weights_path} does not match {spec_path}: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}, shapes differing from 'shapes' {mismatched[:5]}"
        )
    trunk.load_state_dict({k.removeprefix("trunk."): v for k, v in state.items()}, strict=True)
    try:
        backbone = PrunedReconciledBackbone(trunk, trunk_spec)
    except RuntimeError as err:  # layers whose recorded widths do not fit together
        raise BackboneError(
            f"{spec_path}: field 'shapes' does not describe a working network ({err})"
        ) from None
    return backbone.eval()


def _read_spec(spec_path: Path) -> PrunedBackboneSpec:
    spec = read_backbone_spec(spec_path)
    if spec.architecture != PRUNED_ARCHITECTURE:
        raise BackboneError(
            f"{spec_path}: field 'architecture' is {spec.architecture!r}, expected "
            f"{PRUNED_ARCHITECTURE!r}; load other backbones with load_backbone"
        )
    return validate_spec(PrunedBackboneSpec, spec.model_dump(), spec_path)


def shrink_to_shapes(model: nn.Module, shapes: Mapping[str, list[int]], origin: Path | str) -> None:
    """Resize every Conv2d / BatchNorm2d / Linear of ``model`` to the recorded tensor shapes.

    The tensors are replaced by uninitialised ones (the weights are loaded next) and the
    layers' size attributes updated, so ``model`` becomes the pruned architecture.
    """
    for prefix, module in model.named_modules():
        tensors = {
            **dict(module.named_parameters(recurse=False)),
            **dict(module.named_buffers(recurse=False)),
        }
        resized = False
        for name, tensor in tensors.items():
            key = f"{prefix}.{name}" if prefix else name
            shape = shapes.get(key)
            if shape is None or list(tensor.shape) == list(shape):
                continue
            if not isinstance(module, nn.Conv2d | nn.BatchNorm2d | nn.Linear):
                raise BackboneError(
                    f"{origin}: tensor {key!r} has shape {shape}, but {type(module).__name__} "
                    f"layers cannot be resized (only Conv2d, BatchNorm2d, Linear)"
                )
            empty = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(empty, requires_grad=tensor.requires_grad))
            else:
                module.register_buffer(name, empty)
            resized = True
        if resized:
            _update_sizes(module)


def _update_sizes(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.groups = module.out_channels
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.BatchNorm2d):
        module.num_features = (
            module.weight.shape[0] if module.weight is not None else module.running_mean.shape[0]
        )
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
