"""The squeeze stage's library: condense the expanded network into one backbone.

- :mod:`xlearner.squeeze.distill`: FitNet distillation into a student backbone (default;
  with X-Learner++ hints from single-task backbones);
- :mod:`xlearner.squeeze.prune`: structured channel pruning of the expanded trunk
  (X-Learner_p) and a short distillation fine-tune;
- :mod:`xlearner.squeeze.pruned_backbone`: the pruned trunk as one backbone, saved and
  loaded without pickles.
"""

from xlearner.squeeze.distill import (
    DistillationObjective,
    FeatureAdapter,
    check_student_size,
    distill,
    level_name,
)
from xlearner.squeeze.prune import count_flops, prune, prune_to_size
from xlearner.squeeze.pruned_backbone import (
    PRUNED_ARCHITECTURE,
    PrunedReconciledBackbone,
    load_pruned_backbone,
    save_pruned_backbone,
)

__all__ = [
    "PRUNED_ARCHITECTURE",
    "DistillationObjective",
    "FeatureAdapter",
    "PrunedReconciledBackbone",
    "check_student_size",
    "count_flops",
    "distill",
    "level_name",
    "load_pruned_backbone",
    "prune",
    "prune_to_size",
    "save_pruned_backbone",
]
