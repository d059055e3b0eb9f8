"""Task heads: the registry, output formats, and that each loss trains (overfits a tiny batch)."""

from __future__ import annotations

import functools

import pytest
import torch

from xlearner.metrics import DetectionMAP, MeanIoU, MultilabelMAP, Top1Accuracy
from xlearner.models import heads
from xlearner.models.head import TaskHead, available_heads, head_class, register_head
from xlearner.models.heads import create_head
from xlearner.models.registry import create_backbone
from xlearner.models.ssl import ContrastiveHead, MIMHead
from xlearner.tasks import TaskType

SIZE, BATCH, CLASSES = 64, 4, 3
OVERFIT_STEPS = 30
TINY = (16, 32, 64, 128)


def _det_targets() -> list[dict[str, torch.Tensor]]:
    boxes = [
        [[4.0, 6.0, 30.0, 28.0], [36.0, 30.0, 60.0, 58.0]],
        [[10.0, 10.0, 50.0, 50.0]],
        [],  # an image without objects
        [[20.0, 2.0, 44.0, 24.0]],
    ]
    labels = [[0, 2], [1], [], [0]]
    return [
        {
            "boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(lab, dtype=torch.int64),
        }
        for b, lab in zip(boxes, labels, strict=True)
    ]


def _images() -> torch.Tensor:
    """Dim noise with each detection box painted in its class's colour (red, green, blue)."""
    images = 0.3 * torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for image, target in zip(images, _det_targets(), strict=True):
        for (x0, y0, x1, y1), label in zip(
            target["boxes"].int().tolist(), target["labels"], strict=True
        ):
            image[label, y0:y1, x0:x1] = 1.0
    return images


def _seg_mask() -> torch.Tensor:
    """0 = background, 1 + label inside the boxes; the top rows are ignored (255)."""
    mask = torch.zeros(BATCH, SIZE, SIZE, dtype=torch.int64)
    for image_mask, target in zip(mask, _det_targets(), strict=True):
        for (x0, y0, x1, y1), label in zip(
            target["boxes"].int().tolist(), target["labels"], strict=True
        ):
            image_mask[y0:y1, x0:x1] = 1 + label
    mask[:, :4] = 255
    return mask


