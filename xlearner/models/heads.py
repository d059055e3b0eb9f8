"""Task heads: from a trunk's features [C2, C3, C4, C5] to losses, predictions and a metric.

One head per (source, task) stream, created by task type with :func:`create_head`. The
supervised heads live here; ``mim`` and ``contrastive`` live in :mod:`xlearner.models.ssl`
(imported here, so that ``create_head`` knows every task); the interface and the
registry are :mod:`xlearner.models.head`.

- ``cls``: global average pool of C5 -> linear; cross-entropy; metric top-1.
- ``multilabel``: the same with binary cross-entropy per class; metric mAP.
- ``det``: FCOS (Tian et al., 2019) on an FPN. FCOS is anchor-free (one point per
  feature-map cell, no anchor shapes to tune), has no region-proposal stage, has the
  fewest hyper-parameters of torchvision's detectors and trains on tiny images. The
  parts are torchvision's own: ``FeaturePyramidNetwork``, ``FCOSHead`` and the
  target assignment / loss / decoding methods of an ``FCOS`` instance built around a
  placeholder backbone. Its ``GeneralizedRCNNTransform`` is skipped: images are
  already S x S and the backbone normalises them. Metric: COCO mAP@[.5:.95] and mAP50.
- ``seg``: an FCN head on C5 with a DeepLabv3+-style skip from C2, logits at stride 4
  upsampled to S x S; cross-entropy ignoring 255; metric mIoU and pixel accuracy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

import xlearner.models.ssl  # noqa: F401  (registers the mim and contrastive heads)
from xlearner.metrics import DetectionMAP, MeanIoU, MetricAccumulator, MultilabelMAP, Top1Accuracy
from xlearner.models.head import TaskHead, head_class, register_head
from xlearner.tasks import IGNORE_INDEX, SELF_SUPERVISED


def create_head(
    task: str, channels: Sequence[int], num_classes: int, image_size: int, **kwargs: Any
) -> TaskHead:
    """A head for ``task`` on a trunk with C2..C5 ``channels`` (``num_classes`` unused by SSL)."""
    task = str(task)  # TaskType is a StrEnum
    head_type = head_class(task)
    if task not in SELF_SUPERVISED and num_classes < 1:
        raise ValueError(f"a {task!r} head needs num_classes >= 1, got {num_classes}")
    if len(channels) != 4:
        raise ValueError(f"channels must list C2..C5 (4 values), got {list(channels)}")
    return head_type(tuple(channels), num_classes, image_size, **kwargs)


def head_width(channels: Sequence[int]) -> int:
    """Width of the FPN / segmentation decoder: 64 for small backbones, 256 (as torchvision)
    for ResNet-18 and larger. A multiple of 32, as FCOS's GroupNorm(32) needs."""
    return 256 if channels[-1] >= 512 else 64


class PooledLinearHead(TaskHead):
    """Global average pool of C5 -> linear: the logits of ``cls`` and ``multilabel``."""

    def __init__(self, channels: Sequence[int], num_classes: int, image_size: int) -> None:
        super().__init__(channels, num_classes, image_size)
        self.fc = nn.Linear(self.channels[-1], num_classes)

    def predict(self, features: Sequence[Tensor]) -> Tensor:
        return self.fc(features[-1].mean(dim=(2, 3)))


@register_head("cls")
class ClassificationHead(PooledLinearHead):
    def forward(
        self, features: Sequence[Tensor], images: Tensor, targets: Mapping[str, Tensor], ctx: Any
    ) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(self.predict(features), targets["label"])}

    def metric(self) -> MetricAccumulator:
        return Top1Accuracy()


@register_head("multilabel")
class MultilabelHead(PooledLinearHead):
    def forward(
        self, features: Sequence[Tensor], images: Tensor, targets: Mapping[str, Tensor], ctx: Any
    ) -> dict[str, Tensor]:
        logits = self.predict(features)
        return {
            "bce": F.binary_cross_entropy_with_logits(logits, targets["labels"].to(logits.dtype))
        }

    def metric(self) -> MetricAccumulator:
        return MultilabelMAP()


