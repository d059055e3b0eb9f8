"""Ingest: validate a source, split it, pack it into shards, publish a versioned manifest.

One pass over the source: every record is read and validated once (see
:mod:`xlearner.data.formats`), hashed, assigned to train or val by a hash of its path,
and appended to a local staging shard. The version is the content hash of everything
that determines the shards (data, labels, split and packing parameters), so it is known
only at the end; then the shards are published with atomic uploads and the manifest
last: its presence means the version is complete. An existing manifest makes the
ingest a no-op.

Shards are WebDataset-style tars (``train-000000.tar``, ...): per sample
``<key>.<jpg|png>`` (the original encoded bytes), ``<key>.json`` (the label record) and,
for segmentation, ``<key>.mask.png``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from xlearner.config import DownstreamConfig, SourceConfig, SourceFormat
from xlearner.data.formats import Record, SourceReader
from xlearner.store import ArtifactStore, S3Store, join

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "xlearner-manifest/1"
SPLITS = ("train", "val")
PROGRESS_EVERY_S = 5.0


def source_prefix(name: str, version: str | None = None) -> str:
    return join("sources", name, version or "")


def manifest_key(name: str, version: str) -> str:
    """Store key of a version's manifest (``sources/<name>/<version>/manifest.json``)."""
    return join(source_prefix(name, version), "manifest.json")


def split_of(file: str, val_fraction: float, seed: int) -> str:
    """``val`` for a stable pseudo-random ``val_fraction`` of files, by a hash of the path.

    Each file's split depends only on its own path, so adding or removing files never
    moves the others.
    """
    digest = hashlib.sha256(f"{seed}:{file}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def class_counts(format: SourceFormat, label: dict[str, Any]) -> list[int]:
    """Class indices a record counts for (images per class; boxes per class for det)."""
    if format == SourceFormat.cls:
        return [label["label"]]
    if format == SourceFormat.multilabel:
        return label["labels"]
    if format == SourceFormat.det:
        return label["labels"]
    if format == SourceFormat.seg:
        return label["classes"]
    return []


def downscale(record: Record, image_size: int) -> Record:
    """Shrink a record whose shorter side exceeds ``2 * image_size`` (re-encoded).

    The loader resizes to ``image_size`` anyway; this only saves bytes and decode time
    for large sources. Boxes are scaled, masks resized with NEAREST.
    """
    shorter = min(record.width, record.height)
    if shorter <= 2 * image_size:
        return record
    scale = image_size / shorter
    size = (max(1, round(record.width * scale)), max(1, round(record.height * scale)))
    with Image.open(io.BytesIO(record.data)) as image:
        small = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    data = _encode(small, record.image_format)
    mask = record.mask
    if mask is not None:
        with Image.open(io.BytesIO(mask)) as m:
            mask = _encode(m.resize(size, Image.Resampling.NEAREST), "png")
    label = dict(record.label)
    if "boxes" in label:
        sx, sy = size[0] / record.width, size[1] / record.height
        label["boxes"] = [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in label["boxes"]]
    sha = hashlib.sha256(data).hexdigest()
    return Record(record.file, label, data, record.image_format, size[0], size[1], mask, sha)


def _encode(image: Image.Image, image_format: str) -> bytes:
    out = io.BytesIO()
    if image_format == "jpg":
        image.save(out, format="JPEG", quality=92)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


class ShardWriter:
    """Writes one split's samples into tars of about ``shard_bytes`` each, reproducibly."""

    def __init__(self, folder: Path, split: str, shard_bytes: int):
        self.folder, self.split, self.shard_bytes = folder, split, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.records = 0
        self.bytes = 0
        self._tar: tarfile.TarFile | None = None
        self._current: dict[str, Any] = {}

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, record: Record, label_json: bytes) -> None:
        size = len(record.data) + len(label_json) + len(record.mask or b"") + 3 * 512
        if self._tar is not None and self._current["bytes"] + size > self.shard_bytes:
            self._close()
        if self._tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._current = {"file": name, "records": 0, "bytes": 0}
            self._tar = tarfile.open(  # noqa: SIM115 - stays open across write() calls
                self.folder / name, "w", format=tarfile.USTAR_FORMAT
            )
        key = f"{self.records:09d}"
        self._add(f"{key}.{record.image_format}", record.data)
        self._add(f"{key}.json", label_json)
        if record.mask is not None:
            self._add(f"{key}.mask.png", record.mask)
        self._current["records"] += 1
        self._current["bytes"] += size
        self.records += 1
        self.bytes += len(record.data)

    def _close(self) -> None:
        self._tar.close()
        self._tar = None
        path = self.folder / self._current["file"]
        self.shards.append(
            {
                "file": self._current["file"],
                "records": self._current["records"],
                "bytes": path.stat().st_size,
            }
        )

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._close()
        return self.shards