def _targets(task: str):
    if task == "cls":
        return {"label": torch.tensor([0, 1, 2, 1])}
    if task == "multilabel":
        return {
            "labels": torch.tensor(
                [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32
            )
        }
    if task == "det":
        return _det_targets()
    return {"mask": _seg_mask()}


@functools.cache  # one training per task for the whole module
def _overfit(task: str) -> tuple[torch.nn.Module, TaskHead, list[float]]:
    torch.manual_seed(0)
    backbone = create_backbone("tiny_resnet")
    head = create_head(task, backbone.channels, CLASSES + (task == "seg"), SIZE)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    images, targets = _images(), _targets(task)
    history = []
    for _ in range(OVERFIT_STEPS):
        inputs, ctx = head.prepare_inputs(images)
        losses = head(backbone(inputs), images, targets, ctx)
        loss = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return backbone.eval(), head.eval(), history


@pytest.mark.parametrize("task", ["cls", "multilabel", "det", "seg"])
def test_each_head_overfits_a_fixed_batch(task):
    _, _, history = _overfit(task)
    assert history[-1] < 0.6 * history[0], history


def test_create_head_accepts_task_types_and_checks_its_arguments():
    head = create_head(TaskType.cls, TINY, CLASSES, SIZE)
    assert head.task == "cls" and head.num_classes == CLASSES and head.channels == TINY
    with pytest.raises(ValueError, match="no head for task 'depth'"):
        create_head("depth", TINY, CLASSES, SIZE)
    with pytest.raises(ValueError, match="needs num_classes >= 1"):
        create_head("seg", TINY, 0, SIZE)
    with pytest.raises(ValueError, match="C2..C5"):
        create_head("cls", TINY[:3], CLASSES, SIZE)
    with pytest.raises(ValueError, match="already registered"):
        register_head("cls")(heads.ClassificationHead)


def test_create_head_knows_the_self_supervised_heads():
    # heads imports ssl (a plain import): every task has its head once heads is imported
    assert {"cls", "multilabel", "det", "seg", "mim", "contrastive"} <= set(available_heads())
    assert isinstance(create_head("mim", TINY, 0, SIZE), MIMHead)
    assert isinstance(create_head(TaskType.contrastive, TINY, 0, SIZE), ContrastiveHead)


def test_an_unregistered_task_reads_as_an_unknown_task(monkeypatch):
    registered = {task: head_class(task) for task in available_heads() if task != "contrastive"}
    monkeypatch.setattr("xlearner.models.head._HEADS", registered)
    with pytest.raises(ValueError, match="no head for task 'contrastive'"):
        create_head("contrastive", TINY, 0, SIZE)


@pytest.mark.parametrize(
    ("task", "metric_type"),
    [("cls", Top1Accuracy), ("multilabel", MultilabelMAP), ("det", DetectionMAP), ("seg", MeanIoU)],
)
def test_supervised_heads_are_identity_on_inputs_and_give_their_metric(task, metric_type):
    head = create_head(task, TINY, CLASSES, SIZE)
    images = _images()
    inputs, ctx = head.prepare_inputs(images)
    assert inputs is images and ctx is None
    assert isinstance(head.metric(), metric_type)


def test_prediction_formats():
    torch.manual_seed(0)
    backbone = create_backbone("tiny_resnet").eval()
    with torch.no_grad():
        features = backbone(_images())
        for task in ("cls", "multilabel"):
            assert create_head(task, TINY, CLASSES, SIZE).eval().predict(features).shape == (
                BATCH,
                CLASSES,
            )
        seg = create_head("seg", TINY, CLASSES, SIZE).eval().predict(features)
        assert seg.shape == (BATCH, CLASSES, SIZE, SIZE)
        det = create_head("det", TINY, CLASSES, SIZE, score_thresh=0.0).eval().predict(features)
    assert len(det) == BATCH
    for image in det:
        assert set(image) == {"boxes", "scores", "labels"}
        assert image["boxes"].shape[1] == 4 and 0 < len(image["boxes"]) <= 100
        assert image["boxes"].min() >= 0 and image["boxes"].max() <= SIZE
        assert image["labels"].min() >= 0 and image["labels"].max() < CLASSES


def test_detection_pyramid_levels():
    assert create_head("det", TINY, CLASSES, SIZE).levels == (3, 4, 5)
    det = create_head("det", TINY, CLASSES, SIZE, levels=(2, 3, 4, 5), score_thresh=0.0).eval()
    with torch.no_grad():
        predictions = det.predict(create_backbone("tiny_resnet").eval()(_images()))
    assert all(len(p["boxes"]) > 0 for p in predictions)
    with pytest.raises(ValueError, match="levels"):
        create_head("det", TINY, CLASSES, SIZE, levels=(3, 6))


def test_detector_trained_on_a_batch_finds_its_boxes_with_0_based_labels():
    backbone, head, _ = _overfit("det")
    metric = head.metric()
    with torch.no_grad():
        metric.update(head.predict(backbone(_images())), _det_targets())
    result = metric.compute()
    assert result["mAP50"] > 0.9 and result["mAP"] > 0.5, result


def test_segmentation_loss_ignores_255_pixels():
    torch.manual_seed(0)
    head = create_head("seg", TINY, CLASSES, SIZE)
    features = create_backbone("tiny_resnet")(_images())
    mask = torch.randint(
        0, CLASSES, (BATCH, SIZE, SIZE), generator=torch.Generator().manual_seed(2)
    )
    mask[:, :32] = 255
    relabelled = mask.clone()
    relabelled[:, :32] = 0
    loss = head(features, _images(), {"mask": mask}, None)["ce"]
    assert not torch.isclose(loss, head(features, _images(), {"mask": relabelled}, None)["ce"])
    half = head.logits(features, (SIZE, SIZE))[:, :, 32:]
    assert torch.isclose(loss, torch.nn.functional.cross_entropy(half, mask[:, 32:]))
    all_ignored = head(features, _images(), {"mask": torch.full_like(mask, 255)}, None)["ce"]
    assert all_ignored.item() == 0.0
