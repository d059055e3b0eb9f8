"""``ShardDataset``: a map-style dataset over the shards of a published manifest.

Shards are downloaded once into the content-addressed cache
(:meth:`ArtifactStore.local_copy` with the manifest's sha256) and indexed by member
offsets, so any sample is read with one positional read, without extracting the tar.

Images are decoded where the sample is loaded (PIL, ``__getitem__``), or left encoded
(:meth:`ShardDataset.encoded_item`) for :func:`xlearner.data.decode.decode_batch` to
decode, crop, flip and resize a whole batch on the GPU (nvjpeg) with the same
augmentation (:mod:`xlearner.data.augment`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from torch.utils.data import Dataset

from xlearner.data.augment import (
    FULL_VIEW,
    View,
    hflip,
    hflip_target,
    random_view,
    sample_seed,
    view_boxes,
    view_pixels,
)
from xlearner.data.decode import EncodedBatch, EncodedImage
from xlearner.data.ingest import MANIFEST_FORMAT, SPLITS
from xlearner.data.manifest import Manifest, seal_problems
from xlearner.store import ArtifactNotFound, StoreError, join, resolve
from xlearner.tasks import SourceFormat, label_format

IMAGE_MEMBERS = ("jpg", "png")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names its URI and the fix."""


def load_manifest(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """Read and check a ``manifest.json`` (local path or ``s3://``)."""
    store, key = resolve(uri, endpoint_url)
    try:
        manifest = store.read_json(key)
    except ArtifactNotFound:
        raise ManifestError(
            f"manifest {uri} does not exist; ingest the source first (xlearner stage ingest) "
            "and pass the URI of its manifest.json"
        ) from None
    except StoreError as err:
        raise ManifestError(f"manifest {uri} cannot be read: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != MANIFEST_FORMAT:
        found = (
            manifest.get("format_version")
            if isinstance(manifest, dict)
            else type(manifest).__name__
        )
        raise ManifestError(
            f"{uri} is not an xlearner manifest "
            f"(format_version {found!r}, expected {MANIFEST_FORMAT!r})"
        )
    missing = [k for k in ("format", "classes", "splits", "version") if k not in manifest]
    if missing:
        raise ManifestError(f"manifest {uri} lacks the fields {missing}; re-ingest the source")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors()
        )
        raise ManifestError(
            f"manifest {uri} is malformed ({problems}); re-ingest the source"
        ) from None
    if problems := seal_problems(manifest, uri):
        raise ManifestError(f"manifest {uri}: " + "; ".join(problems))
    return manifest


def index_tar(path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """Samples of a WebDataset tar in order: ``{member suffix: (data offset, size)}``.

    The key is the member name up to its first dot, the suffix the rest (``jpg``,
    ``json``, ``mask.png``).
    """
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = Path(member.name).name.partition(".")
            samples.setdefault(key, {})[suffix] = (member.offset_data, member.size)
    return list(samples.values())


class ShardDataset(Dataset):
    """``(image [3, S, S] float in [0, 1], target)`` pairs of one split of a manifest.

    ``train=True`` draws a crop window and a flip (:func:`random_view`) from (``seed``,
    epoch, index), so an epoch is reproducible: call :meth:`set_epoch` at the start of every
    epoch (the engine does, per sample, in every worker, with a seed derived from the
    pipeline's ``seed``).
    """

    def __init__(
        self,
        manifest_uri: str,
        split: str,
        image_size: int,
        train: bool = False,
        endpoint_url: str | None = None,
        cache_dir: str | Path | None = None,
        seed: int = 0,
    ):
        self._files: dict[int, int] = {}  # shard index -> open file descriptor
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.manifest_uri = manifest_uri
        self.manifest = load_manifest(manifest_uri, endpoint_url)
        self.split = split
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.format = SourceFormat(self.manifest["format"])
        self.classes: list[str] = list(self.manifest["classes"])
        store, manifest_key = resolve(manifest_uri, endpoint_url)
        folder = manifest_key.rpartition("/")[0]
        self.shard_paths: list[str] = []
        self.samples: list[tuple[int, dict[str, tuple[int, int]]]] = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = store.local_copy(join(folder, shard["file"]), cache_dir, sha256=shard["sha256"])
            members = index_tar(path)
            if len(members) != shard["records"]:
                raise ManifestError(
                    f"{manifest_uri}: shard {shard['file']} holds {len(members)} samples, "
                    f"the manifest says {shard['records']}; re-ingest the source"
                )
            self.samples += [(len(self.shard_paths), m) for m in members]
            self.shard_paths.append(str(path))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Augment as in ``epoch`` from now on (and with ``seed``, when given)."""
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}  # file descriptors stay with their process
        return state

    def _read(self, shard: int, span: tuple[int, int]) -> bytes:
        # os.pread: no shared file offset, so descriptors inherited by forked
        # DataLoader workers are safe to use concurrently.
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.shard_paths[shard], os.O_RDONLY)
        offset, size = span
        chunks = []
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:
                raise ManifestError(
                    f"{self.shard_paths[shard]}: unexpected end of shard; delete it from the cache"
                )
            chunks.append(chunk)
            offset, size = offset + len(chunk), size - len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files = {}

    def __del__(self) -> None:
        self.close()

    def raw(self, index: int) -> tuple[bytes, dict[str, Any], bytes | None]:
        """The stored image bytes, label record and mask bytes of a sample."""
        shard, members = self.samples[index]
        image_member = next(m for m in IMAGE_MEMBERS if m in members)
        data = self._read(shard, members[image_member])
        label = json.loads(self._read(shard, members["json"]))
        mask = self._read(shard, members["mask.png"]) if "mask.png" in members else None
        return data, label, mask

    def view(self, index: int) -> tuple[View, bool]:
        """The crop window and flip of sample ``index`` in the current epoch."""
        if not self.train:
            return FULL_VIEW, False
        return random_view(sample_seed(self.seed, self.epoch, index))

    def _decode(self, image: Image.Image, view: View) -> torch.Tensor:
        """``[3, S, S]`` uint8: the view of an opened image, resized (not flipped)."""
        size = self.image_size
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # decode big JPEGs at a reduced scale
        rgb = image.convert("RGB").resize(
            (size, size), Image.Resampling.BILINEAR, box=view_pixels(view, *image.size)
        )
        return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        data, label, mask_bytes = self.raw(index)
        view, flip = self.view(index)
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            img = self._decode(image, view).float().div_(255)
        target = self._target(label, mask_bytes, width, height, view)
        return hflip(img, target) if flip else (img, target)

    def encoded_item(self, index: int) -> tuple[EncodedImage, dict[str, torch.Tensor]]:
        """Sample ``index`` with its image left encoded (JPEG) for :func:`decode_batch`.

        The target is final (cropped, resized and flipped as in ``__getitem__``); images
        that are not JPEG (PNG) are decoded here, as nvjpeg cannot.
        """
        data, label, mask_bytes = self.raw(index)
        view, flip = self.view(index)
        item = EncodedImage(self.image_size, view, flip)
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if image.format == "JPEG":
                item.jpeg = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                item.pixels = self._decode(image, view)
        target = self._target(label, mask_bytes, width, height, view)
        return item, hflip_target(target, self.image_size) if flip else target

    def _target(
        self,
        label: dict[str, Any],
        mask_bytes: bytes | None,
        width: int,
        height: int,
        view: View = FULL_VIEW,
    ) -> dict[str, torch.Tensor]:
        size = self.image_size
        if self.format == SourceFormat.cls:
            return {"label": torch.tensor(label["label"], dtype=torch.int64)}
        if self.format == SourceFormat.multilabel:
            hot = torch.zeros(self.num_classes, dtype=torch.float32)
            hot[label["labels"]] = 1.0
            return {"labels": hot}
        if self.format == SourceFormat.det:
            boxes = torch.tensor(label["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor(label["labels"], dtype=torch.int64)
            difficult = label.get("difficult")  # voc_det: kept for the VOC AP50
            if difficult is not None:
                difficult = torch.tensor(difficult, dtype=torch.bool)
            return view_boxes(
                boxes / torch.tensor([width, height] * 2), labels, view, size, difficult
            )
        if self.format == SourceFormat.seg:
            with Image.open(io.BytesIO(mask_bytes)) as mask:
                resized = mask.resize(
                    (size, size), Image.Resampling.NEAREST, box=view_pixels(view, *mask.size)
                )
            return {"mask": torch.from_numpy(np.asarray(resized, dtype=np.int64).copy())}
        return {}


def _stack_images(images: list) -> torch.Tensor | EncodedBatch:
    if images and isinstance(images[0], EncodedImage):
        return EncodedBatch(images)
    return torch.stack(images)


def _collate_stacked(
    batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor | EncodedBatch, dict[str, torch.Tensor]]:
    images = _stack_images([img for img, _ in batch])
    keys = batch[0][1].keys()
    return images, {k: torch.stack([t[k] for _, t in batch]) for k in keys}


def _collate_listed(
    batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor | EncodedBatch, list[dict[str, torch.Tensor]]]:
    return _stack_images([img for img, _ in batch]), [t for _, t in batch]


def collate_fn(format: SourceFormat | str) -> Callable:
    """The batch collation of a format: stacked targets, or a list of dicts for det."""
    return _collate_listed if label_format(format) == SourceFormat.det else _collate_stacked
