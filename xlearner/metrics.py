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


class DetectionMAP(MetricAccumulator):
    """Detection: COCO mAP@[.5:.95], mAP50 and mAP75 by pycocotools, built in memory.

    ``predictions`` and ``targets`` are lists (one per image) of dicts: predictions with
    ``boxes`` (xyxy pixels), ``scores``, ``labels``; targets with ``boxes`` and ``labels``.
    Images without ground truth still count (their detections are false positives).
    With no ground-truth box at all the metrics are 0.
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
            self.images.append(_numpy(target, ("boxes", "labels")))
            self.detections.append(_numpy(pred, ("boxes", "scores", "labels")))

    def compute(self) -> dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        zero = {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0}
        ground_truth, results = self._coco_records()
        if not ground_truth["annotations"] or not results:
            return zero
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco_gt = COCO()
            coco_gt.dataset = ground_truth
            coco_gt.createIndex()
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [max(0.0, float(s)) for s in evaluator.stats[:3]]  # -1 = undefined
        return dict(zip(zero, stats, strict=True))

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
