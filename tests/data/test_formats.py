"""Source readers: every format, every validation rule, errors that name the file."""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_helpers import write_coco, write_image, write_mask

from xlearner.data.formats import SourceReader, read_source
from xlearner.data.source_files import Problem, SourceError, safe_relpath


def problem_files(err: SourceError) -> list[str]:
    return sorted(p.file for p in err.problems)


def expect_problems(root, fmt, *files_and_words: tuple[str, str]) -> SourceError:
    """Reading raises; each (file, word) is a problem of that file and named in the message."""
    with pytest.raises(SourceError) as info:
        read_source(str(root), fmt)
    err = info.value
    for file, word in files_and_words:
        assert any(p.file == file and word in p.message for p in err.problems), (
            file,
            word,
            err.problems,
        )
        assert file in str(err)
    return err


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("shapes_cls", "cls"),
        ("shapes_attr", "multilabel"),
        ("shapes_det", "det"),
        ("shapes_seg", "seg"),
        ("shapes_unlabeled", "unlabeled"),
    ],
)
def test_reads_synthetic_sources(synth_data, name, fmt):
    reader = SourceReader(str(synth_data.paths[name]), fmt)
    records, problems = reader.read()
    assert problems == []
    assert len(records) == len(reader.entries) > 0
    assert len({r.file for r in records}) == len(records)
    assert {r.image_format for r in records} == {"jpg", "png"}  # mixed formats
    num_classes = len(reader.classes)
    for r in records:
        assert r.data == (synth_data.paths[name] / r.file).read_bytes()  # original bytes
        if fmt == "cls":
            assert reader.classes[r.label["label"]] == r.file.split("/")[0]
        elif fmt == "multilabel":
            assert r.label["labels"] and all(0 <= i < num_classes for i in r.label["labels"])
        elif fmt == "det":
            assert len(r.label["boxes"]) == len(r.label["labels"]) >= 1
            for x1, y1, x2, y2 in r.label["boxes"]:
                assert 0 <= x1 < x2 <= r.width and 0 <= y1 < y2 <= r.height
        elif fmt == "seg":
            assert r.mask is not None and set(r.label["classes"]) <= set(range(num_classes))
        else:
            assert r.label == {}


def test_cls_classes_are_sorted_folder_names(tmp_path):
    for cls in ("zebra", "ant", "moth"):
        write_image(tmp_path / cls / "a.png")
    records, _ = read_source(str(tmp_path), "cls")
    reader = SourceReader(str(tmp_path), "cls")
    assert reader.classes == ["ant", "moth", "zebra"]
    assert {r.file: r.label["label"] for r in records} == {
        "ant/a.png": 0,
        "moth/a.png": 1,
        "zebra/a.png": 2,
    }


def test_cls_classes_txt_pins_order_and_rejects_unknown_folders(tmp_path):
    (tmp_path / "classes.txt").write_text("zebra\nant\nunused\n")
    write_image(tmp_path / "zebra" / "a.png")
    write_image(tmp_path / "ant" / "b.jpg")
    write_image(tmp_path / "moth" / "c.png")
    err = expect_problems(tmp_path, "cls", ("moth", "unknown class folder"))
    assert len(err.problems) == 1
    records, problems = read_source(str(tmp_path), "cls", skip_invalid=True)
    assert {r.file: r.label["label"] for r in records} == {"zebra/a.png": 0, "ant/b.jpg": 1}
    assert problems == err.problems


def test_cls_stray_file_at_root(tmp_path):
    write_image(tmp_path / "cat" / "a.png")
    write_image(tmp_path / "stray.png")
    expect_problems(tmp_path, "cls", ("stray.png", "stray file"))


def test_hidden_files_are_ignored(tmp_path):
    write_image(tmp_path / "cat" / "a.png")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "cat" / ".thumb.png").write_bytes(b"junk")
    records, problems = read_source(str(tmp_path), "cls")
    assert [r.file for r in records] == ["cat/a.png"] and problems == []


