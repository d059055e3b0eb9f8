"""Ingest: validate a source, split it, pack it into shards, publish a versioned manifest.

One pass over the source: every record is read and validated once (see
:mod:`xlearner.data.formats`), hashed, assigned to train or val by a hash of its path,
and appended to a staging shard (hashed as it is written; in a local store's own staging
folder, so that publishing it is a rename). The version is the content hash of everything
that determines the shards (data, labels, split and packing parameters), so it is known
only at the end; then, under the version's lease (one writer per version), the shards
are published with atomic uploads or renames and the manifest last: its presence means
the version is complete. An existing manifest makes the ingest a no-op. A file whose
sha256 the latest version lists (:func:`validated_before`) is not decoded again.

Shards are WebDataset-style tars (``train-000000.tar``, ...): per sample
``<key>.<jpg|png>`` (the original encoded bytes; re-encoded where
:mod:`xlearner.data.images` normalised them (EXIF orientation, 16 bit), or smaller with
``max_side`` / ``image_size``), ``<key>.json`` (the label record) and, for
segmentation, ``<key>.mask.png``. Beside them, ``files.sha256`` lists the sha256 of every
source file (the manifest records its own sha256): what
:mod:`xlearner.data.held_out` compares to keep the downstream sets held out.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from xlearner.config import DownstreamConfig, IngestConfig, SourceConfig
from xlearner.data.formats import Record, SourceReader
from xlearner.data.held_out import file_hashes
from xlearner.data.images import IMAGE_CHECKS
from xlearner.data.manifest import MANIFEST_FORMAT, seal, seal_problems
from xlearner.integrity import source_damage
from xlearner.lease import DEFAULT_WAIT_S, output_lease
from xlearner.progress import Progress
from xlearner.store import ArtifactNotFound, ArtifactStore, S3Store, StoreError, join
from xlearner.store_keys import manifest_key, source_latest, source_prefix
from xlearner.tasks import SourceFormat, label_format

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
FILE_HASHES = "files.sha256"  # per source file: "<sha256>  <file>", sorted (sha256sum's format)
PROGRESS_EVERY_S = 5.0


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


def downscale(record: Record, image_size: int | None = None, max_side: int | None = None) -> Record:
    """Shrink a record (re-encoded) whose shorter side exceeds ``2 * image_size`` (to
    ``image_size``) or whose longer side exceeds ``max_side`` (to ``max_side``); the
    smaller of the two when both apply. Other records are returned as they are.

    The loader resizes to the training size anyway; this saves bytes and decode time.
    Boxes are scaled with the image, masks resized with NEAREST.
    """
    scale = 1.0
    shorter, longer = min(record.width, record.height), max(record.width, record.height)
    if image_size is not None and shorter > 2 * image_size:
        scale = image_size / shorter
    if max_side is not None and longer > max_side:
        scale = min(scale, max_side / longer)
    if scale >= 1.0:
        return record
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
    return dataclasses.replace(  # keeps the file's hash and the layout's split
        record, label=label, data=data, width=size[0], height=size[1], mask=mask, sha256=sha
    )


def _encode(image: Image.Image, image_format: str) -> bytes:
    out = io.BytesIO()
    if image_format == "jpg":
        image.save(out, format="JPEG", quality=92)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


class ShardWriter:
    """Writes one split's samples into tars of about ``shard_bytes`` each, reproducibly.

    The bytes are those of :mod:`tarfile` (USTAR, mtime 0, mode 644; a test compares), but
    each member is one write, hashed as it is written, so a shard is never read back.
    """

    def __init__(self, folder: Path, split: str, shard_bytes: int):
        self.folder, self.split, self.shard_bytes = folder, split, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.records = 0
        self.bytes = 0
        self._file: BinaryIO | None = None
        self._current: dict[str, Any] = {}
        self._hash = hashlib.sha256()
        self._filled = 0  # the sizes of write() so far in this shard: where shards are cut

    def _put(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self._current["bytes"] += len(chunk)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        header = info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
        self._put(b"".join((header, data, tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))))

    def write(self, record: Record, label_json: bytes) -> None:
        size = len(record.data) + len(label_json) + len(record.mask or b"") + 3 * 512
        if self._file is not None and self._filled + size > self.shard_bytes:
            self._close()
        if self._file is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._current = {"file": name, "records": 0, "bytes": 0}
            self._file = open(self.folder / name, "wb")  # noqa: SIM115 - open across writes
            self._hash, self._filled = hashlib.sha256(), 0
        key = f"{self.records:09d}"
        self._add(f"{key}.{record.image_format}", record.data)
        self._add(f"{key}.json", label_json)
        if record.mask is not None:
            self._add(f"{key}.mask.png", record.mask)
        self._current["records"] += 1
        self._filled += size
        self.records += 1
        self.bytes += len(record.data)

    def _close(self) -> None:
        self._put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # the end of the archive
        self._put(tarfile.NUL * (-self._current["bytes"] % tarfile.RECORDSIZE))
        self._file.close()
        self._file = None
        self.shards.append({**self._current, "sha256": self._hash.hexdigest()})

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._close()
        return self.shards


def validated_before(
    store: ArtifactStore, name: str, log: Callable[[str], None] = logger.info
) -> frozenset[str]:
    """The sha256s of the source files that the latest published version of ``name``
    validated with the current image checks (:data:`IMAGE_CHECKS`): ingest reads only
    their headers. Trusted only through the records: the manifest's seal, then the
    ``files.sha256`` list against the sha256 the manifest records; anything else
    (no version, a damaged one, older checks) validates every file again."""
    try:
        key = store.read_json(source_latest(name))["manifest"]
        manifest = store.read_json(key)
        if seal_problems(manifest, key) or manifest.get("image_checks") != IMAGE_CHECKS:
            return frozenset()
        hashes = file_hashes(
            store.uri(key), store.endpoint_url if isinstance(store, S3Store) else None
        )
    except ArtifactNotFound:
        return frozenset()
    except (StoreError, KeyError, TypeError, AttributeError, ValueError) as err:
        log(f"ingest {name}: the latest version cannot be reused ({err}); checking every file")
        return frozenset()
    return frozenset(hashes or ())


def ingest_source(
    source: SourceConfig | DownstreamConfig,
    store: ArtifactStore,
    *,
    image_size: int | None = None,
    options: IngestConfig | None = None,
    shard_bytes: int = 128 * 2**20,
    log: Callable[[str], None] = logger.info,
    endpoint_url: str | None = None,
    workers: int | None = None,
    lease_wait_s: float = DEFAULT_WAIT_S,
    run: str | None = None,
) -> dict[str, Any]:
    """Validate, split, shard and publish ``source`` to ``store``; returns the manifest.

    ``image_size``: when given, images whose shorter side exceeds twice this are
    downscaled at ingest. ``options`` (the config's ``ingest`` section):
    ``max_side`` re-encodes images whose longer side exceeds it to that side. Both are
    part of the version. ``endpoint_url``: the S3 endpoint of an ``s3://`` source;
    default: the store's. ``workers``: threads reading and validating the images
    (:class:`SourceReader`'s default when None); the shards do not depend on it.

    The version's folder is published under its lease (:func:`output_lease`, owner
    ``run``): one writer per source version; another ingest of the same version waits up
    to ``lease_wait_s`` for it (then finds it published), or raises
    :class:`~xlearner.lease.LeaseHeld` naming the writer.
    """
    max_side = options.max_side if options is not None else None
    if endpoint_url is None and isinstance(store, S3Store):
        endpoint_url = store.endpoint_url
    skip_invalid = getattr(source, "skip_invalid", False)
    validated = validated_before(store, source.name, log)
    reader = SourceReader(source.uri, source.format, endpoint_url, workers, validated)
    params = {
        "format": source.format.value,
        "classes": reader.classes,
        "val_fraction": source.val_fraction,
        "split_seed": source.split_seed,
        "image_size": image_size,
        "manifest_format": MANIFEST_FORMAT,
    }
    if max_side is not None:  # absent when unset: earlier versions keep their hash
        params["max_side"] = max_side
    content = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    num_classes = len(reader.classes)
    counts = {s: [0] * num_classes for s in SPLITS}
    progress = Progress(len(reader.entries), clock=time.monotonic)
    layout_split = False  # whether the source's own lists or folders fixed the split
    hash_lines: list[str] = []  # "<sha256 of the source file>  <file>" (the held-out check)
    log(
        f"ingest {source.name}: {len(reader.entries)} images "
        f"from {source.uri} ({source.format.value})"
    )

    with store.staging() as staging:  # on a local store's file system: publish = rename
        writers = {s: ShardWriter(staging, s, shard_bytes) for s in SPLITS}
        shrink = (
            functools.partial(downscale, image_size=image_size, max_side=max_side)
            if image_size is not None or max_side is not None
            else None
        )
        for record in reader.records(skip_invalid, transform=shrink):  # shrunk in parallel
            split = record.split or split_of(record.file, source.val_fraction, source.split_seed)
            layout_split = layout_split or record.split is not None
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
            hash_lines.append(f"{record.file_sha256}  {record.file}\n")
            if record.split is not None:  # the layout's split lists are part of the version
                content.update(f"split={record.split}\0".encode())
            if record.mask is not None:
                content.update(hashlib.sha256(record.mask).hexdigest().encode())
            content.update(label_json + b"\n")
            writers[split].write(record, label_json)
            for c in class_counts(label_format(source.format), record.label):
                counts[split][c] += 1
            progress.update(items=1, nbytes=len(record.data))
            if progress.due(PROGRESS_EVERY_S):
                log(f"ingest {source.name}: {progress.line('images', with_bytes=True)}")
        shards = {s: w.close() for s, w in writers.items()}
        content_hash = content.hexdigest()
        version = content_hash[:16]
        prefix = source_prefix(source.name, version)
        key = manifest_key(source.name, version)
        lease_endpoint = store.endpoint_url if isinstance(store, S3Store) else None
        with output_lease(store.uri(prefix), lease_endpoint, run=run, wait_s=lease_wait_s):
            if store.exists(key):
                if not (damage := source_damage(store, key)):
                    log(
                        f"ingest {source.name}: version {version} is already published; "
                        "nothing to do"
                    )
                    return store.read_json(key)
                log(
                    f"ingest {source.name}: version {version} is damaged, publishing it "
                    "again: " + "; ".join(map(str, damage))
                )
            for split in SPLITS:
                if not shards[split]:
                    log(f"ingest {source.name}: warning: the {split} split is empty")
                for shard in shards[split]:
                    store.publish_file(
                        join(prefix, shard["file"]), staging / shard["file"], shard["sha256"]
                    )
            manifest = _publish_manifest(
                store,
                source,
                reader,
                version=version,
                content_hash=content_hash,
                hash_lines=hash_lines,
                layout_split=layout_split,
                image_size=image_size,
                max_side=max_side,
                splits={
                    s: {
                        "records": writers[s].records,
                        "image_bytes": writers[s].bytes,
                        "class_counts": counts[s],
                        "shards": shards[s],
                    }
                    for s in SPLITS
                },
            )
    log(
        f"ingest {source.name}: published version {version} ({progress.items} images, "
        f"{sum(len(v) for v in shards.values())} shards, {len(reader.problems)} skipped) "
        f"in {progress.elapsed:.1f} s = {progress.rate():.0f} images/s"
    )
    return manifest


def _publish_manifest(
    store: ArtifactStore,
    source: SourceConfig | DownstreamConfig,
    reader: SourceReader,
    *,
    version: str,
    content_hash: str,
    hash_lines: list[str],
    layout_split: bool,
    image_size: int | None,
    max_side: int | None,
    splits: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Write the version's file hashes, its sealed manifest (last but ``latest.json``: its
    presence = published) and ``latest.json``; returns the manifest."""
    prefix = source_prefix(source.name, version)
    hashes_sha256 = store.write_bytes(
        join(prefix, FILE_HASHES), "".join(sorted(hash_lines)).encode()
    )
    manifest = {
        "format_version": MANIFEST_FORMAT,
        "name": source.name,
        "format": label_format(source.format).value,
        "source_uri": source.uri,
        "version": version,
        "content_hash": content_hash,
        "classes": reader.classes,
        "num_classes": len(reader.classes),
        "split": {"val_fraction": source.val_fraction, "seed": source.split_seed}
        | ({"by": "layout"} if layout_split else {}),
        "image_size": image_size,
        "max_side": max_side,
        "splits": splits,
        "skipped": [{"file": p.file, "message": p.message} for p in reader.problems],
        "file_hashes": {"file": FILE_HASHES, "sha256": hashes_sha256},
        "image_checks": IMAGE_CHECKS,  # what validated the files: validated_before
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if source.format != label_format(source.format):
        manifest["layout"] = source.format.value  # e.g. voc_det, ingested as det
    manifest = seal(manifest)  # a later edit is refused where it is read
    key = manifest_key(source.name, version)
    store.write_json(key, manifest)  # last: its presence = published
    store.write_json(source_latest(source.name), {"version": version, "manifest": key})
    return manifest
