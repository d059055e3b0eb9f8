"""Images left encoded by the loader, decoded a whole batch at a time on the device.

:class:`EncodedImage` is a sample's image as ``ShardDataset.encoded_item`` leaves it
(JPEG bytes, with its view and flip); :func:`decode_batch` decodes an
:class:`EncodedBatch` on the GPU (nvjpeg), then crops, resizes and flips it there with
the same resampling as the PIL path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xlearner.data.augment import View


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
