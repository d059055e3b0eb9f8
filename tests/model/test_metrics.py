"""Metric accumulators against answers known by hand or by scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from xlearner.metrics import (
    DetectionMAP,
    MeanIoU,
    MeanLoss,
    MultilabelMAP,
    Top1Accuracy,
    average_precision,
)


def test_top1_accumulates_over_batches():
    metric = Top1Accuracy()
    metric.update(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), {"label": torch.tensor([0, 1])})
    metric.update(torch.tensor([[2.0, 1.0], [5.0, 3.0]]), {"label": torch.tensor([1, 0])})
    assert metric.compute() == {"top1": 0.75}
    assert metric.primary == "top1"


def test_average_precision_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, size=40).astype(float)  # many ties
        positives = rng.random(40) < 0.3
        positives[0] = True
        assert average_precision(scores, positives) == pytest.approx(
            average_precision_score(positives, scores), abs=1e-12
        )
    assert np.isnan(average_precision(np.ones(3), np.zeros(3, dtype=bool)))


def test_multilabel_map_is_1_for_perfect_ranking_and_skips_classes_without_positives():
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)
    perfect = MultilabelMAP()
    perfect.update(labels * 4 - 2, {"labels": labels})
    assert perfect.compute() == {"mAP": 1.0}
    # class 0 ranked: positive, negative, positive -> AP = (1 + 2/3) / 2; class 1 perfect.
    metric = MultilabelMAP()
    metric.update(torch.tensor([[0.9, 0.1, 0.0]]), {"labels": labels[:1]})
    metric.update(torch.tensor([[0.8, 0.9, 0.0], [0.7, 0.8, 0.0]]), {"labels": labels[1:]})
    assert metric.compute()["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)


def test_mean_iou_of_a_known_confusion_matrix():
    # rows = target, cols = prediction: class 0: 3 hits, class 1: 1 hit, class 2 never occurs
    target = torch.tensor([[0, 0, 0, 0, 1, 1, 255, 255]])
    predicted = torch.tensor([[0, 0, 0, 1, 1, 0, 2, 1]])
    metric = MeanIoU(num_classes=3)
    metric.update(predicted.view(1, 1, 8), {"mask": target.view(1, 1, 8)})
    # IoU_0 = 3 / (4 + 4 - 3) = 3/5; IoU_1 = 1 / (2 + 2 - 1) = 1/3; ignored pixels do not count
    result = metric.compute()
    assert result["mIoU"] == pytest.approx((3 / 5 + 1 / 3) / 2)
    assert result["pixel_acc"] == pytest.approx(4 / 6)
    assert metric.confusion.tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_mean_iou_takes_logits_and_is_1_for_perfect_predictions():
    mask = torch.randint(0, 4, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    logits = torch.nn.functional.one_hot(mask, 4).permute(0, 3, 1, 2).float()
    metric = MeanIoU(num_classes=4)
    metric.update(logits, {"mask": mask})
    assert metric.compute() == {"mIoU": 1.0, "pixel_acc": 1.0}


def _det_targets():
    return [
        {
            "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 5.0, 60.0, 25.0]]),
            "labels": torch.tensor([0, 1]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[0.0, 0.0, 20.0, 40.0]]), "labels": torch.tensor([1])},
    ]


def _as_predictions(targets, shift: float = 0.0):
    return [
        {
            "boxes": t["boxes"] + shift,
            "scores": torch.full((len(t["labels"]),), 0.9),
            "labels": t["labels"],
        }
        for t in targets
    ]


def test_detection_map_is_1_for_perfect_boxes():
    metric = DetectionMAP(num_classes=2)
    metric.update(_as_predictions(_det_targets()), _det_targets())
    result = metric.compute()
    assert result["mAP"] == pytest.approx(1.0) and result["mAP50"] == pytest.approx(1.0)
    assert metric.primary == "mAP"


def test_detection_map_drops_for_shifted_boxes_and_wrong_labels():
    shifted = DetectionMAP(num_classes=2)
    shifted.update(_as_predictions(_det_targets(), shift=3.0), _det_targets())
    result = shifted.compute()
    assert 0.0 < result["mAP"] < 0.9
    assert result["mAP50"] == pytest.approx(1.0)  # IoU of a 20px box shifted 3px is ~0.6
    wrong = DetectionMAP(num_classes=2)
    predictions = _as_predictions(_det_targets())
    for p in predictions:
        p["labels"] = 1 - p["labels"]
    wrong.update(predictions, _det_targets())
    assert wrong.compute()["mAP"] == 0.0


def test_detection_map_handles_missing_predictions_and_missing_ground_truth():
    no_predictions = DetectionMAP(num_classes=2)
    empty = {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    no_predictions.update([empty] * 3, _det_targets())
    assert no_predictions.compute() == {
        "mAP": 0.0,
        "mAP50": 0.0,
        "mAP75": 0.0,
        "voc_ap50": 0.0,
        "voc07_ap50": 0.0,
    }
    no_ground_truth = DetectionMAP(num_classes=2)
    no_ground_truth.update(_as_predictions(_det_targets()), [_det_targets()[1]] * 3)
    assert no_ground_truth.compute()["mAP"] == 0.0
    with pytest.raises(ValueError, match="2 predictions for 3 targets"):
        no_ground_truth.update([empty] * 2, _det_targets())


def test_mean_loss_weights_per_sample_losses_and_sums_named_losses():
    metric = MeanLoss()
    metric.update(torch.tensor(2.0))
    metric.update(torch.tensor([1.0, 3.0, 5.0]))
    metric.update({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})
    assert metric.compute() == {"loss": pytest.approx((2 + 9 + 4) / 5)}
    assert metric.primary == "loss"
