"""Per-task metric accumulators: feed batches with ``update``, read the result with ``compute``.

Every accumulator moves what it keeps to the CPU, so ``update`` takes predictions on any
device. ``primary`` names the entry of ``compute()`` that model selection and reports use.
"""

from __future__ import annotations

import contextlib
import io
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


class MetricAccumulator(ABC):
    """Accumulates predictions and targets over an evaluation pass."""

    primary: str

    @abstractmethod
    def update(self, predictions: Any, targets: Any) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...


class Top1Accuracy(MetricAccumulator):
    """Classification: ``predictions`` = logits ``[B, C]``, ``targets`` = ``{"label": [B]}``."""

    primary = "top1"

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, predictions: Tensor, targets: Mapping[str, Tensor]) -> None:
        labels = targets["label"].to(predictions.device)
        self.correct += int((predictions.argmax(dim=1) == labels).sum())
        self.total += labels.numel()

    def compute(self) -> dict[str, float]:
        return {"top1": self.correct / max(1, self.total)}


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over distinct score thresholds (as scikit-learn).

    Tied scores form one threshold. Returns NaN when there is no positive.
    """
    num_positives = positives.sum()
    if num_positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order].astype(np.float64)
    threshold_ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_positives = np.cumsum(positives)[threshold_ends]
    precision = true_positives / (threshold_ends + 1)
    recall = true_positives / num_positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


class MultilabelMAP(MetricAccumulator):
    """Multi-label: mean over classes (with at least one positive) of the average precision.

    ``predictions`` = logits ``[B, C]``, ``targets`` = ``{"labels": [B, C]}`` multi-hot.
    """

    primary = "mAP"

    def __init__(self) -> None:
        self.scores: list[Tensor] = []
        self.labels: list[Tensor] = []

    def update(self, predictions: Tensor, targets: Mapping[str, Tensor]) -> None:
        self.scores.append(predictions.detach().float().cpu())
        self.labels.append(targets["labels"].detach().cpu() > 0.5)

    def compute(self) -> dict[str, float]:
        if not self.scores:
            return {"mAP": 0.0}
        scores = torch.cat(self.scores).numpy()
        labels = torch.cat(self.labels).numpy()
        per_class = [average_precision(scores[:, c], labels[:, c]) for c in range(scores.shape[1])]
        defined = [ap for ap in per_class if not np.isnan(ap)]
        return {"mAP": float(np.mean(defined)) if defined else 0.0}


class MeanIoU(MetricAccumulator):
    """Segmentation: confusion matrix over the pixels whose target is not ``ignore_index``.

    ``predictions`` = logits ``[B, C, H, W]`` or label maps ``[B, H, W]``;
    ``targets`` = ``{"mask": [B, H, W]}``. mIoU averages the classes that occur in the
    targets or the predictions; ``pixel_acc`` is the fraction of correct pixels.
    """

    primary = "mIoU"

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predictions: Tensor, targets: Mapping[str, Tensor]) -> None:
        labels = predictions.argmax(dim=1) if predictions.dim() == 4 else predictions
        mask = targets["mask"].to(labels.device)
        valid = mask != self.ignore_index
        pairs = mask[valid].long() * self.num_classes + labels[valid].long()
        counts = torch.bincount(pairs, minlength=self.num_classes**2)
        self.confusion += counts.cpu().view(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, float]:
        confusion = self.confusion.double()
        hits = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - hits
        present = union > 0
        iou = hits[present] / union[present]
        return {
            "mIoU": float(iou.mean()) if present.any() else 0.0,
            "pixel_acc": float(hits.sum() / confusion.sum().clamp(min=1)),
        }


VOC_IOU = 0.5


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``boxes`` (continuous pixels: no VOC ``+ 1``)."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(np.float64).eps)


def voc_average_precision(recall: np.ndarray, precision: np.ndarray, eleven_point: bool) -> float:
    """The VOC devkit's AP: the area under the precision envelope (VOC2010+), or the
    mean of the best precision at recall >= 0, 0.1, ..., 1 (VOC2007's 11 points)."""
    if eleven_point:
        return float(
            np.mean([precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)])
        )
    recall = np.r_[0.0, recall, 1.0]
    envelope = np.maximum.accumulate(np.r_[0.0, precision, 0.0][::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


def voc_ap50(
    images: Sequence[Mapping[str, np.ndarray]],
    detections: Sequence[Mapping[str, np.ndarray]],
    num_classes: int,
    eleven_point: bool = False,
) -> float:
    """PASCAL VOC AP at IoU 0.5, averaged over the classes with a non-difficult box.

    Per class, detections in score order match the unmatched ground-truth box of their
    image they overlap most when IoU > 0.5 (the devkit's strict ``>``): a true positive;
    a second match of a box, or IoU <= 0.5, a false positive. A detection whose best box
    is ``difficult`` counts as neither, and difficult boxes are not among the positives.
    ``images``: ``boxes``, ``labels`` and optionally ``difficult`` per image;
    ``detections``: ``boxes``, ``scores``, ``labels``. Returns 0 with no positive at all.
    """
    per_class = []
    for c in range(num_classes):
        truth, positives = {}, 0
        for i, image in enumerate(images):
            keep = np.asarray(image["labels"]) == c
            hard = np.asarray(image.get("difficult", np.zeros(len(keep), bool)), bool)[keep]
            truth[i] = (
                np.asarray(image["boxes"], np.float64)[keep],
                hard,
                np.zeros(len(hard), bool),
            )
            positives += int((~hard).sum())
        if positives == 0:
            continue
        found = [
            (float(score), i, np.asarray(box, np.float64))
            for i, det in enumerate(detections)
            for box, score, label in zip(det["boxes"], det["scores"], det["labels"], strict=True)
            if int(label) == c
        ]
        found.sort(key=lambda d: -d[0])  # stable: ties keep image order
        hits = np.zeros(len(found))
        misses = np.zeros(len(found))
        for k, (_, i, box) in enumerate(found):
            boxes, hard, matched = truth[i]
            overlaps = _iou(box, boxes) if len(boxes) else np.zeros(0)
            best = int(np.argmax(overlaps)) if len(overlaps) else -1
            if best < 0 or overlaps[best] <= VOC_IOU:
                misses[k] = 1
            elif hard[best]:
                continue
            elif matched[best]:
                misses[k] = 1
            else:
                hits[k], matched[best] = 1, True
        tp, fp = np.cumsum(hits), np.cumsum(misses)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class.append(voc_average_precision(tp / positives, precision, eleven_point))
    return float(np.mean(per_class)) if per_class else 0.0


class DetectionMAP(MetricAccumulator):
    """Detection: COCO mAP@[.5:.95], mAP50 and mAP75 by pycocotools, built in memory, and
    the PASCAL VOC AP50 (:func:`voc_ap50`): ``voc_ap50`` (area under the curve, VOC2010+)
    and ``voc07_ap50`` (VOC2007's 11 points).

    ``predictions`` and ``targets`` are lists (one per image) of dicts: predictions with
    ``boxes`` (xyxy pixels), ``scores``, ``labels``; targets with ``boxes``, ``labels``
    and optionally ``difficult`` (bool; the VOC AP50 leaves those boxes out, COCO mAP
    counts them as any box). Images without ground truth still count (their detections
    are false positives). With no ground-truth box at all the metrics are 0.
    """

    primary = "mAP"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.images: list[dict[str, np.ndarray]] = []
        self.detections: list[dict[str, np.ndarray]] = []

    def update(
        self, predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]
    ) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for pred, target in zip(predictions, targets, strict=True):
            self.images.append(_numpy(target, tuple(k for k in TARGET_KEYS if k in target)))
            self.detections.append(_numpy(pred, ("boxes", "scores", "labels")))

    def compute(self) -> dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        voc = {
            "voc_ap50": voc_ap50(self.images, self.detections, self.num_classes),
            "voc07_ap50": voc_ap50(self.images, self.detections, self.num_classes, True),
        }
        zero = {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0}
        ground_truth, results = self._coco_records()
        if not ground_truth["annotations"] or not results:
            return zero | voc
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco_gt = COCO()
            coco_gt.dataset = ground_truth
            coco_gt.createIndex()
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [max(0.0, float(s)) for s in evaluator.stats[:3]]  # -1 = undefined
        return dict(zip(zero, stats, strict=True)) | voc

    def _coco_records(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """COCO ids start at 1: COCOeval treats id 0 as "unmatched"."""
        images, annotations, results = [], [], []
        for image_id, (target, pred) in enumerate(
            zip(self.images, self.detections, strict=True), start=1
        ):
            images.append({"id": image_id})
            for box, label in zip(target["boxes"], target["labels"], strict=True):
                x, y, w, h = _xywh(box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [x, y, w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
            for box, score, label in zip(
                pred["boxes"], pred["scores"], pred["labels"], strict=True
            ):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": list(_xywh(box)),
                        "score": float(score),
                    }
                )
        categories = [{"id": c} for c in range(self.num_classes)]
        return {"images": images, "annotations": annotations, "categories": categories}, results


TARGET_KEYS = ("boxes", "labels", "difficult")


def _numpy(record: Mapping[str, Tensor], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {k: torch.as_tensor(record[k]).detach().cpu().numpy() for k in keys}


def _xywh(box: np.ndarray) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1, y1, x2 - x1, y2 - y1


class MeanLoss(MetricAccumulator):
    """Self-supervised tasks: the mean validation loss (lower is better).

    ``predictions`` is a loss: a scalar tensor (one batch = one sample of the mean), a
    ``[B]`` tensor of per-sample losses (each counts once), or a dict of named losses
    (summed, like the training loss). ``targets`` is ignored.
    """

    primary = "loss"

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, predictions: Tensor | Mapping[str, Tensor], targets: Any = None) -> None:
        loss = sum(predictions.values()) if isinstance(predictions, Mapping) else predictions
        loss = torch.as_tensor(loss).detach().float()
        self.total += float(loss.sum())
        self.count += max(1, loss.numel())

    def compute(self) -> dict[str, float]:
        return {"loss": self.total / max(1, self.count)}
