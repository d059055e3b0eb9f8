"""PASCAL VOC layouts (voc_det, voc_seg): read end to end through ingest, and bad inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_image
from PIL import Image

from xlearner.config import DownstreamConfig, SourceConfig
from xlearner.data.formats import read_source
from xlearner.data.ingest import ingest_source
from xlearner.data.shards import ShardDataset, collate_fn
from xlearner.data.source_files import SourceError
from xlearner.data.synth import LAYOUT_SPECS, synthesize
from xlearner.data.voc import VOC_SEG_CLASSES
from xlearner.tasks import TaskType

SYNTH_IMAGES = 20
NAME = re.compile(r"<name>(\w+)</name>")
DIFFICULT = re.compile(r"<difficult>(\d)</difficult>")
XMIN = re.compile(r"<xmin>(\d+)</xmin>")


@pytest.fixture(scope="module")
def voc_synth(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("voc")
    return synthesize(root, images_per_source=SYNTH_IMAGES, specs=LAYOUT_SPECS, log=lambda _: None)


def ids(root: Path, task: str, split: str) -> list[str]:
    return (root / "ImageSets" / task / f"{split}.txt").read_text().split()


def obj(name: str, box: tuple[int, int, int, int], difficult: str | None = "0") -> str:
    flag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>{name}</name>{flag}<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
    )


def voc_det(root: Path, annotations: dict[str, str], val: tuple[str, ...] = ()) -> Path:
    """A small voc_det source: 32x24 PNGs, one XML body (the <object>s) per id."""
    for i, (image_id, objects) in enumerate(annotations.items()):
        write_image(root / "JPEGImages" / f"{image_id}.png", seed=i)
        xml = f"<annotation><size><width>32</width><height>24</height></size>{objects}</annotation>"
        (root / "Annotations" / f"{image_id}.xml").parent.mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    lists = root / "ImageSets" / "Main"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in annotations if i not in val))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return root


def voc_seg(root: Path, masks: dict[str, np.ndarray]) -> Path:
    """A small voc_seg source with palette masks (all ids in train.txt)."""
    for i, (image_id, values) in enumerate(masks.items()):
        h, w = values.shape
        write_image(root / "JPEGImages" / f"{image_id}.png", size=(w, h), seed=i)
        mask = Image.fromarray(values.astype(np.uint8), mode="L")
        mask.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        mask.save(root / "SegmentationClass" / f"{image_id}.png")
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in masks))
    (lists / "val.txt").write_text("")
    return root


def problems(root: Path, fmt: str) -> list[str]:
    with pytest.raises(SourceError) as err:
        read_source(str(root), fmt)
    return [str(p) for p in err.value.problems]


# ---------------------------------------------------------------- end to end


def test_voc_det_ingests_with_its_split_and_difficult_flags(voc_synth, store, tmp_path):
    root = voc_synth["voc_det_shapes"]
    source = DownstreamConfig(name="voc", format="voc_det", uri=str(root))
    manifest = ingest_source(source, store, log=lambda _: None)
    assert manifest["format"] == "det" and manifest["layout"] == "voc_det"
    assert manifest["split"]["by"] == "layout"
    xmls = {xml.stem: xml.read_text() for xml in (root / "Annotations").iterdir()}
    assert manifest["classes"] == sorted({n for x in xmls.values() for n in NAME.findall(x)})
    counts = {s: manifest["splits"][s]["records"] for s in ("train", "val")}
    assert counts == {s: len(ids(root, "Main", s)) for s in ("train", "val")}
    uri = store.uri(f"sources/voc/{manifest['version']}/manifest.json")
    val = ShardDataset(uri, "val", 64)
    for i in range(len(val)):
        _, label, _ = val.raw(i)
        _, target = val[i]
        xml = xmls[Path(label["file"]).stem]
        assert label["difficult"] == [int(d) for d in DIFFICULT.findall(xml)]
        assert target["difficult"].dtype == torch.bool
        assert target["difficult"].tolist() == [bool(d) for d in label["difficult"]]
        assert len(target["boxes"]) == len(label["boxes"])
        xmin = int(XMIN.search(xml).group(1))
        assert label["boxes"][0][0] == xmin - 1  # VOC's 1-based corners, 0-based here
    images, targets = collate_fn(manifest["format"])([val[0], val[1]])
    assert isinstance(targets, list) and images.shape == (2, 3, 64, 64)
    assert {d for x in xmls.values() for d in DIFFICULT.findall(x)} == {"0", "1"}


def test_voc_seg_ingests_palette_masks_with_ignore(voc_synth, store):
    root = voc_synth["voc_seg_shapes"]
    source = SourceConfig(name="vocseg", format="voc_seg", uri=str(root))
    assert source.resolved_tasks == [TaskType.seg]
    manifest = ingest_source(source, store, log=lambda _: None)
    assert manifest["format"] == "seg" and manifest["layout"] == "voc_seg"
    assert manifest["classes"] == ["background", *LAYOUT_SPECS[1].shapes]
    assert manifest["splits"]["val"]["records"] == len(ids(root, "Segmentation", "val"))
    uri = store.uri(f"sources/vocseg/{manifest['version']}/manifest.json")
    _, target = ShardDataset(uri, "train", 64)[0]
    values = set(torch.unique(target["mask"]).tolist())
    assert 255 in values and 0 in values and values <= {*range(6), 255}


def test_voc_seg_defaults_to_the_21_voc_classes(tmp_path):
    values = np.zeros((24, 32))
    values[4:10, 4:10] = 15  # person
    values[3, :] = 255
    records, _ = read_source(str(voc_seg(tmp_path, {"a": values})), "voc_seg")
    assert records[0].label == {"classes": [0, 15]}
    assert VOC_SEG_CLASSES[15] == "person" and len(VOC_SEG_CLASSES) == 21


def test_voc_det_test_list_is_the_val_split(tmp_path):
    root = voc_det(tmp_path, {"a": obj("cat", (2, 2, 10, 10)), "b": obj("dog", (3, 3, 9, 9))})
    lists = root / "ImageSets" / "Main"
    (lists / "trainval.txt").write_text("a\n")
    (lists / "test.txt").write_text("b\n")
    records, _ = read_source(str(root), "voc_det")
    assert {r.file: r.split for r in records} == {
        "JPEGImages/a.png": "train",
        "JPEGImages/b.png": "val",
    }
    assert records[0].label == {"boxes": [[1.0, 1.0, 10.0, 10.0]], "labels": [0], "difficult": [0]}


def test_voc_images_outside_the_lists_are_not_part_of_the_source(tmp_path):
    root = voc_det(tmp_path, {"a": obj("cat", (2, 2, 10, 10))})
    write_image(root / "JPEGImages" / "other_challenge.png")
    records, found = read_source(str(root), "voc_det")
    assert [r.file for r in records] == ["JPEGImages/a.png"] and found == []


# ---------------------------------------------------------------- bad inputs


def test_malformed_xml_names_the_file(tmp_path):
    root = voc_det(tmp_path, {"a": obj("cat", (2, 2, 10, 10)), "b": "<object><name>dog"})
    assert any(
        p.startswith("Annotations/b.xml: is not well-formed XML") for p in problems(root, "voc_det")
    )


def test_entity_expansion_is_refused(tmp_path):
    root = voc_det(tmp_path, {"a": obj("cat", (2, 2, 10, 10))})
    laughs = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
        "<annotation><object><name>&lol2;</name></object></annotation>"
    )
    (root / "Annotations" / "a.xml").write_text(laughs)
    (found,) = problems(root, "voc_det")
    assert found.startswith("Annotations/a.xml: ") and ("DTD" in found or "refused" in found)


def test_a_box_without_difficult_names_the_file(tmp_path):
    root = voc_det(tmp_path, {"a": obj("cat", (2, 2, 10, 10)) + obj("dog", (1, 1, 5, 5), None)})
    (found,) = problems(root, "voc_det")
    assert found.startswith("Annotations/a.xml: object 2 (dog): <difficult> is missing")


def test_bad_boxes_and_sizes_name_the_annotation(tmp_path):
    root = voc_det(tmp_path, {"a": obj("cat", (2, 2, 40, 10)), "b": obj("dog", (1, 1, "x", 5))})
    found = problems(root, "voc_det")
    assert any(
        p.startswith("JPEGImages/a.png: Annotations/a.xml: box") and "outside" in p for p in found
    )
    assert "Annotations/b.xml: object 1 (dog): <bndbox/xmax> is 'x', not a number" in found


def test_listed_image_or_annotation_missing(tmp_path):
    root = voc_det(tmp_path, {"a": obj("cat", (2, 2, 10, 10)), "b": obj("dog", (1, 1, 5, 5))})
    (root / "Annotations" / "b.xml").unlink()
    (root / "ImageSets" / "Main" / "val.txt").write_text("ghost\n")
    found = problems(root, "voc_det")
    assert "JPEGImages/ghost.jpg: listed in ImageSets/Main/val.txt line 1 but missing" in found
    assert any(p.startswith("Annotations/b.xml: missing") for p in found)


def test_no_split_list_is_a_layout_error(tmp_path):
    root = voc_det(tmp_path, {"a": obj("cat", (2, 2, 10, 10))})
    for name in ("train.txt", "val.txt"):
        (root / "ImageSets" / "Main" / name).unlink()
    (found,) = problems(root, "voc_det")
    assert found.startswith("ImageSets/Main/: no split list")


def test_unknown_palette_index_names_the_mask(tmp_path):
    values = np.zeros((24, 32))
    values[2:6, 2:6] = 30
    (found,) = problems(voc_seg(tmp_path, {"a": values}), "voc_seg")
    assert found.startswith("JPEGImages/a.png: SegmentationClass/a.png: mask values [30]")


def test_skip_invalid_leaves_a_bad_annotation_out(tmp_path, store):
    root = voc_det(tmp_path, {"a": obj("cat", (2, 2, 10, 10)), "b": "<object>"}, val=("a",))
    source = SourceConfig(name="v", format="voc_det", uri=str(root), skip_invalid=True)
    manifest = ingest_source(source, store, log=lambda _: None)
    assert manifest["splits"]["val"]["records"] == 1 and manifest["splits"]["train"]["records"] == 0
    assert [s["file"] for s in manifest["skipped"]] == ["Annotations/b.xml"]
