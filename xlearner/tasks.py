"""The task vocabulary: source formats, task types and the constants every layer shares.

A leaf module (no xlearner imports): the config, the data readers and the models all
speak these words, and none of them has to import another to do so.
"""

from __future__ import annotations

from enum import StrEnum


class SourceFormat(StrEnum):
    """On-disk layout of a source (see docs/data.md)."""

    cls = "cls"
    multilabel = "multilabel"
    det = "det"
    seg = "seg"
    unlabeled = "unlabeled"
    # Layouts of public data sets, ingested as the label format of LAYOUT_LABELS:
    voc_det = "voc_det"  # PASCAL VOC detection (Annotations/*.xml)
    voc_seg = "voc_seg"  # PASCAL VOC segmentation (SegmentationClass/*.png)
    csv_cls = "csv_cls"  # a file,label list over an image folder (iNat, Places)


LAYOUT_LABELS = {
    SourceFormat.voc_det: SourceFormat.det,
    SourceFormat.voc_seg: SourceFormat.seg,
    SourceFormat.csv_cls: SourceFormat.cls,
}
"""A data set's own layout -> the label format its records, shards and heads use."""


def label_format(format: SourceFormat | str) -> SourceFormat:
    """The label format of a source format (itself, or what its layout is ingested as)."""
    format = SourceFormat(format)
    return LAYOUT_LABELS.get(format, format)


class TaskType(StrEnum):
    """A task: each gets its own sub-backbone in the expansion stage."""

    cls = "cls"
    multilabel = "multilabel"
    det = "det"
    seg = "seg"
    mim = "mim"
    contrastive = "contrastive"


SELF_SUPERVISED = frozenset({TaskType.mim, TaskType.contrastive})
"""Tasks that need no labels: any source can feed them (docs/ssl.md)."""

LABEL_TASK_OF_FORMAT = {
    SourceFormat.cls: TaskType.cls,
    SourceFormat.multilabel: TaskType.multilabel,
    SourceFormat.det: TaskType.det,
    SourceFormat.seg: TaskType.seg,
    SourceFormat.voc_det: TaskType.det,
    SourceFormat.voc_seg: TaskType.seg,
    SourceFormat.csv_cls: TaskType.cls,
}
"""The supervised task a source's labels feed (an unlabeled source has none)."""

IGNORE_INDEX = 255
"""Segmentation mask value of a pixel without a label."""

# Images are [0, 1] RGB; the backbone's stem normalises them with these (docs/architecture.md).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
