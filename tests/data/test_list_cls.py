"""List-file classification (csv_cls) and the ImageNet-style train/val split of ``cls``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from data_helpers import write_image

from xlearner.config import DownstreamConfig, SourceConfig
from xlearner.data.formats import read_source
from xlearner.data.ingest import ingest_source
from xlearner.data.shards import ShardDataset
from xlearner.data.source_files import SourceError
from xlearner.data.synth import LAYOUT_SPECS, synthesize
from xlearner.tasks import TaskType


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_list(root: Path, name: str, rows: list[tuple[str, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("file,label\n" + "".join(f"{f},{label}\n" for f, label in rows))


def listed_source(root: Path, lists: dict[str, list[tuple[str, str]]]) -> Path:
    for i, (_, rows) in enumerate(lists.items()):
        for j, (file, _) in enumerate(rows):
            write_image(root / file, seed=10 * i + j)
    for name, rows in lists.items():
        write_list(root, name, rows)
    return root


def problems(root: Path, fmt: str = "csv_cls") -> list[str]:
    with pytest.raises(SourceError) as err:
        read_source(str(root), fmt)
    return [str(p) for p in err.value.problems]


def test_csv_cls_ingests_with_the_lists_split(tmp_path, store):
    root = synthesize(tmp_path, images_per_source=20, specs=LAYOUT_SPECS, log=lambda _: None)[
        "csv_cls_shapes"
    ]
    source = DownstreamConfig(name="places", format="csv_cls", uri=str(root))
    manifest = ingest_source(source, store, log=lambda _: None)
    assert manifest["format"] == "cls" and manifest["layout"] == "csv_cls"
    assert manifest["split"]["by"] == "layout"
    classes = (root / "classes.txt").read_text().split()
    assert manifest["classes"] == classes
    uri = store.uri(f"sources/places/{manifest['version']}/manifest.json")
    for split in ("train", "val"):
        expected = {r["file"]: classes.index(r["label"]) for r in rows_of(root / f"{split}.csv")}
        data = ShardDataset(uri, split, 32)
        got = {data.raw(i)[1]["file"]: data.raw(i)[1]["label"] for i in range(len(data))}
        assert got == expected
        assert int(data[0][1]["label"]) == expected[data.raw(0)[1]["file"]]


def test_one_labels_csv_is_split_by_val_fraction(tmp_path):
    rows = [(f"img/{i}.png", "ab"[i % 2]) for i in range(6)]
    root = listed_source(tmp_path, {"labels.csv": rows})
    records, _ = read_source(str(root), "csv_cls")
    assert {r.file: (r.label["label"], r.split) for r in records} == {
        f: ("ab".index(label), None) for f, label in rows
    }


def test_imagenet_style_class_folders_keep_their_split(tmp_path, store):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("n01440764", "n01443537"):
            for i in range(n):
                write_image(tmp_path / split / cls / f"{i}.png", seed=i)
    source = SourceConfig(name="inet", format="cls", uri=str(tmp_path), val_fraction=0.5)
    manifest = ingest_source(source, store, log=lambda _: None)
    assert manifest["classes"] == ["n01440764", "n01443537"]
    assert manifest["split"]["by"] == "layout"
    assert {s: manifest["splits"][s]["class_counts"] for s in ("train", "val")} == {
        "train": [3, 3],
        "val": [2, 2],
    }


def test_class_folders_without_split_folders_are_unchanged(tmp_path):
    write_image(tmp_path / "train" / "a.png")  # a class named "train" beside another
    write_image(tmp_path / "cat" / "b.png")
    records, _ = read_source(str(tmp_path), "cls")
    assert {r.file: (r.label["label"], r.split) for r in records} == {
        "cat/b.png": (0, None),
        "train/a.png": (1, None),
    }


def test_csv_cls_feeds_the_cls_task():
    source = SourceConfig(name="inat", format="csv_cls", uri="data/inat")
    assert source.resolved_tasks == [TaskType.cls]


# ---------------------------------------------------------------- bad inputs


def test_a_list_naming_a_missing_file(tmp_path):
    root = listed_source(tmp_path, {"train.csv": [("train/a.png", "x")], "val.csv": []})
    write_list(root, "val.csv", [("val/gone.png", "x")])
    assert problems(root) == ["val/gone.png: listed in val.csv line 2 but missing"]


def test_unlisted_images_duplicates_and_escapes(tmp_path):
    root = listed_source(
        tmp_path, {"train.csv": [("train/a.png", "x")], "val.csv": [("val/b.png", "y")]}
    )
    write_image(root / "val" / "stray.png")
    write_list(root, "val.csv", [("val/b.png", "y"), ("train/a.png", "y"), ("../etc.png", "y")])
    found = problems(root)
    assert "train/a.png: val.csv line 3: already listed in train.csv line 2" in found
    assert "../etc.png: val.csv line 4: path escapes the source root or is empty" in found
    assert any(p.startswith("val/stray.png: is not listed in train.csv, val.csv") for p in found)


def test_unknown_label_with_pinned_classes(tmp_path):
    root = listed_source(tmp_path, {"labels.csv": [("i/a.png", "cat"), ("i/b.png", "moth")]})
    (root / "classes.txt").write_text("cat\ndog\n")
    assert problems(root) == [
        "i/b.png: labels.csv: unknown label 'moth'; classes.txt lists ['cat', 'dog']"
    ]


@pytest.mark.parametrize(
    ("lists", "expected"),
    [
        ({"train.csv": "file,label\n"}, "train.csv: without val.csv"),
        ({"labels.csv": "path,class\n"}, "labels.csv: the first line must be the header"),
        ({}, "labels.csv: missing; a csv_cls source needs labels.csv"),
        (
            {"labels.csv": "file,label\n", "train.csv": "file,label\n", "val.csv": "file,label\n"},
            "labels.csv: beside train.csv and val.csv",
        ),
    ],
)
def test_layout_errors(tmp_path, lists, expected):
    write_image(tmp_path / "i" / "a.png")
    for name, text in lists.items():
        (tmp_path / name).write_text(text)
    (found,) = problems(tmp_path)
    assert found.startswith(expected)
