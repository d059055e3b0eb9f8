"""The squeeze stage's library: condense the expanded network into one backbone.

- :mod:`xlearner.squeeze.distill`: FitNet distillation into a student backbone (default;
  with X-Learner++ hints from single-task backbones);
- :mod:`xlearner.squeeze.prune`: structured channel pruning of the expanded trunk
  (X-Learner_p) and a short distillation fine-tune;
- the pruned trunk as one backbone, saved and loaded without pickles, is
  :mod:`xlearner.models.pruned`.

The stage calls :func:`squeeze_job` (the teacher: the expanded model, or the
sub-backbones side by side) and runs it (:meth:`SqueezeJob.run`): ``squeeze.method``
distils into the student backbone or prunes down to its size (:func:`prune_target`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xlearner import tracking
from xlearner.checkpoint import Checkpointer
from xlearner.config import PipelineConfig
from xlearner.config.methods import HintCheckpoint
from xlearner.loaders import Stream
from xlearner.models.backbone import Backbone, count_parameters
from xlearner.models.loading import load_backbone
from xlearner.models.multitask import MultiTaskModel, load_model
from xlearner.models.pretrained import init_from_pretrained
from xlearner.models.pruned import (
    PRUNED_ARCHITECTURE,
    PrunedReconciledBackbone,
    load_pruned_backbone,
    save_pruned_backbone,
)
from xlearner.models.registry import create_backbone
from xlearner.outputs import fetch_dir
from xlearner.reconcile import build_reconciled_model, fetch_sub_models
from xlearner.squeeze.distill import (
    DistillationObjective,
    FeatureAdapter,
    check_student_size,
    distill,
    level_name,
)
from xlearner.squeeze.prune import count_flops, prune, prune_to_size
from xlearner.streams import Trained, count_images, load_streams

__all__ = [
    "PRUNED_ARCHITECTURE",
    "DistillationObjective",
    "FeatureAdapter",
    "PrunedReconciledBackbone",
    "SqueezeJob",
    "check_student_size",
    "count_flops",
    "distill",
    "level_name",
    "load_pruned_backbone",
    "open_teacher",
    "prune",
    "prune_target",
    "prune_to_size",
    "save_pruned_backbone",
    "squeeze_job",
]


def prune_target(cfg: PipelineConfig) -> int:
    """Parameters the pruned trunk is cut down to: those of the student backbone."""
    return count_parameters(create_backbone(cfg.student_backbone))


def open_teacher(
    cfg: PipelineConfig,
    streams: list[Stream],
    teacher: str | None = None,
    sub_models: dict[str, str] | None = None,
) -> MultiTaskModel:
    """The model to squeeze: the expanded model published at ``teacher``, or the
    sub-backbones ``sub_models`` (TASK -> URI) side by side, without reconciliation."""
    if bool(teacher) == bool(sub_models):
        raise ValueError("squeeze needs either a teacher or sub-models, not both/neither")
    if teacher:
        return load_model(fetch_dir(teacher))
    return build_reconciled_model(cfg, streams, fetch_sub_models(sub_models), "none")


@dataclass
class SqueezeJob:
    """A teacher, the streams it is squeezed on and the extra hint backbones."""

    cfg: PipelineConfig
    teacher: MultiTaskModel
    streams: list[Stream]
    hints: dict[str, Backbone] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.cfg.squeeze.method

    @property
    def name(self) -> str:
        return f"squeeze-{self.method}"

    def run(self, checkpointer: Checkpointer | None, tracker: tracking.StageTracker) -> Trained:
        """Distil or prune; the squeezed backbone, its report and validation metrics."""
        cfg = self.cfg
        tracker.log_params(
            {
                "stage": self.name,
                "squeeze": cfg.squeeze.model_dump(),
                "student": cfg.student_backbone,
            }
        )
        common = dict(
            seed=cfg.seed, checkpointer=checkpointer, name=self.name, on_metrics=tracker.log_metrics
        )
        save = None
        if self.method == "distill":
            backbone, report = distill(
                self.teacher,
                cfg.student_backbone,
                self.streams,
                cfg.squeeze,
                cfg.engine,
                hints=self.hints,
                hint_weight=cfg.squeeze.hint_weight,
                **common,
            )
        else:
            target = prune_target(cfg)
            backbone, report = prune(
                self.teacher, target, self.streams, cfg.squeeze, cfg.engine, **common
            )
            save = save_pruned_backbone
        tracker.log_metrics({k: float(v) for k, v in report.items() if isinstance(v, int | float)})
        extra = {
            "method": self.method,
            "train_images": count_images(self.streams),
            "squeeze": report,
        }
        return Trained(report.get("val", {}), extra, backbone=backbone, save_backbone=save)


def squeeze_job(
    cfg: PipelineConfig,
    manifests: dict[str, str],
    *,
    teacher: str | None = None,
    sub_models: dict[str, str] | None = None,
    hints: dict[str, str] | None = None,
) -> SqueezeJob:
    """The squeeze stage's work: the teacher (see :func:`open_teacher`) on every source,
    with the hint backbones (NAME -> URI, X-Learner++) and ``squeeze.hints`` (files)."""
    streams = load_streams(cfg, manifests)
    model = open_teacher(cfg, streams, teacher, sub_models)
    opened = {name: load_backbone(fetch_dir(uri)) for name, uri in (hints or {}).items()}
    opened |= {hint.name: hint_backbone(cfg, hint) for hint in cfg.squeeze.hints}
    return SqueezeJob(cfg, model, streams, opened)


def hint_backbone(cfg: PipelineConfig, hint: HintCheckpoint) -> Backbone:
    """An external hint: its architecture (default ``model.backbone``) from its weight
    file, loaded strictly and without pickles (:mod:`xlearner.models.pretrained`)."""
    backbone = create_backbone(hint.backbone or cfg.model.backbone)
    init_from_pretrained(backbone, hint.path)
    return backbone.eval()