def test_multilabel_classes_are_sorted_union(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "images" / "b.jpg")
    write_image(tmp_path / "images" / "c.png")
    (tmp_path / "labels.csv").write_text("file,labels\na.png,red;big\nb.jpg, blue \nc.png,\n")
    reader = SourceReader(str(tmp_path), "multilabel")
    records, _ = reader.read()
    assert reader.classes == ["big", "blue", "red"]
    assert {r.file: r.label["labels"] for r in records} == {
        "images/a.png": [0, 2],
        "images/b.jpg": [1],
        "images/c.png": [],
    }


def test_det_category_ids_map_to_contiguous_sorted_indices(tmp_path):
    write_image(tmp_path / "images" / "a.png", size=(40, 30))
    write_coco(
        tmp_path,
        [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 30]},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [5, 5, 5, 5], "iscrowd": 1},
        ],
        [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    )
    reader = SourceReader(str(tmp_path), "det")
    (record,), _ = reader.read()
    assert reader.classes == ["cat", "dog"]
    assert record.label == {
        "boxes": [[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 40.0, 30.0]],
        "labels": [1, 0],
    }


# ---------------------------------------------------------------- image problems


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_truncated_image_names_the_file(tmp_path, name):
    write_image(tmp_path / "cat" / "ok.png")
    good = write_image(tmp_path / "cat" / name, size=(64, 64))
    good.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    expect_problems(tmp_path, "cls", (f"cat/{name}", "corrupt or truncated"))


def test_garbage_and_wrong_type_images(tmp_path):
    write_image(tmp_path / "cat" / "ok.png")
    (tmp_path / "cat" / "noise.jpg").write_bytes(os.urandom(500))
    write_image(tmp_path / "cat" / "anim.png").unlink()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "anim.png", format="GIF")
    expect_problems(
        tmp_path, "cls", ("cat/noise.jpg", "corrupt"), ("cat/anim.png", "not JPEG or PNG")
    )


