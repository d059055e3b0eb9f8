"""The data sections: the sources and downstream sets, how they are ingested, synthetic data."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from xlearner.config.base import NAME_PATTERN, LocalOrS3, StrictModel
from xlearner.tasks import LABEL_TASK_OF_FORMAT, SELF_SUPERVISED, SourceFormat, TaskType


class SourceConfig(StrictModel):
    """One labelled (or unlabelled) data set. ``uri`` is a local folder or ``s3://``."""

    name: str = Field(pattern=NAME_PATTERN)
    format: SourceFormat
    uri: LocalOrS3
    tasks: list[TaskType] | None = Field(
        default=None,
        description="Tasks this source feeds; default: the task of its label type "
        "(mim + contrastive for an unlabeled source).",
    )
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    skip_invalid: bool = False
    loss_weight: float = Field(default=1.0, gt=0.0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _check_tasks(self) -> SourceConfig:
        tasks = self.resolved_tasks
        label_task = LABEL_TASK_OF_FORMAT.get(self.format)
        for task in tasks:
            if task not in SELF_SUPERVISED and task != label_task:
                allowed = sorted(
                    {*(t.value for t in SELF_SUPERVISED), *([label_task] if label_task else [])}
                )
                raise ValueError(
                    f"source {self.name!r} has format {self.format.value!r} and cannot feed task "
                    f"{task.value!r}; allowed: {allowed}"
                )
        return self

    @property
    def resolved_tasks(self) -> list[TaskType]:
        if self.tasks is not None:
            return list(self.tasks)
        if self.format == SourceFormat.unlabeled:
            return [TaskType.mim, TaskType.contrastive]
        return [LABEL_TASK_OF_FORMAT[self.format]]


class DownstreamConfig(StrictModel):
    """A held-out data set used only to evaluate transfer."""

    name: str = Field(pattern=NAME_PATTERN)
    format: Literal[
        SourceFormat.cls,
        SourceFormat.det,
        SourceFormat.seg,
        SourceFormat.voc_det,
        SourceFormat.voc_seg,
        SourceFormat.csv_cls,
    ]
    uri: LocalOrS3
    val_fraction: float = Field(default=0.3, gt=0.0, lt=1.0)
    split_seed: int = 0


def _place(uri: str) -> str:
    """Where a source is, comparable by prefix: s3://bucket/prefix/ or an absolute path/."""
    place = uri.rstrip("/") if uri.startswith("s3://") else str(Path(uri).expanduser().resolve())
    return os.path.join(place, "")


def check_held_out(sources: Sequence[SourceConfig], downstream: Sequence[DownstreamConfig]) -> None:
    """ValueError if a downstream set's folder is, contains or lies inside a training
    source's folder: evaluating on images the backbone trained on (a train/test leak).
    Shared files in different folders are found by content after ingest
    (:func:`xlearner.data.held_out.check_held_out_content`)."""
    for held_out in downstream:
        for source in sources:
            a, b = _place(held_out.uri), _place(source.uri)
            if a.startswith(b) or b.startswith(a):
                raise ValueError(
                    f"downstream {held_out.name!r} ({held_out.uri}) and training source "
                    f"{source.name!r} ({source.uri}) share a folder: transfer would be "
                    "evaluated on images the backbone trained on; give the downstream set a "
                    "folder of its own"
                )


class IngestConfig(StrictModel):
    """How sources are packed into shards (docs/data.md, "Ingest")."""

    max_side: int | None = Field(
        default=None,
        ge=32,
        le=65_535,
        description="re-encode images whose longer side exceeds this to that side (boxes "
        "scaled, masks NEAREST), so shards decode faster; e.g. 320 for 224 px training. "
        "None: keep the images as they are. Part of the version.",
    )


class SynthConfig(StrictModel):
    """Synthetic sources generated on first use (the quick start and the tests)."""

    enabled: bool = False
    out: str = ".xlearner/data"
    seed: int = 0
    images_per_source: int = Field(default=240, ge=8, le=1_000_000)
    image_size: int = Field(default=64, ge=32, le=1024)
