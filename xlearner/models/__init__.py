"""Models: backbones, task heads, the reconciled (expanded) network.

The public names are re-exported here; the submodules hold the implementations.
"""

from xlearner.models.backbones import (
    Backbone,
    BackboneError,
    available_backbones,
    count_parameters,
    create_backbone,
    load_backbone,
    load_backbone_weights,
    register_backbone,
    save_backbone,
)
from xlearner.models.heads import TaskHead, available_heads, create_head, register_head
from xlearner.models.reconciliation import ReconciledNetwork

__all__ = [
    "Backbone",
    "BackboneError",
    "ReconciledNetwork",
    "TaskHead",
    "available_backbones",
    "available_heads",
    "count_parameters",
    "create_backbone",
    "create_head",
    "load_backbone",
    "load_backbone_weights",
    "register_backbone",
    "register_head",
    "save_backbone",
]
