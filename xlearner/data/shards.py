"""``ShardDataset``: a map-style dataset over the shards of a published manifest.

Shards are downloaded once into the content-addressed cache
(:meth:`ArtifactStore.local_copy` with the manifest's sha256) and indexed by member
offsets, so any sample is read with one positional read, without extracting the tar.

Images are decoded where the sample is loaded (PIL, ``__getitem__``), or left encoded
(:meth:`ShardDataset.encoded_item`) for :func:`decode_batch` to decode, crop, flip and
resize a whole batch on the GPU (nvjpeg) with the same augmentation.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError
from torch.utils.data import Dataset

from xlearner.config import SourceFormat
from xlearner.data.ingest import MANIFEST_FORMAT, SPLITS
from xlearner.data.manifest import Manifest
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
    try:
        Manifest.model_validate(manifest)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors()
        )
        raise ManifestError(
            f"manifest {uri} is malformed ({problems}); re-ingest the source"
        ) from None
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


def hflip_target(target: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Mirror a target left-right in an image ``width`` pixels wide (boxes and masks)."""
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
    if "mask" in target:
        target["mask"] = target["mask"].flip(-1)
    return target


def hflip(
    image: torch.Tensor, target: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror an image and its target left-right (boxes and masks included)."""
    return image.flip(-1), hflip_target(target, image.shape[-1])


@dataclass
class EncodedImage:
    """A sample's image left for :func:`decode_batch`: the view to take and the flip.

    ``jpeg``: the stored JPEG bytes (1-D uint8), decoded with the batch; ``pixels``: an
    image that is not a JPEG, decoded, cropped and resized where it was loaded
    (``[3, size, size]`` uint8, not flipped yet).
    """

    size: int
    view: View
    flip: bool
    jpeg: torch.Tensor | None = None
    pixels: torch.Tensor | None = None


@dataclass
class EncodedBatch:
    """The images of a batch of :class:`EncodedImage` (what the collate functions give)."""

    items: list[EncodedImage]

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> EncodedBatch:  # DataLoader(pin_memory=True) calls this
        for item in self.items:
            if item.pixels is not None:
                item.pixels = item.pixels.pin_memory()
        return self


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
        return random_view(_sample_seed(self.seed, self.epoch, index))

    def _decode(self, image: Image.Image, view: View) -> torch.Tensor:
        """``[3, S, S]`` uint8: the view of an opened image, resized (not flipped)."""
        size = self.image_size
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # decode big JPEGs at a reduced scale
        rgb = image.convert("RGB").resize(
            (size, size), Image.Resampling.BILINEAR, box=_pixels(view, *image.size)
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
            return view_boxes(boxes / torch.tensor([width, height] * 2), labels, view, size)
        if self.format == SourceFormat.seg:
            with Image.open(io.BytesIO(mask_bytes)) as mask:
                resized = mask.resize(
                    (size, size), Image.Resampling.NEAREST, box=_pixels(view, *mask.size)
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
    return _collate_listed if SourceFormat(format) == SourceFormat.det else _collate_stacked


# ------------------------------------------------------------------ batch decode


def resize_weights(
    start: torch.Tensor, end: torch.Tensor, in_size: int, out_size: int
) -> torch.Tensor:
    """``[n, out_size, in_size]`` rows of PIL's BILINEAR resampling of ``[start, end)``.

    PIL's filter (``Resample.c``): output pixel ``i`` is centred at ``start + (i + 0.5) *
    scale`` in the input, ``scale = (end - start) / out_size``; the triangle filter is
    widened by ``max(scale, 1)`` (antialiasing when shrinking) and renormalised where the
    image edge cuts it. ``start``/``end``: ``[n]`` float tensors, in input pixels.
    """
    device = start.device
    scale = (end - start) / out_size
    support = scale.clamp(min=1.0)
    centres = start[:, None] + (torch.arange(out_size, device=device) + 0.5) * scale[:, None]
    x = torch.arange(in_size, device=device, dtype=centres.dtype) + 0.5
    weights = (1 - ((x - centres[:, :, None]) / support[:, None, None]).abs()).clamp_(min=0)
    return weights / weights.sum(-1, keepdim=True).clamp_(min=1e-12)


def resize_views(images: torch.Tensor, views: Sequence[View], size: int) -> torch.Tensor:
    """Crop each image ``[n, 3, H, W]`` (uint8 or float) to its view, resized to ``size``.

    Float ``[n, 3, size, size]`` in 0..255, rounded as PIL's 8-bit output is: the same
    resampling as ``ShardDataset.__getitem__`` (two matrix products per image, batched).
    """
    n, _, height, width = images.shape
    box = _on(images.device, views, torch.float32).reshape(n, 4)
    wx = resize_weights(box[:, 0] * width, box[:, 2] * width, width, size)  # [n, S, W]
    wy = resize_weights(box[:, 1] * height, box[:, 3] * height, height, size)  # [n, S, H]
    out = images.float() @ wx.transpose(1, 2)[:, None]  # [n, 3, H, S]
    return (wy[:, None] @ out).round_().clamp_(0, 255)  # [n, 3, S, S]


def decode_jpegs(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """RGB ``[3, H, W]`` uint8 images of JPEG bytes, decoded on ``device`` (nvjpeg on CUDA).

    On CUDA the list is decoded in one batched call; if nvjpeg refuses one (CMYK, an
    unusual coding), the batch is decoded on the CPU instead and moved.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecates its image codecs for TorchCodec; they still work
    warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning, "torchvision")
    device = torch.device(device)
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        if device.type == "cpu":
            raise
        cpu = decode_jpeg(data, mode=ImageReadMode.RGB, device="cpu")
        return [img.to(device, non_blocking=True) for img in cpu]


def _on(device: torch.device, values: Sequence, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor on ``device`` without a host sync (a blocking copy would wait for the
    kernels queued on the GPU; from pageable memory the async copy is staged at once)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


DECODE_CHUNK = 64  # images resized together: bounds the [n, S, W] weight tensors


def decode_batch(batch: EncodedBatch, device: torch.device | str) -> torch.Tensor:
    """The ``[B, 3, S, S]`` float images in [0, 1] of an :class:`EncodedBatch`, on ``device``.

    JPEGs are decoded on ``device`` in one call, cropped to their view and resized like
    the PIL path, then flipped; ``device="cpu"`` runs the same code on the CPU.
    """
    device = torch.device(device)
    items = batch.items
    size = items[0].size
    out = torch.empty((len(items), 3, size, size), dtype=torch.float32, device=device)
    jpeg = [i for i, item in enumerate(items) if item.jpeg is not None]
    if jpeg:
        decoded = decode_jpegs([items[i].jpeg for i in jpeg], device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, img in enumerate(decoded):
            by_shape.setdefault(tuple(img.shape), []).append(k)
        for ks in by_shape.values():
            for c in range(0, len(ks), DECODE_CHUNK):
                chunk = ks[c : c + DECODE_CHUNK]
                images = torch.stack([decoded[k] for k in chunk])
                where = _on(device, [jpeg[k] for k in chunk], torch.int64)
                out[where] = resize_views(images, [items[jpeg[k]].view for k in chunk], size)
    for i, item in enumerate(items):
        if item.pixels is not None:
            out[i] = item.pixels.to(device, non_blocking=True)
    flips = [i for i, item in enumerate(items) if item.flip]
    if flips:
        where = _on(device, flips, torch.int64)
        out[where] = out[where].flip(-1)
    return out.div_(255)