@dataclass
class Progress:
    """Throughput/ETA log lines at most every ``PROGRESS_EVERY_S`` seconds."""

    name: str
    total: int
    log: Callable[[str], None]
    done: int = 0
    bytes: int = 0
    start: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)

    def update(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or self.done == self.total:
            self.last = now
            self.log(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate else float("inf")
        return (
            f"ingest {self.name}: {self.done}/{self.total} images "
            f"({100 * self.done / max(self.total, 1):.0f}%), "
            f"{rate:.0f} images/s, {self.bytes / elapsed / 2**20:.1f} MB/s, ETA {eta:.1f} s"
        )


def ingest_source(
    source: SourceConfig | DownstreamConfig,
    store: ArtifactStore,
    *,
    image_size: int | None = None,
    shard_bytes: int = 128 * 2**20,
    log: Callable[[str], None] = logger.info,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Validate, split, shard and publish ``source`` to ``store``; returns the manifest.

    ``image_size``: when given, images whose shorter side exceeds twice this are
    downscaled at ingest (part of the version). ``endpoint_url``: the S3 endpoint of
    an ``s3://`` source; default: the store's.
    """
    if endpoint_url is None and isinstance(store, S3Store):
        endpoint_url = store.endpoint_url
    skip_invalid = getattr(source, "skip_invalid", False)
    reader = SourceReader(source.uri, source.format, endpoint_url)
    params = {
        "format": source.format.value,
        "classes": reader.classes,
        "val_fraction": source.val_fraction,
        "split_seed": source.split_seed,
        "image_size": image_size,
        "manifest_format": MANIFEST_FORMAT,
    }
    content = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    num_classes = len(reader.classes)
    counts = {s: [0] * num_classes for s in SPLITS}
    progress = Progress(source.name, len(reader.entries), log)
    log(
        f"ingest {source.name}: {len(reader.entries)} images "
        f"from {source.uri} ({source.format.value})"
    )

    with tempfile.TemporaryDirectory(prefix="xlearner-ingest-") as staging:
        writers = {s: ShardWriter(Path(staging), s, shard_bytes) for s in SPLITS}
        for record in reader.records(skip_invalid):
            if image_size is not None:
                record = downscale(record, image_size)
            split = split_of(record.file, source.val_fraction, source.split_seed)
            label_json = json.dumps(
                {
                    "file": record.file,
                    "width": record.width,
                    "height": record.height,
                    **record.label,
                },
                sort_keys=True,
            ).encode()
            content.update(f"{record.file}\0{record.sha256}\0".encode())
            if record.mask is not None:
                content.update(hashlib.sha256(record.mask).hexdigest().encode())
            content.update(label_json + b"\n")
            writers[split].write(record, label_json)
            for c in class_counts(source.format, record.label):
                counts[split][c] += 1
            progress.update(len(record.data))
        shards = {s: w.close() for s, w in writers.items()}
        content_hash = content.hexdigest()
        version = content_hash[:16]
        prefix = source_prefix(source.name, version)
        key = manifest_key(source.name, version)
        if store.exists(key):
            log(f"ingest {source.name}: version {version} is already published; nothing to do")
            return store.read_json(key)
        for split in SPLITS:
            if not shards[split]:
                log(f"ingest {source.name}: warning: the {split} split is empty")
            for shard in shards[split]:
                shard["sha256"] = store.upload_file(
                    join(prefix, shard["file"]), Path(staging) / shard["file"]
                )
    manifest = {
        "format_version": MANIFEST_FORMAT,
        "name": source.name,
        "format": source.format.value,
        "source_uri": source.uri,
        "version": version,
        "content_hash": content_hash,
        "classes": reader.classes,
        "num_classes": num_classes,
        "split": {"val_fraction": source.val_fraction, "seed": source.split_seed},
        "image_size": image_size,
        "splits": {
            s: {
                "records": writers[s].records,
                "image_bytes": writers[s].bytes,
                "class_counts": counts[s],
                "shards": shards[s],
            }
            for s in SPLITS
        },
        "skipped": [{"file": p.file, "message": p.message} for p in reader.problems],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.write_json(key, manifest)  # last: its presence = published
    store.write_json(
        join(source_prefix(source.name), "latest.json"), {"version": version, "manifest": key}
    )
    elapsed = time.monotonic() - progress.start
    log(
        f"ingest {source.name}: published version {version} ({progress.done} images, "
        f"{sum(len(v) for v in shards.values())} shards, {len(reader.problems)} skipped) "
        f"in {elapsed:.1f} s = {progress.done / max(elapsed, 1e-9):.0f} images/s"
    )
    return manifest