def test_all_problems_are_collected_and_skip_invalid_keeps_the_good(tmp_path):
    for i in range(3):
        write_image(tmp_path / "cat" / f"ok{i}.png", seed=i)
    for i in range(3):
        (tmp_path / "dog" / f"bad{i}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "dog" / f"bad{i}.jpg").write_bytes(b"not an image")
    err = expect_problems(tmp_path, "cls", *[(f"dog/bad{i}.jpg", "corrupt") for i in range(3)])
    assert len(err.problems) == 3
    assert "skip_invalid" in str(err)
    records, problems = read_source(str(tmp_path), "cls", skip_invalid=True)
    assert sorted(r.file for r in records) == [f"cat/ok{i}.png" for i in range(3)]
    assert problems == err.problems


def test_unreadable_file(tmp_path):
    write_image(tmp_path / "cat" / "ok.png")
    os.symlink(
        tmp_path / "cat" / "gone.png", tmp_path / "cat" / "dangling.png"
    )  # inside root, missing
    expect_problems(tmp_path, "cls", ("cat/dangling.png", "dangling symlink"))


def test_symlinks_pointing_outside_the_root(tmp_path):
    outside = tmp_path / "outside"
    write_image(outside / "secret.png")
    root = tmp_path / "src"
    write_image(root / "cat" / "ok.png")
    os.symlink(outside / "secret.png", root / "cat" / "link.png")
    os.symlink(outside, root / "linked_dir")
    expect_problems(
        root,
        "cls",
        ("cat/link.png", "outside the source root"),
        ("linked_dir", "outside the source root"),
    )


def test_symlinks_inside_the_root_are_followed(tmp_path):
    write_image(tmp_path / "cat" / "ok.png")
    os.symlink(tmp_path / "cat" / "ok.png", tmp_path / "cat" / "alias.png")
    records, _ = read_source(str(tmp_path), "cls")
    assert sorted(r.file for r in records) == ["cat/alias.png", "cat/ok.png"]


def test_all_invalid_with_skip_invalid_still_fails(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "bad.png").write_bytes(b"x")
    with pytest.raises(SourceError, match="no valid records"):
        read_source(str(tmp_path), "cls", skip_invalid=True)


@pytest.mark.parametrize("fmt", ["cls", "unlabeled"])
def test_empty_source(tmp_path, fmt):
    (tmp_path / "images").mkdir()
    with pytest.raises(SourceError, match="empty source"):
        read_source(str(tmp_path), fmt)


def test_missing_folder_and_bad_scheme(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        read_source(str(tmp_path / "nope"), "cls")
    with pytest.raises(SourceError, match="unsupported URI scheme"):
        read_source("gs://bucket/x", "cls")


# ---------------------------------------------------------------- multilabel problems


def make_multilabel(root, rows: str, classes: str | None = None, images=("a.png", "b.png")):
    for i, name in enumerate(images):
        write_image(root / "images" / name, seed=i)
    (root / "labels.csv").write_text("file,labels\n" + rows)
    if classes is not None:
        (root / "classes.txt").write_text(classes)


def test_multilabel_unknown_label(tmp_path):
    make_multilabel(tmp_path, "a.png,red\nb.png,red;purple\n", classes="red\nblue\n")
    expect_problems(tmp_path, "multilabel", ("images/b.png", "unknown label"))


def test_multilabel_duplicate_rows(tmp_path):
    make_multilabel(tmp_path, "a.png,red\nb.png,red\na.png,blue\n")
    expect_problems(tmp_path, "multilabel", ("images/a.png", "duplicate"))


def test_multilabel_path_escape(tmp_path):
    make_multilabel(tmp_path, "a.png,red\nb.png,red\n../../etc/passwd,red\n/abs.png,red\n")
    err = expect_problems(tmp_path, "multilabel", ("images/../../etc/passwd", "escapes"))
    assert any(p.file == "images//abs.png" and "escapes" in p.message for p in err.problems)


def test_multilabel_unlisted_and_missing_images(tmp_path):
    make_multilabel(tmp_path, "a.png,red\nghost.png,red\n")
    expect_problems(
        tmp_path,
        "multilabel",
        ("images/b.png", "not listed in labels.csv"),
        ("images/ghost.png", "listed in labels.csv but missing"),
    )


def test_multilabel_bad_header_is_fatal_even_with_skip_invalid(tmp_path):
    make_multilabel(tmp_path, "")
    (tmp_path / "labels.csv").write_text("image,tags\na.png,red\n")
    with pytest.raises(SourceError, match="labels.csv: the first line must be the header"):
        read_source(str(tmp_path), "multilabel", skip_invalid=True)


def test_multilabel_missing_labels_csv(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    with pytest.raises(SourceError, match="labels.csv: missing"):
        read_source(str(tmp_path), "multilabel")


# ---------------------------------------------------------------- det problems


def coco_images(*file_names, size=(40, 30)):
    return [
        {"id": i + 1, "file_name": name, "width": size[0], "height": size[1]}
        for i, name in enumerate(file_names)
    ]


def make_det(root, annotations, images=None, size=(40, 30)):
    write_image(root / "images" / "a.png", size=size)
    write_image(root / "images" / "b.jpg", size=size, seed=1)
    images = images or coco_images("a.png", "b.jpg", size=size)
    write_coco(root, images, annotations, [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])


def ann(i, image_id, bbox, category=1):
    return {"id": i, "image_id": image_id, "category_id": category, "bbox": bbox}


def test_det_box_outside_image_and_zero_area(tmp_path):
    make_det(
        tmp_path, [ann(1, 1, [30, 5, 20, 5]), ann(2, 2, [5, 5, 0, 8]), ann(3, 2, [1, 1, 5, 5])]
    )
    err = expect_problems(
        tmp_path, "det", ("images/a.png", "outside the 40x30 image"), ("images/b.jpg", "zero area")
    )
    assert len(err.problems) == 2


def test_det_unknown_category_is_out_of_range(tmp_path):
    make_det(tmp_path, [ann(1, 1, [1, 1, 5, 5], category=9), ann(2, 2, [1, 1, 5, 5])])
    expect_problems(tmp_path, "det", ("images/a.png", "category_id 9"))


def test_det_duplicate_file_name(tmp_path):
    images = coco_images("a.png", "b.jpg", "a.png")
    make_det(tmp_path, [ann(1, 1, [1, 1, 5, 5])], images=images)
    expect_problems(tmp_path, "det", ("images/a.png", "duplicate"))


def test_det_path_escape_and_unknown_image_id(tmp_path):
    images = coco_images("a.png", "b.jpg", "../x.png")
    make_det(tmp_path, [ann(1, 1, [1, 1, 5, 5]), ann(2, 42, [1, 1, 5, 5])], images=images)
    expect_problems(
        tmp_path, "det", ("images/../x.png", "escapes"), ("annotations.json", "image_id 42")
    )


def test_det_declared_size_mismatch(tmp_path):
    images = coco_images("a.png", size=(400, 300)) + coco_images("b.jpg")
    images[1]["id"] = 2
    make_det(tmp_path, [], images=images)
    expect_problems(tmp_path, "det", ("images/a.png", "says 400x300"))


def test_det_invalid_json_is_fatal(tmp_path):
    make_det(tmp_path, [])
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(SourceError, match="annotations.json: is not valid JSON"):
        read_source(str(tmp_path), "det", skip_invalid=True)


# ---------------------------------------------------------------- seg problems


def make_seg(root, masks: dict[str, np.ndarray], classes="bg\ncat\ndog\n", size=(20, 16)):
    for i, stem in enumerate(masks):
        write_image(root / "images" / f"{stem}.{'jpg' if i % 2 else 'png'}", size=size, seed=i)
    for stem, values in masks.items():
        write_mask(root / "masks" / f"{stem}.png", values)
    if classes is not None:
        (root / "classes.txt").write_text(classes)


def test_seg_valid_mask_with_ignore_pixels(tmp_path):
    mask = np.zeros((16, 20))
    mask[2:5, 3:9], mask[0, 0] = 2, 255
    make_seg(tmp_path, {"a": mask})
    (record,), _ = read_source(str(tmp_path), "seg")
    assert record.label == {"classes": [0, 2]}
    assert record.mask == (tmp_path / "masks" / "a.png").read_bytes()


def test_seg_mask_size_mismatch(tmp_path):
    make_seg(tmp_path, {"a": np.zeros((16, 20)), "b": np.zeros((10, 10))})
    expect_problems(tmp_path, "seg", ("images/b.jpg", "does not match the image's 20x16"))


def test_seg_mask_values_out_of_range(tmp_path):
    bad = np.zeros((16, 20))
    bad[0, :3] = [3, 7, 255]
    make_seg(tmp_path, {"a": np.zeros((16, 20)), "b": bad})
    expect_problems(tmp_path, "seg", ("images/b.jpg", "mask values [3, 7]"))


def test_seg_missing_and_orphan_masks(tmp_path):
    make_seg(tmp_path, {"a": np.zeros((16, 20))})
    write_image(tmp_path / "images" / "lonely.png", size=(20, 16))
    write_mask(tmp_path / "masks" / "orphan.png", np.zeros((16, 20)))
    expect_problems(
        tmp_path, "seg", ("images/lonely.png", "has no mask"), ("masks/orphan.png", "has no image")
    )


def test_seg_needs_classes_txt(tmp_path):
    make_seg(tmp_path, {"a": np.zeros((16, 20))}, classes=None)
    with pytest.raises(SourceError, match="classes.txt: missing"):
        read_source(str(tmp_path), "seg")


# ---------------------------------------------------------------- S3 sources and helpers


def test_reads_an_s3_source(synth_data, s3_server):
    local = synth_data.paths["shapes_det"]
    with s3_server.environ():
        from xlearner.store import open_store

        remote = open_store(s3_server.uri("sources-in/shapes_det"))
        for path in sorted(local.rglob("*")):
            if path.is_file():  # plain PUTs: the publish protocol is not under test here
                key = remote._key(path.relative_to(local).as_posix())
                remote.client.put_object(Bucket=remote.bucket, Key=key, Body=path.read_bytes())
        s3_records, _ = read_source(s3_server.uri("sources-in/shapes_det"), "det")
    local_records, _ = read_source(str(local), "det")
    assert [(r.file, r.label, r.data) for r in s3_records] == [
        (r.file, r.label, r.data) for r in local_records
    ]


def test_safe_relpath():
    assert safe_relpath("a/./b.png") == "a/b.png"
    for bad in ("../a.png", "a/../../b", "/etc/passwd", "", "C:/x.png", "a\\b.png"):
        assert safe_relpath(bad) is None, bad


def test_problem_str():
    assert str(Problem("cat/a.png", "corrupt")) == "cat/a.png: corrupt"
