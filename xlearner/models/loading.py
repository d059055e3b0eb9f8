"""``load_backbone``: any backbone folder written by the pipeline, plain or pruned."""

from __future__ import annotations

from pathlib import Path

from xlearner.integrity import verify_folder
from xlearner.models.backbone import Backbone, load_backbone_weights
from xlearner.models.pruned import PrunedReconciledBackbone, load_pruned_backbone
from xlearner.models.registry import available_backbones, create_backbone
from xlearner.models.spec import (
    PRUNED_ARCHITECTURE,
    BackboneError,
    backbone_files,
    read_backbone_spec,
)


def load_backbone(path: str | Path) -> Backbone | PrunedReconciledBackbone:
    """Rebuild a backbone saved by :func:`~xlearner.models.backbone.save_backbone` (a folder
    or one of its files); a pruned one (squeeze.method: prune) by its own loader. A folder
    a stage published is first checked against the hashes its ``result.json`` recorded."""
    spec_path, weights_path = backbone_files(path)
    verify_folder(spec_path.parent)
    spec = read_backbone_spec(spec_path)
    if spec.architecture == PRUNED_ARCHITECTURE:
        return load_pruned_backbone(spec_path)
    if spec.architecture not in available_backbones():
        raise BackboneError(
            f"{spec_path}: unknown architecture {spec.architecture!r}; "
            f"available: {available_backbones()}"
        )
    backbone = create_backbone(spec.architecture)
    if spec.channels != list(backbone.channels):
        raise BackboneError(
            f"{spec_path}: field 'channels' is {spec.channels} but architecture "
            f"{spec.architecture!r} has {list(backbone.channels)}"
        )
    return load_backbone_weights(backbone, weights_path)
