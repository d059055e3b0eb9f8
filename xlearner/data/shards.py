"""``ShardDataset``: a map-style dataset over the shards of a published manifest.

Shards are downloaded once into the content-addressed cache
(:meth:`ArtifactStore.local_copy` with the manifest's sha256) and indexed by member
offsets, so any sample is read with one positional read, without extracting the tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from xlearner.config import SourceFormat
from xlearner.data.ingest import MANIFEST_FORMAT, SPLITS
from xlearner.store import ArtifactNotFound, StoreError, join, resolve

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


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


# Train-time augmentation, label-safe for every task: a random crop window of 80-100% of
# the side (a zoom of at most 1.25: the multilabel "big"/"small" attributes stay apart)
# at a random place, then a horizontal flip half of the time. The window is folded into
# the decode resize (PIL's ``resize(box=...)``), so it costs nothing; boxes and masks go
# through the same window.
View = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image
FULL_VIEW: View = (0.0, 0.0, 1.0, 1.0)
MIN_VIEW = 0.8
MIN_BOX_SIDE = 1.0  # pixels; boxes cut smaller than this by the window are dropped


def random_view(seed: int) -> tuple[View, bool]:
    """The crop window and flip of one sample: a pure function of ``seed``."""
    rng = random.Random(seed)
    side = rng.uniform(MIN_VIEW, 1.0)
    x0, y0 = rng.uniform(0.0, 1.0 - side), rng.uniform(0.0, 1.0 - side)
    return (x0, y0, x0 + side, y0 + side), rng.random() < 0.5


def _pixels(view: View, width: int, height: int) -> tuple[float, float, float, float]:
    return (view[0] * width, view[1] * height, view[2] * width, view[3] * height)


def view_boxes(
    boxes: torch.Tensor, labels: torch.Tensor, view: View, size: int
) -> dict[str, torch.Tensor]:
    """Boxes given as fractions of the image, in pixels of the ``size`` crop of ``view``;
    clipped to it, and dropped (with their labels) when left thinner than a pixel."""
    x0, y0, x1, y1 = view
    origin = torch.tensor([x0, y0, x0, y0])
    scale = torch.tensor([size / (x1 - x0), size / (y1 - y0)] * 2)
    out = ((boxes - origin) * scale).clamp(0, size)
    keep = (out[:, 2] - out[:, 0] >= MIN_BOX_SIDE) & (out[:, 3] - out[:, 1] >= MIN_BOX_SIDE)
    return {"boxes": out[keep], "labels": labels[keep]}


def hflip(
    image: torch.Tensor, target: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror an image and its target left-right (boxes and masks included)."""
    width = image.shape[-1]
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
    if "mask" in target:
        target["mask"] = target["mask"].flip(-1)
    return image.flip(-1), target


class ShardDataset(Dataset):
    """``(image [3, S, S] float in [0, 1], target)`` pairs of one split of a manifest.

    ``train=True`` draws a crop window and a flip (:func:`random_view`) from (``seed``,
    epoch, index), so an epoch is reproducible: call :meth:`set_epoch` at the start of every
    epoch.
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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        data, label, mask_bytes = self.raw(index)
        size = self.image_size
        view = FULL_VIEW
        flip = False
        if self.train:
            view, flip = random_view(_sample_seed(self.seed, self.epoch, index))
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if image.format == "JPEG":
                image.draft("RGB", (size, size))  # decode big JPEGs at a reduced scale
            rgb = image.convert("RGB").resize(
                (size, size), Image.Resampling.BILINEAR, box=_pixels(view, *image.size)
            )
        array = np.asarray(rgb, dtype=np.uint8)
        img = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
        target = self._target(label, mask_bytes, width, height, view)
        return hflip(img, target) if flip else (img, target)

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
            return view_boxes(boxes / torch.tensor([width, height] * 2), labels, view, size)
        if self.format == SourceFormat.seg:
            with Image.open(io.BytesIO(mask_bytes)) as mask:
                resized = mask.resize(
                    (size, size), Image.Resampling.NEAREST, box=_pixels(view, *mask.size)
                )
            return {"mask": torch.from_numpy(np.asarray(resized, dtype=np.int64).copy())}
        return {}


def _collate_stacked(
    batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images = torch.stack([img for img, _ in batch])
    keys = batch[0][1].keys()
    return images, {k: torch.stack([t[k] for _, t in batch]) for k in keys}


def _collate_listed(
    batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    return torch.stack([img for img, _ in batch]), [t for _, t in batch]


def collate_fn(format: SourceFormat | str) -> Callable:
    """The batch collation of a format: stacked targets, or a list of dicts for det."""
    return _collate_listed if SourceFormat(format) == SourceFormat.det else _collate_stacked
