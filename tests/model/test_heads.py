"""Task heads: the registry, output formats, and that each loss trains (overfits a tiny batch)."""

from __future__ import annotations

import sys

import pytest
import torch

from xlearner.config import TaskType
from xlearner.metrics import DetectionMAP, MeanIoU, MultilabelMAP, Top1Accuracy
from xlearner.models import heads
from xlearner.models.backbones import create_backbone
from xlearner.models.heads import TaskHead, create_head, register_head

SIZE, BATCH, CLASSES = 64, 4, 3
TINY = (16, 32, 64, 128)


def _images() -> torch.Tensor:
    return torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


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


def _targets(task: str):
    gen = torch.Generator().manual_seed(1)
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
    mask = torch.randint(0, CLASSES, (BATCH, SIZE, SIZE), generator=gen)
    mask[:, :8] = 255  # ignored rows
    return {"mask": mask}


def _overfit(task: str, steps: int) -> tuple[torch.nn.Module, TaskHead, list[float]]:
    torch.manual_seed(0)
    backbone = create_backbone("tiny_resnet")
    head = create_head(task, backbone.channels, CLASSES, SIZE)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    images, targets = _images(), _targets(task)
    history = []
    for _ in range(steps):
        inputs, ctx = head.prepare_inputs(images)
        losses = head(backbone(inputs), images, targets, ctx)
        loss = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss))
    return backbone.eval(), head.eval(), history


@pytest.mark.parametrize("task", ["cls", "multilabel", "det", "seg"])
def test_each_head_overfits_a_fixed_batch(task):
    _, _, history = _overfit(task, steps=20)
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


def test_ssl_heads_are_imported_on_first_use(monkeypatch, tmp_path):
    (tmp_path / "fake_ssl_heads.py").write_text(
        "from xlearner.models.heads import ClassificationHead, register_head\n"
        "@register_head('mim')\n"
        "class FakeMIM(ClassificationHead):\n"
        "    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(heads, "_HEADS", {k: v for k, v in heads._HEADS.items() if k != "mim"})
    monkeypatch.setattr(heads, "SSL_MODULE", "fake_ssl_heads")
    monkeypatch.delitem(sys.modules, "fake_ssl_heads", raising=False)
    head = create_head("mim", TINY, 0, SIZE)
    assert type(head).__name__ == "FakeMIM" and head.task == "mim"


def test_a_missing_ssl_module_reads_as_an_unknown_task(monkeypatch):
    monkeypatch.setattr(
        heads, "_HEADS", {k: v for k, v in heads._HEADS.items() if k != "contrastive"}
    )
    monkeypatch.setattr(heads, "SSL_MODULE", "xlearner.models.no_such_module")
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


def test_detection_levels_follow_the_image_size():
    assert create_head("det", TINY, CLASSES, 64).levels == (2, 3, 4, 5)
    assert create_head("det", TINY, CLASSES, 224).levels == (3, 4, 5)
    with pytest.raises(ValueError, match="levels"):
        create_head("det", TINY, CLASSES, 64, levels=(3, 6))


@pytest.mark.slow
def test_detector_trained_on_a_batch_finds_its_boxes_with_0_based_labels():
    backbone, head, _ = _overfit("det", steps=150)
    metric = head.metric()
    with torch.no_grad():
        metric.update(head.predict(backbone(_images())), _det_targets())
    assert metric.compute()["mAP50"] > 0.5
