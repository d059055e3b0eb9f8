"""FitNet distillation of the expanded network into one backbone (METHOD.md, Squeeze stage).

A student backbone F^ learns, through one adapter G_l^t (1x1 conv + BN) per teacher
task t and matched level l, to reproduce the teacher's reconciled features:

    L_distill = sum_t sum_l mean((F_l^t - G_l^t(F^_l))^2)

Choices the paper leaves open:

- ``levels`` (config ``squeeze.levels``, 1..4 = C2..C5) are matched; default C5 only.
- The student's feature is bilinearly resized to the teacher's when their strides differ.
- A teacher whose trunk is one backbone (Squeeze-Expansion, hard-sharing) has one set of
  features, matched under the name ``"shared"``.
- Optional task loss (``task_loss_weight > 0``): trainable copies of the teacher's heads
  read the adapted student features of the stream's task at all four levels (so the
  heads see the channels they were trained on). Adapters of levels that are not
  distilled then learn from the task loss alone.
- X-Learner++ hints: frozen single-task backbones whose features the student also
  matches, each through its own adapters, weighted by ``hint_weight``.

The frozen teacher (and hints) run under ``no_grad`` in eval mode whatever mode the
objective is put in; only the student, the adapters and the head copies train.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlearner.checkpoint import Checkpointer
from xlearner.config import EngineConfig, SqueezeConfig
from xlearner.engine import MetricsCallback, Trainer, evaluate
from xlearner.loaders import Stream
from xlearner.metrics import MeanLoss
from xlearner.models.backbone import Backbone, count_parameters
from xlearner.models.multitask import MultiTaskModel
from xlearner.models.pretrained import init_from_pretrained
from xlearner.models.registry import create_backbone

log = logging.getLogger("xlearner.squeeze")

SHARED = "shared"
ALL_LEVELS = (1, 2, 3, 4)


def level_name(level: int) -> str:
    """1..4 -> "C2".."C5" (the ResNet stage outputs)."""
    return f"C{level + 1}"


class FeatureAdapter(nn.Sequential):
    """G: 1x1 conv + BN from the student's channels to a teacher's channels at one level."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def match(self, student: Tensor, size: Sequence[int]) -> Tensor:
        """Adapt ``student`` after resizing it to the teacher's spatial ``size``."""
        if tuple(student.shape[-2:]) != tuple(size):
            student = F.interpolate(student, size=tuple(size), mode="bilinear", align_corners=False)
        return self(student)


