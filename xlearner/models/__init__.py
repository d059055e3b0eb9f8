"""Models: backbones, task heads, the reconciled (expanded) network.

As timm's ``models/__init__.py``: importing the package imports every family module
(``resnets``) and head module, so the backbone and head registries are full. The public
names are re-exported here; the submodules hold the implementations.
"""

from xlearner.models import resnets  # noqa: F401  (registers the ResNet family)
from xlearner.models.backbone import (
    Backbone,
    count_parameters,
    load_backbone_weights,
    save_backbone,
)
from xlearner.models.head import TaskHead, available_heads, register_head
from xlearner.models.heads import create_head
from xlearner.models.loading import load_backbone
from xlearner.models.reconciliation import ReconciledNetwork
from xlearner.models.registry import available_backbones, create_backbone, register_backbone
from xlearner.models.spec import BackboneError

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
