"""Synthetic sources: formats, determinism, configs, and that the shapes are really there."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from xlearner.config import DownstreamConfig, SourceConfig
from xlearner.data.formats import SourceReader
from xlearner.data.synth import SPECS, synth_source_configs, synthesize


def tree_bytes(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", seed=3, images_per_source=12, log=lambda _: None)
    synthesize(tmp_path / "b", seed=3, images_per_source=12, log=lambda _: None)
    c = synthesize(tmp_path / "c", seed=4, images_per_source=12, log=lambda _: None)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    assert tree_bytes(a["shapes_cls"]) != tree_bytes(c["shapes_cls"])
    assert set(a) == {s.name for s in SPECS}


def test_is_idempotent_and_regenerates_on_new_arguments(tmp_path):
    logs = []
    synthesize(tmp_path, images_per_source=8, log=logs.append)
    stamp = (tmp_path / "shapes_cls" / "classes.txt").stat().st_mtime_ns
    synthesize(tmp_path, images_per_source=8, log=logs.append)
    assert len(logs) == 1 and (tmp_path / "shapes_cls" / "classes.txt").stat().st_mtime_ns == stamp
    synthesize(tmp_path, images_per_source=10, log=logs.append)
    assert len(logs) == 2
    assert len(list((tmp_path / "shapes_unlabeled" / "images").iterdir())) == 10
    assert not list(tmp_path.glob(".tmp-*"))


def test_every_source_reads_cleanly_with_the_expected_classes(synth_data):
    expected = {
        "shapes_cls": ["circle", "square", "triangle", "cross"],
        "shapes_attr": ["big", "blue", "green", "red", "small", "yellow"],
        "shapes_det": ["circle", "square", "triangle", "cross"],
        "shapes_seg": ["background", "circle", "square", "triangle", "cross"],
        "shapes_unlabeled": [],
        "down_cls_a": ["circle", "square", "triangle", "cross", "diamond"],
        "down_cls_b": ["one", "two", "three"],
        "down_det": ["circle", "square", "triangle", "cross", "diamond"],
        "down_seg": ["background", "circle", "square", "triangle", "cross", "diamond"],
    }
    for config in synth_data.sources + synth_data.downstream:
        reader = SourceReader(config["uri"], config["format"])
        records, problems = reader.read()
        assert problems == [] and len(records) == 120, config["name"]
        assert reader.classes == expected[config["name"]]
        if config["format"] == "cls":  # every class is present, roughly balanced
            counts = np.bincount([r.label["label"] for r in records], minlength=len(reader.classes))
            assert counts.min() >= 120 / len(reader.classes) / 3, (config["name"], counts)


def test_configs_validate_and_point_at_the_sources(synth_data):
    sources, downstream = synth_source_configs(synth_data.root)
    assert [SourceConfig(**s).name for s in sources] == [s.name for s in SPECS if not s.downstream]
    assert [DownstreamConfig(**d).format for d in downstream] == ["cls", "cls", "det", "seg"]
    assert all(synth_data.paths[s["name"]].as_posix() == s["uri"] for s in sources + downstream)


def test_shapes_are_large_and_boxes_are_tight(synth_data):
    root = synth_data.paths["shapes_det"]
    coco = json.loads((root / "annotations.json").read_text())
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]]
    assert min(sides) >= 64 / 4
    counts = np.bincount([a["image_id"] for a in coco["annotations"]])
    assert set(counts[counts > 0]) <= {1, 2, 3}
    # the seg masks of the same generator: every shape pixel lies inside a region of
    # the image whose colour differs from the background
    seg = synth_data.paths["shapes_seg"]
    for mask_path in sorted((seg / "masks").iterdir())[:10]:
        mask = np.asarray(Image.open(mask_path))
        assert (mask > 0).mean() > 0.05
        ys, xs = np.nonzero(mask)
        assert max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 >= 64 / 4


def test_classes_are_visually_separable(synth_data):
    """A nearest-centroid on shape silhouettes (from the seg masks) beats chance by far."""
    seg = synth_data.paths["shapes_seg"]
    features, labels = [], []
    for mask_path in sorted((seg / "masks").iterdir()):
        mask = np.asarray(Image.open(mask_path))
        for c in range(1, 5):
            region = mask == c
            if region.sum() < 150:  # occluded
                continue
            ys, xs = np.nonzero(region)
            crop = region[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            small = np.asarray(
                Image.fromarray(crop.astype(np.uint8) * 255).resize((8, 8)), dtype=np.float32
            )
            features.append(small.ravel() / 255)
            labels.append(c)
    x, y = np.stack(features), np.array(labels)
    half = len(y) // 2
    centroids = np.stack([x[:half][y[:half] == c].mean(0) for c in range(1, 5)])
    predicted = np.argmin(((x[half:, None] - centroids[None]) ** 2).sum(-1), axis=1) + 1
    assert (predicted == y[half:]).mean() > 0.8