def feature_mse(prediction: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(prediction.float(), target.float())


def teacher_channels(teacher: MultiTaskModel) -> dict[str, tuple[int, ...]]:
    """Channels of C2..C5 of every feature set the teacher's trunk produces."""
    trunk = teacher.trunk
    if isinstance(trunk, Backbone):
        return {SHARED: tuple(trunk.channels)}
    return {task: tuple(trunk.channels[task]) for task in trunk.tasks}


def check_student_size(student: nn.Module, teacher: MultiTaskModel, student_name: str) -> None:
    """The squeeze target must not be larger than the teacher's whole trunk."""
    student_params, teacher_params = count_parameters(student), count_parameters(teacher.trunk)
    if student_params > teacher_params:
        raise ValueError(
            f"squeeze target {student_name} ({student_params:,} params) is larger than the teacher "
            f"({teacher_params:,} params); choose a smaller squeeze.student"
        )


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def _adapters(
    student_channels: Sequence[int], targets: Mapping[str, Sequence[int]], levels: Sequence[int]
) -> nn.ModuleDict:
    """{target name: {"C<l+1>": G_l}} for every target and level."""
    return nn.ModuleDict(
        {
            name: nn.ModuleDict(
                {
                    level_name(level): FeatureAdapter(
                        student_channels[level - 1], channels[level - 1]
                    )
                    for level in levels
                }
            )
            for name, channels in targets.items()
        }
    )


def _matching_loss(
    student: list[Tensor],
    targets: Mapping[str, list[Tensor]],
    adapters: nn.ModuleDict,
    levels: Sequence[int],
    weights: Mapping[str, float] | None = None,
) -> Tensor:
    """Sum over targets and levels of the FitNet MSE; ``weights`` per target (default 1)."""
    weights = weights or {}
    total = student[0].new_zeros((), dtype=torch.float32)
    for name, features in targets.items():
        for level in levels:
            target = features[level - 1]
            adapted = adapters[name][level_name(level)].match(student[level - 1], target.shape[-2:])
            total = total + weights.get(name, 1.0) * feature_mse(adapted, target)
    return total


class DistillationObjective(nn.Module):
    """The squeeze training objective, called by the engine as ``(images, stream, targets)``.

    ``student`` is any backbone-like module: ``.channels`` (C2..C5) and
    ``forward(images) -> [C2, C3, C4, C5]``.
    """

    def __init__(
        self,
        teacher: MultiTaskModel,
        student: nn.Module,
        levels: Sequence[int] = (4,),
        task_loss_weight: float = 0.0,
        hints: Mapping[str, nn.Module] | None = None,
        hint_weight: float = 1.0,
        target_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        bad = [level for level in levels if level not in ALL_LEVELS]
        if bad or not levels:
            raise ValueError(
                f"levels must be a non-empty subset of 1..4 (C2..C5); got {list(levels)}"
            )
        self.levels = tuple(sorted(set(levels)))
        self.task_loss_weight = task_loss_weight
        self.hint_weight = hint_weight
        self.teacher = _frozen(teacher)
        self.student = student
        self.single_trunk = isinstance(teacher.trunk, Backbone)
        # The task loss feeds the heads all four levels, so it needs adapters at every level.
        adapter_levels = ALL_LEVELS if task_loss_weight > 0 else self.levels
        targets = teacher_channels(teacher)
        self.adapters = _adapters(student.channels, targets, adapter_levels)
        # Per-task weights apply to an expanded teacher's sub-backbones; a single trunk
        # (hard sharing) is one target whatever the tasks.
        self.target_weights = {} if self.single_trunk else dict(target_weights or {})
        unknown = sorted(set(self.target_weights) - set(targets))
        if unknown:
            raise ValueError(
                f"target weights for {unknown}, but the teacher's sub-backbones are "
                f"{sorted(targets)}"
            )
        self.heads = nn.ModuleDict()
        if task_loss_weight > 0:
            self.heads = copy.deepcopy(teacher.heads)
            for param in self.heads.parameters():
                param.requires_grad_(True)
        self.hints = nn.ModuleDict({name: _frozen(hint) for name, hint in (hints or {}).items()})
        self.hint_adapters = _adapters(
            student.channels,
            {name: hint.channels for name, hint in self.hints.items()},
            self.levels,
        )

    def train(self, mode: bool = True) -> DistillationObjective:
        super().train(mode)
        self.teacher.eval()
        self.hints.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        modules = (self.student, self.adapters, self.heads, self.hint_adapters)
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def teacher_features(self, images: Tensor) -> dict[str, list[Tensor]]:
        with torch.no_grad():
            out = self.teacher.trunk(images)
            return {SHARED: out} if self.single_trunk else out

    def forward(self, images: Tensor, stream: str, targets: Any = None) -> dict[str, Tensor]:
        student = self.student(images)
        losses = {
            "distill": _matching_loss(
                student,
                self.teacher_features(images),
                self.adapters,
                self.levels,
                self.target_weights,
            )
        }
        if len(self.hints):
            with torch.no_grad():
                hinted = {name: hint(images) for name, hint in self.hints.items()}
            losses["hint"] = self.hint_weight * _matching_loss(
                student, hinted, self.hint_adapters, self.levels
            )
        if self.task_loss_weight > 0:
            losses.update(self._task_losses(images, stream, targets, student))
        return losses

    def _task_losses(
        self, images: Tensor, stream: str, targets: Any, student: list[Tensor]
    ) -> dict[str, Tensor]:
        head = self.heads[stream]
        inputs, ctx = head.prepare_inputs(images)
        features = student if inputs is images else self.student(inputs)
        adapters = self.adapters[SHARED if self.single_trunk else self.teacher.task_of(stream)]
        adapted = [adapters[level_name(level)](features[level - 1]) for level in ALL_LEVELS]
        return {
            f"task/{name}": self.task_loss_weight * loss
            for name, loss in head(adapted, images, targets, ctx).items()
        }

    # evaluate() protocol: the validation metric of every stream is the mean objective.
    def is_self_supervised(self, stream: str) -> bool:
        return True

    def metric(self, stream: str) -> MeanLoss:
        return MeanLoss()


def mean_val_loss(results: Mapping[str, Mapping[str, float]]) -> float:
    values = [r["loss"] for r in results.values()]
    return sum(values) / len(values) if values else float("nan")


def train_objective(
    objective: DistillationObjective,
    streams: list[Stream],
    cfg: SqueezeConfig,
    engine_cfg: EngineConfig,
    seed: int,
    name: str,
    checkpointer: Checkpointer | None,
    on_metrics: MetricsCallback | None,
) -> dict[str, Any]:
    """Train the student side of ``objective``; validation loss before and after."""
    trainer = Trainer(
        objective,
        streams,
        cfg.train,
        engine_cfg,
        seed=seed,
        name=name,
        checkpointer=checkpointer,
        on_metrics=on_metrics,
        parameters=objective.trainable_parameters(),
    )
    before = evaluate(trainer.model, streams, engine_cfg)
    start_step = trainer.fit()
    after = evaluate(trainer.model, streams, engine_cfg)
    metrics = {
        "val": after,
        "val_loss_initial": mean_val_loss(before),
        "val_loss": mean_val_loss(after),
        "start_step": start_step,
        "steps": cfg.train.steps,
        "levels": list(objective.levels),
    }
    log.info(
        f"[{name}] val objective {metrics['val_loss_initial']:.4f} -> {metrics['val_loss']:.4f} "
        f"after {cfg.train.steps} steps"
    )
    return metrics


def distill(
    teacher: MultiTaskModel,
    student_arch: str,
    streams: list[Stream],
    cfg: SqueezeConfig,
    engine_cfg: EngineConfig,
    seed: int = 0,
    *,
    hints: Mapping[str, Backbone] | None = None,
    hint_weight: float = 1.0,
    checkpointer: Checkpointer | None = None,
    on_metrics: MetricsCallback | None = None,
    name: str = "squeeze-distill",
) -> tuple[Backbone, dict[str, Any]]:
    """FitNet-distil ``teacher`` into a fresh ``student_arch`` backbone; returns it (on CPU)
    and its metrics (parameter counts, validation objective before and after)."""
    torch.manual_seed(seed)
    student = create_backbone(student_arch)
    check_student_size(student, teacher, student_arch)
    pretrained = {}
    if cfg.student_pretrained_path:
        pretrained = init_from_pretrained(student, cfg.student_pretrained_path).params()
    objective = DistillationObjective(
        teacher,
        student,
        cfg.levels,
        cfg.task_loss_weight,
        hints=hints,
        hint_weight=hint_weight,
        target_weights=cfg.target_weights,
    )
    metrics = train_objective(
        objective, streams, cfg, engine_cfg, seed, name, checkpointer, on_metrics
    )
    metrics |= {
        "method": "distill",
        "student": student_arch,
        "student_parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher.trunk),
        "hints": sorted(objective.hints),
        **pretrained,
    }
    return student.cpu().eval(), metrics
