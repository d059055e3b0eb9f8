"""Self-supervised heads: masked image modelling (``mim``) and contrastive (``contrastive``).

Both turn an unlabelled image batch into a training signal for a trunk, so any source
(labelled or not) can feed them (docs/ssl.md).

- ``mim``: SimMIM (Xie et al., 2022). Random square patches of the input are replaced by
  a learnable mask token; a 1x1 conv on C5 + PixelShuffle reconstructs the image; the
  loss is L1 on the masked pixels only, against the raw [0, 1] pixels.
- ``contrastive``: SimCLR (Chen et al., 2020). Two augmented views of every image, drawn
  on the tensor with batched ops (no PIL, runs on the GPU); pooled C5 -> projection MLP ->
  128-d; NT-Xent with the whole batch as negatives, gathered from every rank under DDP.

Randomness comes from the global RNG in training and from a fixed-seed generator in
``eval()`` mode, so validation losses of two checkpoints see the same masks and views.
Every random draw also accepts an explicit ``torch.Generator`` (tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlearner.distributed import all_gather_with_offset
from xlearner.metrics import MeanLoss, MetricAccumulator
from xlearner.models.head import TaskHead, register_head
from xlearner.tasks import IMAGENET_MEAN

C5_STRIDE = 32  # docs/architecture.md: C2..C5 at strides 4, 8, 16, 32
EVAL_SEED = 0
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def _uniform(
    shape: Sequence[int],
    low: float,
    high: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """U(low, high) drawn on the generator's device (or ``device`` with the global RNG)."""
    if generator is None:
        values = torch.rand(tuple(shape), device=device)
    else:
        values = torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)
    return low + (high - low) * values