class _PrecomputedFeatures(nn.Module):
    """Placeholder backbone for the ``FCOS`` instance: the head never calls it."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels


@register_head("det")
class DetectionHead(TaskHead):
    """FPN over C{levels} + FCOS. Labels are 0-based class indices used as they are:
    torchvision's FCOS scores every class with its own sigmoid (no background logit), so
    ``num_classes`` logits serve labels 0..num_classes-1.

    ``levels``: pyramid levels l, P_l has stride 2**l and is built from C_l. Default
    P3-P5: FCOS's last level has no upper object size, so P6/P7 (1-2 px maps on small
    images) are left out; pass ``levels=(2, 3, 4, 5)`` for objects under ~8 px (P2
    quadruples the head's cost). FCOS's points have their level's stride as size, as in
    the paper.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        image_size: int,
        levels: Sequence[int] = (3, 4, 5),
        fpn_channels: int | None = None,
        num_convs: int = 4,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.6,
        detections_per_img: int = 100,
    ) -> None:
        super().__init__(channels, num_classes, image_size)
        self.levels = tuple(levels)
        if not set(self.levels) <= {2, 3, 4, 5} or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels must be increasing values within 2..5 (C2..C5), got {levels}")
        width = fpn_channels or head_width(channels)
        self.fpn = FeaturePyramidNetwork([self.channels[level - 2] for level in self.levels], width)
        anchor_generator = AnchorGenerator(
            sizes=tuple((2**level,) for level in self.levels),
            aspect_ratios=((1.0,),) * len(self.levels),
        )
        self.fcos = FCOS(
            _PrecomputedFeatures(width),
            num_classes,
            anchor_generator=anchor_generator,
            head=FCOSHead(width, num_anchors=1, num_classes=num_classes, num_convs=num_convs),
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
        )

    def _pyramid(self, features: Sequence[Tensor]) -> list[Tensor]:
        inputs = OrderedDict((f"p{level}", features[level - 2]) for level in self.levels)
        return list(self.fpn(inputs).values())

    def _head_outputs(self, pyramid: list[Tensor]) -> dict[str, Tensor]:
        # Boxes are decoded in pixels: float32 even under bf16 autocast.
        return {name: out.float() for name, out in self.fcos.head(pyramid).items()}

    def _anchors(
        self, pyramid: list[Tensor], batch: int, image_hw: tuple[int, int]
    ) -> list[Tensor]:
        """FCOS's points per image; the generator reads only shapes, dtype and device."""
        device = pyramid[0].device
        maps = [torch.empty((0, 0, *p.shape[-2:]), device=device) for p in pyramid]
        images = ImageList(torch.empty((batch, 0, *image_hw), device=device), [image_hw] * batch)
        return self.fcos.anchor_generator(images, maps)

    def forward(
        self,
        features: Sequence[Tensor],
        images: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        ctx: Any,
    ) -> dict[str, Tensor]:
        """``targets``: per image ``boxes`` [N, 4] xyxy pixels and ``labels`` [N] 0-based."""
        pyramid = self._pyramid(features)
        anchors = self._anchors(pyramid, images.shape[0], tuple(images.shape[-2:]))
        points_per_level = [p.shape[-2] * p.shape[-1] for p in pyramid]
        return self.fcos.compute_loss(
            list(targets), self._head_outputs(pyramid), anchors, points_per_level
        )

    def predict(self, features: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Per image ``boxes`` (xyxy pixels), ``scores``, ``labels``, after NMS."""
        pyramid = self._pyramid(features)
        batch, image_hw = pyramid[0].shape[0], (self.image_size, self.image_size)
        points_per_level = [p.shape[-2] * p.shape[-1] for p in pyramid]
        outputs = {
            name: list(out.split(points_per_level, dim=1))
            for name, out in self._head_outputs(pyramid).items()
        }
        anchors = [list(a.split(points_per_level)) for a in self._anchors(pyramid, batch, image_hw)]
        return self.fcos.postprocess_detections(outputs, anchors, [image_hw] * batch)

    def metric(self) -> MetricAccumulator:
        return DetectionMAP(self.num_classes)


@register_head("seg")
class SegmentationHead(TaskHead):
    """FCN context on C5, upsampled and fused with a reduced C2 (DeepLabv3+ decoder without
    ASPP: at 64 px C5 is 2x2, too small for dilated branches), logits at stride 4."""

    def __init__(
        self, channels: Sequence[int], num_classes: int, image_size: int, width: int | None = None
    ) -> None:
        super().__init__(channels, num_classes, image_size)
        width = width or head_width(channels)
        skip_width = width // 4
        self.context = Conv2dNormActivation(self.channels[-1], width, kernel_size=3)
        self.skip = Conv2dNormActivation(self.channels[0], skip_width, kernel_size=1)
        self.fuse = Conv2dNormActivation(width + skip_width, width, kernel_size=3)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def logits(self, features: Sequence[Tensor], size: Sequence[int]) -> Tensor:
        c2, c5 = features[0], features[-1]
        context = F.interpolate(
            self.context(c5), size=c2.shape[-2:], mode="bilinear", align_corners=False
        )
        logits = self.classifier(self.fuse(torch.cat([context, self.skip(c2)], dim=1)))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def forward(
        self, features: Sequence[Tensor], images: Tensor, targets: Mapping[str, Tensor], ctx: Any
    ) -> dict[str, Tensor]:
        mask = targets["mask"]
        logits = self.logits(features, mask.shape[-2:])
        # Mean over labelled pixels; 0 (not NaN) for a batch without any.
        total = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="sum")
        return {"ce": total / (mask != IGNORE_INDEX).sum().clamp(min=1)}

    def predict(self, features: Sequence[Tensor]) -> Tensor:
        """Logits ``[B, num_classes, S, S]``."""
        return self.logits(features, (self.image_size, self.image_size))

    def metric(self) -> MetricAccumulator:
        return MeanIoU(self.num_classes, ignore_index=IGNORE_INDEX)
