"""The paper's transfer protocols: VOC AP50 with difficult boxes, the probe's level, the
classification fine-tune, and the evaluation cap reported in the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from pipeline_config import ingest_all, tiny_config, tiny_config_dict

from stages import transfer
from xlearner.config import ConfigError, DownstreamConfig, validate_config
from xlearner.contract import RESULT_FILE
from xlearner.data.synth import LAYOUT_SPECS, synthesize
from xlearner.metrics import DetectionMAP, voc_ap50
from xlearner.store import LocalStore
from xlearner.transfer import probe
from xlearner.transfer.evaluate import transfer_evaluation
from xlearner.transfer.report import build_report, format_table, write_report

RANDOM = "random:tiny_resnet"


def box(*xyxy: float) -> list[float]:
    return list(xyxy)


# Two images of class 0 (A: one normal and one difficult box; B: one box) and a difficult
# class-1 box in B. Detections in score order: TP, on the difficult box (ignored), FP,
# TP (IoU 100/110), a second hit on A's matched box (FP); and one class-2 detection with
# no class-2 box (a class without positives is left out of the mean).
IMAGES = [
    {
        "boxes": np.array([box(0, 0, 10, 10), box(20, 20, 30, 30)]),
        "labels": np.array([0, 0]),
        "difficult": np.array([False, True]),
    },
    {
        "boxes": np.array([box(0, 0, 10, 10), box(40, 40, 50, 50)]),
        "labels": np.array([0, 1]),
        "difficult": np.array([False, True]),
    },
]
DETECTIONS = [
    {
        "boxes": np.array([box(0, 0, 10, 10), box(20, 20, 30, 30), box(0, 0, 10, 10)]),
        "scores": np.array([0.9, 0.8, 0.5]),
        "labels": np.array([0, 0, 0]),
    },
    {
        "boxes": np.array([box(50, 50, 60, 60), box(0, 0, 10, 11), box(40, 40, 50, 50)]),
        "scores": np.array([0.7, 0.6, 0.95]),
        "labels": np.array([0, 0, 1]),
    },
]


def test_voc_ap50_by_hand_honours_difficult_boxes():
    # Class 0, difficult ignored: TP, (skip), FP, TP, FP over 2 positives ->
    # recall .5 .5 .5 1 1, precision 1 1 .5 2/3 .5.
    # Area under the envelope: .5 * 1 + .5 * 2/3; 11 points: (6 * 1 + 5 * 2/3) / 11.
    assert voc_ap50(IMAGES, DETECTIONS, 3) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_ap50(IMAGES, DETECTIONS, 3, eleven_point=True) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_voc_ap50_counts_the_same_boxes_when_none_is_difficult():
    plain = [{k: v for k, v in image.items() if k != "difficult"} for image in IMAGES]
    # Class 0: TP TP FP TP FP over 3 positives -> recall 1/3 2/3 2/3 1 1, precision
    # 1 1 2/3 3/4 3/5: AP = 1/3 + 1/3 + 1/3 * 3/4. Class 1: its one box found first: 1.
    class_0 = 1 / 3 + 1 / 3 + 0.75 / 3
    assert voc_ap50(plain, DETECTIONS, 3) == pytest.approx((class_0 + 1.0) / 2)


def test_voc_ap50_is_strict_at_iou_one_half_and_zero_without_positives():
    truth = [{"boxes": np.array([box(0, 0, 10, 10)]), "labels": np.array([0])}]
    half = [{"boxes": np.array([box(0, 0, 10, 5)]), "scores": np.array([1.0]), "labels": [0]}]
    assert voc_ap50(truth, half, 1) == 0.0  # IoU exactly 0.5: not a match (devkit's `>`)
    none = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}]
    assert voc_ap50(none, half, 1) == 0.0


def test_detection_metric_reports_voc_ap50_beside_coco_map():
    metric = DetectionMAP(num_classes=3)
    as_tensors = [{k: torch.as_tensor(v) for k, v in d.items()} for d in DETECTIONS]
    metric.update(as_tensors, [{k: torch.as_tensor(v) for k, v in t.items()} for t in IMAGES])
    result = metric.compute()
    assert result["voc_ap50"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert result["voc07_ap50"] == pytest.approx((6 + 5 * 2 / 3) / 11)
    assert 0.0 < result["mAP"] <= result["mAP50"] <= 1.0  # COCO counts the difficult boxes


# ---------------------------------------------------------------- on downstream sets


@pytest.fixture(scope="module")
def downstream(synth_data, tmp_path_factory) -> tuple[str, list[dict], dict[str, str]]:
    """The store root, configs and manifest URIs of down_cls_a and of voc_det_shapes (the
    synthetic VOC layout, with difficult boxes), ingested at 32 px."""
    root = tmp_path_factory.mktemp("transfer-store")
    voc = synthesize(
        root / "data", images_per_source=30, specs=LAYOUT_SPECS[:1], log=lambda _: None
    )
    store = LocalStore(root / "store")
    configs = [
        synth_data.source("down_cls_a"),
        {"name": "voc", "format": "voc_det", "uri": str(voc["voc_det_shapes"])},
    ]
    sources = [DownstreamConfig(**config) for config in configs]
    manifests = ingest_all(sources, store, image_size=32, log=lambda _: None)
    return str(root / "store"), configs, manifests


def evaluation(synth_data, downstream, names: tuple[str, ...], **transfer):
    store_root, configs, manifests = downstream
    cfg = tiny_config_dict(
        str(synth_data.root),
        store_root,
        downstream=(),
        transfer={"finetune": {"steps": 1, "batch_size": 8, "warmup_steps": 0}, **transfer},
        engine={"device": "cpu", "log_every_steps": 1, "eval_max_images": 8},
    )
    cfg["downstream"] = [c for c in configs if c["name"] in names]
    chosen = {name: manifests[name] for name in names}
    return transfer_evaluation(validate_config(cfg, origin="test"), {"b": RANDOM}, chosen)


def test_probe_reads_the_configured_level(synth_data, downstream, monkeypatch):
    seen = []
    extract = probe.extract_features

    def spy(backbone, loader, device, level=4):
        features, labels = extract(backbone, loader, device, level)
        seen.append((level, features.shape[1]))
        return features, labels

    monkeypatch.setattr(probe, "extract_features", spy)
    run = evaluation(
        synth_data,
        downstream,
        ("down_cls_a",),
        probe_level="C4",
        probe_l2=[1e-2],
        probe_max_iter=20,
    )
    row = run.row("b", run.backbones["b"])
    channels = run.backbones["b"].channels
    assert seen == [(3, channels[2])] * 2  # train and val features of C4
    assert 0.0 <= row["cls"]["down_cls_a"] <= 100.0
    assert build_report([row], run.protocol)["protocol"]["cls"] == "linear-probe (C4)"


def test_cls_finetune_and_voc_ap50_with_the_cap_in_the_table(synth_data, downstream, tmp_path):
    names = ("down_cls_a", "voc")
    run = evaluation(synth_data, downstream, names, cls_protocol="finetune", eval_max_images=5)
    assert run.formats == {"down_cls_a": "cls", "voc": "det"}  # voc_det is scored as det
    row = run.row("b", run.backbones["b"])
    assert 0.0 <= row["cls"]["down_cls_a"] <= 100.0
    assert 0.0 <= row["ap50"]["voc"] <= 100.0 and 0.0 <= row["det"]["voc"] <= 100.0
    for name in names:
        scored, total = row["eval_images"][name]
        assert scored == 5 < total
    report = build_report([row], run.protocol)
    table = format_table(report)
    assert "Det AP50 (voc)" in table and "Det mAP (voc)" in table
    markdown = write_report(report, tmp_path)["md"].read_text()
    assert "AVG Cls: mean fine-tune (steps: 1) top-1" in markdown
    assert "Det AP50: the PASCAL VOC AP at IoU 0.5, all points, difficult boxes" in markdown
    assert f"voc: scored on 5 of its {row['eval_images']['voc'][1]:,} val images" in markdown


def test_the_whole_val_split_is_scored_by_default(synth_data, downstream, tmp_path):
    run = evaluation(synth_data, downstream, ("down_cls_a",), cls_protocol="finetune")
    row = run.row("b", run.backbones["b"])
    scored, total = row["eval_images"]["down_cls_a"]
    assert scored == total > 8  # the engine's eval_max_images (8) does not cut transfer
    markdown = write_report(build_report([row], run.protocol), tmp_path)["md"].read_text()
    assert "scored on" not in markdown


@pytest.mark.parametrize(
    ("transfer", "field"),
    [
        ({"probe_level": "C6"}, "transfer.probe_level"),
        ({"cls_protocol": "knn"}, "transfer.cls_protocol"),
        ({"eval_max_images": 0}, "transfer.eval_max_images"),
    ],
)
def test_bad_transfer_settings_fail_at_config_load(tmp_path, transfer, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(str(tmp_path), str(tmp_path / "store"), transfer=transfer)


def test_the_transfer_stage_reports_voc_ap50(synth_data, downstream, tmp_path, capsys):
    store_root, configs, manifests = downstream
    data = tiny_config_dict(
        str(synth_data.root),
        store_root,
        downstream=(),
        transfer={"finetune": {"steps": 1, "batch_size": 8, "warmup_steps": 0}},
        engine={"device": "cpu"},
    )
    data["downstream"] = [c for c in configs if c["name"] == "voc"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    argv = ["--config", str(config), "--backbone", f"r={RANDOM}", "--out", str(tmp_path / "out")]
    code = transfer.main([*argv, "--downstream", f"voc={manifests['voc']}"])
    assert code == 0, capsys.readouterr().out
    result = json.loads((tmp_path / "out" / RESULT_FILE).read_text())
    (row,) = result["report"]["rows"]
    assert row["det_ap50"] == row["ap50"]["voc"] and 0.0 <= row["det_ap50"] <= 100.0
    assert "Det AP50 (voc)" in (tmp_path / "out" / "report" / "report.md").read_text()