def _eval_generator(module: nn.Module, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None and not module.training:
        return torch.Generator().manual_seed(EVAL_SEED)
    return generator


# --------------------------------------------------------------------------- MIM


def random_patch_mask(
    batch: int,
    image_size: int,
    patch_size: int,
    mask_ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``[B, 1, S, S]`` float mask, 1 = masked: ``round(mask_ratio * patches)`` random
    ``patch_size`` squares per image (at least one). A last row/column of patches that
    does not fit in ``S`` is cropped."""
    grid = math.ceil(image_size / patch_size)
    patches = grid * grid
    num_masked = min(patches, max(1, round(mask_ratio * patches)))
    scores = _uniform((batch, patches), 0.0, 1.0, generator, torch.device(device))
    ranks = scores.argsort(dim=1).argsort(dim=1)
    mask = (ranks < num_masked).float().view(batch, 1, grid, grid)
    mask = mask.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)
    return mask[..., :image_size, :image_size]


def mim_loss(pred: Tensor, target: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean L1 over masked pixels: ``sum(|pred - target| * mask) / (sum(mask) * 3 + eps)``.

    ``pred``, ``target``: ``[B, 3, S, S]``; ``mask``: ``[B, 1, S, S]``, 1 = masked.
    Computed in float32 (the prediction may come out of bf16 autocast).
    """
    if pred.shape != target.shape or pred.shape[1] != 3:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [B, 3, S, S]"
        )
    if mask.shape != (pred.shape[0], 1, *pred.shape[2:]):
        raise ValueError(
            f"mask {tuple(mask.shape)} must be [B, 1, S, S] for pred {tuple(pred.shape)}"
        )
    mask = mask.float()
    error = (pred.float() - target.float()).abs() * mask
    return error.sum() / (mask.sum() * pred.shape[1] + eps)


@register_head("mim")
class MIMHead(TaskHead):
    """SimMIM-style masked image modelling on the trunk's C5.

    The mask token lives on the pixels, not on patch embeddings as in SimMIM: a CNN
    trunk has no token sequence, it sees the image. It is one learnable value per RGB
    channel, initialised to the ImageNet mean (0 after the backbone's normalisation), and
    trained through the trunk like any other parameter.

    ``patch_size``: side of the masked squares in pixels; default ``image_size // 8``
    (8 at 64 px, an 8 x 8 grid of maskable patches as SimMIM's 32 px at 192 px).
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        image_size: int,
        mask_ratio: float = 0.6,
        patch_size: int | None = None,
    ) -> None:
        super().__init__(channels, num_classes, image_size)
        patch_size = patch_size or max(1, image_size // 8)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"MIMHead: mask_ratio must be in (0, 1), got {mask_ratio}")
        if not 1 <= patch_size <= image_size:
            raise ValueError(
                f"MIMHead: patch_size must be in 1..image_size ({image_size}), got {patch_size}"
            )
        self.mask_ratio, self.patch_size = mask_ratio, patch_size
        self.mask_token = nn.Parameter(torch.tensor(IMAGENET_MEAN))
        self.decoder = nn.Sequential(
            nn.Conv2d(self.channels[-1], C5_STRIDE**2 * 3, kernel_size=1),
            nn.PixelShuffle(C5_STRIDE),
        )

    def prepare_inputs(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Masked images and the mask ``[B, 1, S, S]`` (1 = masked) as the context."""
        batch, _, height, width = images.shape
        if height != width:
            raise ValueError(f"MIMHead expects square images, got {height}x{width}")
        mask = random_patch_mask(
            batch,
            height,
            self.patch_size,
            self.mask_ratio,
            generator=_eval_generator(self, generator),
            device=images.device,
        ).to(images.dtype)
        token = self.mask_token.to(images.dtype).view(1, 3, 1, 1)
        return images * (1 - mask) + token * mask, mask

    def predict(self, features: Sequence[Tensor]) -> Tensor:
        """The reconstruction ``[B, 3, S, S]`` (raw pixel scale, not clamped)."""
        recon = self.decoder(features[-1])
        if recon.shape[-1] < self.image_size:
            raise ValueError(
                f"MIMHead: C5 of {tuple(features[-1].shape[-2:])} reconstructs {recon.shape[-1]} "
                f"px, less than image_size {self.image_size}; C5 must have stride {C5_STRIDE}"
            )
        # C5 of an image that is not a multiple of 32 px covers a little more than it.
        return recon[..., : self.image_size, : self.image_size]

    def forward(
        self, features: Sequence[Tensor], images: Tensor, targets: Any, ctx: Tensor
    ) -> dict[str, Tensor]:
        return {"mim_l1": mim_loss(self.predict(features), images, ctx)}

    def metric(self) -> MetricAccumulator:
        return MeanLoss()


# --------------------------------------------------------------------------- contrastive


@dataclass(frozen=True)
class ViewAugmentation:
    """SimCLR's augmentations as batched tensor ops on ``[B, 3, S, S]`` images in [0, 1].

    Per image: random resized crop (area ``crop_scale``, aspect ``crop_ratio``, resampled
    to S x S with one ``grid_sample``), horizontal flip, with ``jitter_p`` colour jitter
    (brightness, contrast, saturation factors in [1 - x, 1 + x]; hue as a rotation of the
    chroma plane in YIQ space, up to ``hue`` of a turn), with ``grayscale_p`` grayscale.
    Gaussian blur is left out, as SimCLR does for small (CIFAR-size) images.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_p: float = 0.2

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            problems.append(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            problems.append(f"hue must be in [0, 0.5], got {self.hue}")
        if problems:
            raise ValueError("ViewAugmentation: " + "; ".join(problems))

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # Pixel arithmetic in the input's dtype: bf16 autocast would round the colours.
        with torch.autocast(images.device.type, enabled=False):
            views = self._crop_and_flip(images, generator)
            views = self._colour_jitter(views, generator)
            draw = _uniform((images.shape[0], 1, 1, 1), 0, 1, generator, images.device)
            gray = draw < self.grayscale_p
            return torch.where(gray, _grayscale(views).expand_as(views), views)

    def _crop_and_flip(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        batch, device = images.shape[0], images.device
        area = _uniform((batch,), *self.crop_scale, generator, device)
        log_ratio = _uniform((batch,), *(math.log(r) for r in self.crop_ratio), generator, device)
        # Crop width and height as fractions of the image (affine_grid's [-1, 1] frame).
        width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        centre_x = (1 - width) * _uniform((batch,), -1, 1, generator, device)
        centre_y = (1 - height) * _uniform((batch,), -1, 1, generator, device)
        flip = torch.where(_uniform((batch,), 0, 1, generator, device) < self.flip_p, -1.0, 1.0)
        zero = torch.zeros_like(width)
        row_x = torch.stack([width * flip, zero, centre_x], 1)
        row_y = torch.stack([zero, height, centre_y], 1)
        theta = torch.stack([row_x, row_y], 1).to(images.dtype)  # [B, 2, 3]
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(
            images, grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def _colour_jitter(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        batch, device = images.shape[0], images.device
        draw = _uniform((batch, 1, 1, 1), 0, 1, generator, device)
        apply = (draw < self.jitter_p).to(images.dtype)

        def factor(strength: float) -> Tensor:  # 1 where jitter is not applied
            drawn = _uniform((batch, 1, 1, 1), 1 - strength, 1 + strength, generator, device)
            return 1 + apply * (drawn.to(images.dtype) - 1)

        out = (images * factor(self.brightness)).clamp(0, 1)
        mean = _grayscale(out).mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * factor(self.contrast) + mean).clamp(0, 1)
        gray = _grayscale(out)
        out = ((out - gray) * factor(self.saturation) + gray).clamp(0, 1)
        angle = 2 * math.pi * _uniform((batch,), -self.hue, self.hue, generator, device)
        return _rotate_hue(out, angle * apply.view(batch)).clamp(0, 1)


def _grayscale(images: Tensor) -> Tensor:
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _rotate_hue(images: Tensor, angle: Tensor) -> Tensor:
    """Rotate the chroma (I, Q) plane by ``angle`` radians per image: a linear hue shift."""
    cos, sin = angle.float().cos(), angle.float().sin()
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rows = ([one, zero, zero], [zero, cos, -sin], [zero, sin, cos])
    rotation = torch.stack([torch.stack(row, 1) for row in rows], 1)  # [B, 3, 3]
    transform = _YIQ_TO_RGB.to(cos.device) @ rotation @ _RGB_TO_YIQ.to(cos.device)  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", transform.to(images.dtype), images)


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.2, gather: bool = True) -> Tensor:
    """NT-Xent (SimCLR): ``z1[i]`` and ``z2[i]`` are the two views of image i.

    Every one of the 2B embeddings is an anchor whose positive is the other view of its
    image and whose negatives are all other 2B - 2 embeddings; the loss is the mean
    cross-entropy over anchors, on cosine similarity / ``temperature``. Under DDP (and
    ``gather``) the candidates are gathered from every rank with gradient while each rank
    scores only its own anchors: the mean of the per-rank losses is the loss on the full
    global batch (equal per-rank batches), and DDP's gradient averaging matches it.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must both be [B, D]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch, dim = z1.shape
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    if gather:  # one collective for both views: [B, 2D] per rank
        both, offset = all_gather_with_offset(torch.cat([z1, z2], dim=1))
        all1, all2 = both.split(dim, dim=1)
    else:
        all1, all2, offset = z1, z2, 0
    total = all1.shape[0]
    anchors = torch.cat([z1, z2])  # [2B, D]
    candidates = torch.cat([all1, all2])  # [2N, D]: view 1 of every image, then view 2
    logits = anchors @ candidates.T / temperature
    index = offset + torch.arange(batch, device=z1.device)
    self_index = torch.cat([index, total + index])
    positive_index = torch.cat([total + index, index])
    logits = logits.masked_fill(F.one_hot(self_index, 2 * total).bool(), float("-inf"))
    return F.cross_entropy(logits, positive_index)


@register_head("contrastive")
class ContrastiveHead(TaskHead):
    """SimCLR on the trunk's pooled C5: projection MLP (Linear-BN-ReLU-Linear) to
    ``projection_dim`` and NT-Xent. The projection's hidden width defaults to C5's
    channels, as SimCLR's 2048 on ResNet-50."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        image_size: int,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        temperature: float = 0.2,
        augmentation: ViewAugmentation | None = None,
    ) -> None:
        super().__init__(channels, num_classes, image_size)
        if temperature <= 0:
            raise ValueError(f"ContrastiveHead: temperature must be > 0, got {temperature}")
        hidden_dim = hidden_dim or self.channels[-1]
        self.temperature = temperature
        self.augmentation = augmentation or ViewAugmentation()
        self.projection = nn.Sequential(
            nn.Linear(self.channels[-1], hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim),
        )

    def prepare_inputs(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, int]:
        """Two augmented views ``[2B, 3, S, S]`` (all first views, then all second views)
        and ``B`` as the context."""
        generator = _eval_generator(self, generator)
        views = torch.cat(
            [self.augmentation(images, generator), self.augmentation(images, generator)]
        )
        return views, images.shape[0]

    def predict(self, features: Sequence[Tensor]) -> Tensor:
        """L2-normalised projections ``[N, projection_dim]``."""
        return F.normalize(self.projection(features[-1].mean(dim=(2, 3))), dim=1)

    def forward(
        self, features: Sequence[Tensor], images: Tensor, targets: Any, ctx: int
    ) -> dict[str, Tensor]:
        z = self.predict(features)
        if z.shape[0] != 2 * ctx:
            raise ValueError(
                f"ContrastiveHead: expected features of 2 x {ctx} views, got {z.shape[0]}"
            )
        # Gather negatives across ranks only in training: evaluation may run on one rank.
        loss = nt_xent_loss(z[:ctx], z[ctx:], self.temperature, gather=self.training)
        return {"nt_xent": loss}

    def metric(self) -> MetricAccumulator:
        return MeanLoss()
