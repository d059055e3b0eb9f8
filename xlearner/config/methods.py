"""The sections of the stages after expansion: reconciliation, squeeze, transfer evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from xlearner.config.base import (
    NAME_PATTERN,
    PRETRAINED_HELP,
    StrictModel,
    pretrained_file,
    registered_backbone,
)
from xlearner.config.training import TrainConfig
from xlearner.tasks import TaskType


class ReconcileConfig(StrictModel):
    mode: Literal["full", "same_level", "none"] = Field(
        default="full",
        description="full: gamma from the same and all lower levels of every task; "
        "same_level: only j == i (ablation); none: no reconciliation layers.",
    )
    detach_other_tasks: bool = True
    receive_stages: list[int] = Field(
        default=[1, 2, 3],
        description="Stages i (1..4 = C2..C5) that receive gammas. Default 1-3, as the public "
        "cross-task layers this design follows (gv-benchmark's Cross_Conv_HRNet_Layer): with "
        "ResNet-50 sub-backbones the gammas into stage 4 (2048 channels, 3x3 stride-2 convs "
        "from every task's lower levels) are 80% of the conv gamma parameters (four tasks: "
        "794 M with stage 4, 158 M without, beside 94 M of sub-backbones). 4 stays selectable.",
    )
    gamma: Literal["conv", "light"] = Field(
        default="conv",
        description="conv: a strided 3x3 chain into a higher stage (gv-benchmark, HRNet-style); "
        "light: average-pool to the target stride, then 1x1 conv + BN (about 1/5 of the conv "
        "gamma parameters for ResNet-50 into stages 1-3). Both: 1x1 conv + BN within a stage, "
        "last BN zero-initialised (the expanded model starts as the sub-backbones).",
    )
    r_sub_backbone: str = Field(
        default="half_resnet50",
        description="The sub-backbones of variant xlearner_r (the paper's X-Learner_r: "
        "HalfResNet-50); its student stays the configured one (squeeze.student or "
        "model.backbone).",
    )
    max_gamma_ratio: float | None = Field(
        default=None,
        gt=0,
        description="Cap on gamma cost / sub-backbones' cost, the larger of the parameter "
        "and the per-image FLOP ratio (at model.image_size), checked before training; the "
        "error lists the options that fit. None: no cap.",
    )
    train: TrainConfig = TrainConfig(steps=200)

    @field_validator("r_sub_backbone")
    @classmethod
    def _known_sub_backbone(cls, name: str) -> str:
        return registered_backbone(name)

    @field_validator("receive_stages")
    @classmethod
    def _stages_in_range(cls, stages: list[int]) -> list[int]:
        bad = [s for s in stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"receive_stages must be within 1..4 (C2..C5); got {bad}")
        return sorted(set(stages))


class HintCheckpoint(StrictModel):
    """An external X-Learner++ hint: a pre-trained backbone from a local file."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str = Field(description=PRETRAINED_HELP)
    backbone: str | None = Field(
        default=None, description="Its architecture; default: model.backbone"
    )

    @field_validator("path")
    @classmethod
    def _weights_file(cls, path: str) -> str:
        return pretrained_file(path)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str | None) -> str | None:
        return None if name is None else registered_backbone(name)


class SqueezeConfig(StrictModel):
    method: Literal["distill", "prune"] = "distill"
    student: str | None = Field(
        default=None, description="Student backbone; default: model.backbone"
    )
    student_pretrained_path: str | None = Field(
        default=None,
        description=f"Initialise the distillation student from this file; None: random "
        f"init. {PRETRAINED_HELP}",
    )
    levels: list[int] = Field(default=[4], description="Feature levels matched (1..4 = C2..C5)")
    task_loss_weight: float = Field(default=0.0, ge=0)
    target_weights: dict[TaskType, float] = Field(
        default_factory=dict,
        description="Weight of each task's sub-backbone in the FitNet sum (default 1 each), "
        "e.g. {mim: 0.5, contrastive: 0.5}",
    )
    hints: list[HintCheckpoint] = Field(
        default_factory=list,
        description="X-Learner++ only (variant xlearner_pp): extra hint backbones from local "
        "weight files, matched by the student beside the single-source experts.",
    )
    hint_weight: float = Field(
        default=1.0, ge=0, description="Weight of the hint matching loss (X-Learner++)"
    )
    train: TrainConfig = TrainConfig(steps=200)

    @field_validator("hints")
    @classmethod
    def _distinct_hints(cls, hints: list[HintCheckpoint]) -> list[HintCheckpoint]:
        names = [h.name for h in hints]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"hint names must be distinct; repeated: {dupes}")
        return hints

    @field_validator("levels")
    @classmethod
    def _levels_in_range(cls, levels: list[int]) -> list[int]:
        bad = [s for s in levels if s not in (1, 2, 3, 4)]
        if bad or not levels:
            raise ValueError(f"levels must be a non-empty subset of 1..4 (C2..C5); got {levels}")
        return sorted(set(levels))

    @field_validator("target_weights")
    @classmethod
    def _non_negative(cls, weights: dict[TaskType, float]) -> dict[TaskType, float]:
        negative = sorted(t.value for t, w in weights.items() if w < 0)
        if negative:
            raise ValueError(f"weights must be >= 0; negative for {negative}")
        return weights

    @field_validator("student_pretrained_path")
    @classmethod
    def _pretrained_suffix(cls, path: str | None) -> str | None:
        return pretrained_file(path)

    @field_validator("student")
    @classmethod
    def _known_student(cls, name: str | None) -> str | None:
        return None if name is None else registered_backbone(name)


class TransferConfig(StrictModel):
    """The transfer protocols (docs/transfer.md)."""

    cls_protocol: Literal["linear_probe", "finetune"] = Field(
        default="linear_probe",
        description="classification sets: a linear probe on frozen features, or a full "
        "fine-tune of the backbone with a new head (the `finetune` budget, as det/seg)",
    )
    probe_level: Literal["C2", "C3", "C4", "C5"] = Field(
        default="C5", description="the feature level the linear probe reads (pooled)"
    )
    probe_l2: list[float] = Field(default=[1e-4, 1e-3, 1e-2, 1e-1])
    probe_max_iter: int = Field(default=200, ge=1)
    finetune: TrainConfig = TrainConfig(steps=100)
    eval_max_images: int | None = Field(
        default=None,
        ge=1,
        description="fine-tuned sets (det, seg, cls fine-tune): score at most this many val "
        "images; null = the whole val split. The report says where it cuts.",
    )
    voc_ap: Literal["all_points", "11_points"] = Field(
        default="all_points",
        description="the interpolation of the detection AP50 (PASCAL VOC protocol): the "
        "area under the curve (VOC2010+) or VOC2007's 11 points",
    )
