"""Train-time augmentation: a crop window (a *view*) and a horizontal flip per sample.

Label-safe for every task: a random crop window of 80-100% of the side (a zoom of at
most 1.25: the multilabel "big"/"small" attributes stay apart) at a random place, then a
horizontal flip half of the time, both a pure function of (seed, epoch, index). The
window is folded into the decode resize (PIL's ``resize(box=...)``, or
:func:`xlearner.data.decode.resize_views`), so it costs nothing; boxes and masks go
through the same window.
"""

from __future__ import annotations

import hashlib
import random

import torch

View = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image
FULL_VIEW: View = (0.0, 0.0, 1.0, 1.0)
MIN_VIEW = 0.8
MIN_BOX_SIDE = 1.0  # pixels; boxes cut smaller than this by the window are dropped


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s view in ``epoch`` (for :func:`random_view`)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def random_view(seed: int) -> tuple[View, bool]:
    """The crop window and flip of one sample: a pure function of ``seed``."""
    rng = random.Random(seed)
    side = rng.uniform(MIN_VIEW, 1.0)
    x0, y0 = rng.uniform(0.0, 1.0 - side), rng.uniform(0.0, 1.0 - side)
    return (x0, y0, x0 + side, y0 + side), rng.random() < 0.5


def view_pixels(view: View, width: int, height: int) -> tuple[float, float, float, float]:
    """``view`` in pixels of a ``width`` x ``height`` image (a PIL crop box)."""
    return (view[0] * width, view[1] * height, view[2] * width, view[3] * height)


def view_boxes(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    view: View,
    size: int,
    difficult: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Boxes given as fractions of the image, in pixels of the ``size`` crop of ``view``;
    clipped to it, and dropped (with their labels and ``difficult`` flags, when given)
    when left thinner than a pixel."""
    x0, y0, x1, y1 = view
    origin = torch.tensor([x0, y0, x0, y0])
    scale = torch.tensor([size / (x1 - x0), size / (y1 - y0)] * 2)
    out = ((boxes - origin) * scale).clamp(0, size)
    keep = (out[:, 2] - out[:, 0] >= MIN_BOX_SIDE) & (out[:, 3] - out[:, 1] >= MIN_BOX_SIDE)
    target = {"boxes": out[keep], "labels": labels[keep]}
    if difficult is not None:
        target["difficult"] = difficult[keep]
    return target


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
