"""The schema of a source version's ``manifest.json`` (written by :mod:`xlearner.data.ingest`).

A manifest lists its shards by file name relative to its own folder, with their sha256,
record count and bytes; the class list and per-split class counts; the content hash of
data + labels (``version`` = its first 16 hex digits) and the skipped records. Readers
validate it with :class:`Manifest` (:func:`xlearner.data.shards.load_manifest`); fields
a newer writer adds are kept.

Ingest seals the manifest (:func:`seal`): ``seal`` holds the sha256 of each other field,
so a manifest edited after ingest (its class list, a shard's hash) is refused naming the
field that changed (:func:`seal_problems`) instead of training on labels that no longer
match the shards.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

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


SEAL = "seal"
REINGEST = (
    "re-ingest the source: xlearner run publishes the version again "
    "(or delete the version's folder and run xlearner stage ingest)"
)


def _field_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its :data:`SEAL`: the sha256 of each other field's JSON."""
    fields = {k: _field_sha256(v) for k, v in manifest.items() if k != SEAL}
    return {**manifest, SEAL: fields}


def seal_problems(manifest: dict[str, Any], key: str) -> list[str]:
    """How the published ``manifest`` at store ``key`` differs from what ingest sealed:
    each edited, added or removed field, a version that is not its content hash's or not
    its folder's; empty when it is intact."""
    sealed = manifest.get(SEAL)
    if not isinstance(sealed, dict):
        return [f"field {SEAL!r} is missing (not written by this ingest, or edited); {REINGEST}"]
    fields = {k for k in manifest if k != SEAL}
    changed = sorted(
        k for k in fields | set(sealed) if sealed.get(k) != _field_sha256(manifest.get(k))
    )
    problems = [
        f"field {k!r} was {'removed' if k not in manifest else 'edited'} after ingest "
        f"(it no longer matches its {SEAL!r}: the shards' labels were written for the "
        f"sealed one); {REINGEST}"
        for k in changed
    ]
    version, content_hash = manifest.get("version"), manifest.get("content_hash")
    if not isinstance(content_hash, str) or version != content_hash[:16]:
        problems.append(f"field 'version' {version!r} is not the start of its content_hash")
    folder = key.rpartition("/")[0].rpartition("/")[2]
    if folder and folder != version:
        problems.append(f"field 'version' {version!r} is not its folder's name {folder!r}")
    return problems
