"""The schema of a source version's ``manifest.json`` (written by :mod:`xlearner.data.ingest`).

A manifest lists its shards by file name relative to its own folder, with their sha256,
record count and bytes; the class list and per-split class counts; the content hash of
data + labels (``version`` = its first 16 hex digits) and the skipped records. Readers
validate it with :class:`Manifest` (:func:`xlearner.data.shards.load_manifest`); fields
a newer writer adds are kept.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from xlearner.tasks import SourceFormat

MANIFEST_FORMAT = "xlearner-manifest/1"


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")


class Shard(_Part):
    file: str  # relative to the manifest's folder, e.g. ``train-000000.tar``
    records: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SplitInfo(_Part):
    records: int = Field(ge=0)
    image_bytes: int = Field(ge=0)
    class_counts: list[int]
    shards: list[Shard]


class Splits(_Part):
    train: SplitInfo
    val: SplitInfo


class SplitParams(_Part):
    val_fraction: float
    seed: int


class SkippedRecord(_Part):
    file: str
    message: str


class Manifest(_Part):
    format_version: Literal["xlearner-manifest/1"]
    name: str
    format: SourceFormat
    source_uri: str
    version: str
    content_hash: str
    classes: list[str]
    num_classes: int = Field(ge=0)
    split: SplitParams
    image_size: int | None
    max_side: int | None = None  # images downscaled to this longer side at ingest (if set)
    splits: Splits
    skipped: list[SkippedRecord]
    created_at: str

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.num_classes != len(self.classes):
            raise ValueError(f"num_classes {self.num_classes} but {len(self.classes)} classes")
        for split in ("train", "val"):
            counts = getattr(self.splits, split).class_counts
            if len(counts) != self.num_classes:
                raise ValueError(
                    f"splits.{split}.class_counts has {len(counts)} entries, "
                    f"not one per class ({self.num_classes})"
                )
        return self
