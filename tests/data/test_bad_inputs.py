"""Bad and unusual source data through the real ingest stage: one clear error (exit code 2)
naming the file and the field, or the image stored as it is meant to look."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from data_helpers import write_coco, write_image
from PIL import Image, ImageOps

from flows.caching import source_fingerprint
from stages import ingest
from xlearner.config import SourceConfig
from xlearner.contract import ExitCode
from xlearner.data.images import read_image
from xlearner.data.ingest import ingest_source
from xlearner.data.synth import photo_jpeg
from xlearner.store import LocalStore, join

REPO = Path(__file__).resolve().parents[2]


def write_config(folder: Path, root: Path, fmt: str, store: Path, **source) -> Path:
    config = folder / "config.yaml"
    data = {
        "sources": [{"name": "src", "format": fmt, "uri": str(root), **source}],
        "store": {"uri": str(store)},
        "model": {"image_size": 32},
    }
    config.write_text(yaml.safe_dump(data))
    return config


def run_ingest(tmp_path: Path, root: Path, fmt: str, capsys, **source) -> tuple[int, str]:
    """The ingest stage's exit code and its log."""
    config = write_config(tmp_path, root, fmt, tmp_path / "store", **source)
    code = ingest.main(["--config", str(config)])
    return code, capsys.readouterr().out


def assert_bad_input(code: int, out: str, *named: str) -> None:
    assert code == ExitCode.BAD_INPUT, out
    assert "Traceback" not in out, out
    for text in named:
        assert text in out, (text, out)


def stored_images(store: LocalStore, manifest: dict, tmp_path: Path) -> dict[str, tuple]:
    """{file: (label record, decoded stored image)} over both splits."""
    images = {}
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            key = join("sources", manifest["name"], manifest["version"], shard["file"])
            with tarfile.open(store.local_copy(key, tmp_path)) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name, data in members.items():
                key, _, suffix = name.partition(".")
                if suffix == "json":
                    label = json.loads(data)
                    image = members.get(f"{key}.png") or members[f"{key}.jpg"]
                    images[label["file"]] = (label, Image.open(io.BytesIO(image)))
    return images


def ingest_folder(tmp_path: Path, root: Path, image_size: int | None = None) -> tuple:
    store = LocalStore(tmp_path / "store")
    source = SourceConfig(name="src", format="cls", uri=str(root), val_fraction=0.0)
    manifest = ingest_source(source, store, image_size=image_size, log=lambda _: None)
    return stored_images(store, manifest, tmp_path / "copy"), manifest


# ---------------------------------------------------------------- COCO fields


def make_det(root: Path, images=None, annotations=None, categories=None) -> Path:
    write_image(root / "images" / "a.png", size=(40, 30))
    write_coco(
        root,
        images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        annotations or [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5]}],
        categories or [{"id": 1, "name": "cat"}],
    )
    return root


@pytest.mark.parametrize(
    "case, named",
    [
        ({"images": [{"id": [1], "file_name": "a.png"}]}, "image `id` must be an integer"),
        ({"images": [{"id": {"a": 1}, "file_name": "a.png"}]}, "got a JSON object"),
        (
            {"annotations": [{"id": 7, "image_id": [1], "category_id": 1, "bbox": [1, 2, 3, 4]}]},
            "`image_id` must be an integer, got [1]",
        ),
        (
            {"annotations": [{"id": 7, "image_id": 1, "category_id": {}, "bbox": [1, 2, 3, 4]}]},
            "`category_id` must be an integer, got a JSON object",
        ),
        (
            {"annotations": [{"id": [7], "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}]},
            "`id` must be an integer",
        ),
        ({"categories": [{"id": [1], "name": "cat"}]}, "every category needs an integer `id`"),
        ({"categories": [{"id": True, "name": "cat"}]}, "every category needs an integer `id`"),
        (
            {"annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [True] * 4}]},
            "annotation id 7: bbox must be [x, y, w, h] numbers, got [true, true, true, true]",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.png", "width": 40.5, "height": 30.0}]},
            "annotations.json says 40.5x30, the image is 40x30",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.png", "width": True, "height": 30}]},
            "`width`/`height` must be positive numbers, got True/30",
        ),
    ],
)
def test_coco_fields_of_the_wrong_type_are_named(tmp_path, capsys, case, named):
    root = make_det(tmp_path / "det", **case)
    code, out = run_ingest(tmp_path, root, "det", capsys)
    assert_bad_input(code, out, "annotations.json", named)


def test_json_nested_100k_deep_is_named(tmp_path, capsys):
    root = make_det(tmp_path / "det")
    depth = 100_000
    (root / "annotations.json").write_text('{"images": ' + "[" * depth + "]" * depth + "}")
    code, out = run_ingest(tmp_path, root, "det", capsys)
    assert_bad_input(code, out, "annotations.json: is nested too deeply")


def test_float_size_that_matches_is_accepted(tmp_path):
    root = make_det(
        tmp_path / "det", [{"id": 1, "file_name": "a.png", "width": 40.0, "height": 30}]
    )
    store = LocalStore(tmp_path / "store")
    manifest = ingest_source(SourceConfig(name="d", format="det", uri=str(root)), store)
    assert manifest["splits"]["train"]["records"] + manifest["splits"]["val"]["records"] == 1


# ---------------------------------------------------------------- files


def test_dangling_symlink_is_named_by_ingest_not_a_traceback_before_it(
    tmp_path, capsys, synth_data
):
    root = tmp_path / "cls"
    shutil.copytree(synth_data.paths["shapes_cls"], root)
    os.symlink(tmp_path / "gone.png", root / "circle" / "ghost.png")
    assert source_fingerprint(str(root))  # the flow's cache key does not fail on it
    code, out = run_ingest(tmp_path, root, "cls", capsys)
    assert_bad_input(code, out, "circle/ghost.png: dangling symlink", str(tmp_path / "gone.png"))
    code, out = run_ingest(tmp_path, root, "cls", capsys, skip_invalid=True)
    assert code == ExitCode.OK, out


def test_a_labels_csv_row_for_a_missing_file_says_listed_but_missing(tmp_path, capsys):
    root = tmp_path / "ml"
    write_image(root / "images" / "a.png")
    (root / "labels.csv").write_text("file,labels\na.png,red\nghost.png,red\n")
    code, out = run_ingest(tmp_path, root, "multilabel", capsys)
    assert_bad_input(code, out, "images/ghost.png: listed in labels.csv but missing")


def test_a_store_folder_that_is_not_writable_is_named(tmp_path, synth_data):
    """The stage runs without the right to write the store (as root: without the
    capability to override file permissions, which root otherwise has)."""
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o555)
    config = write_config(tmp_path, synth_data.paths["shapes_cls"], "cls", store)
    command = [sys.executable, "-m", "stages.ingest", "--config", str(config)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is not installed")
        caps = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--", *command]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    store.chmod(0o755)
    assert_bad_input(
        run.returncode, run.stdout + run.stderr, f"store folder {store} is not writable"
    )


# ---------------------------------------------------------------- image fidelity


def test_16_bit_png_is_scaled_to_8_bit_also_when_downscaled(tmp_path):
    ramp = np.linspace(0, 65535, 256 * 256).reshape(256, 256).astype(np.uint16)
    root = tmp_path / "deep"
    (root / "ramp").mkdir(parents=True)
    Image.fromarray(ramp).save(root / "ramp" / "a.png")  # a 16-bit greyscale PNG
    assert Image.open(root / "ramp" / "a.png").mode == "I;16"
    expected = (ramp.astype(np.int64) * 255 + 32767) // 65535

    stored, _ = ingest_folder(tmp_path / "full", root)
    label, image = stored["ramp/a.png"]
    assert image.mode == "L" and (label["width"], label["height"]) == (256, 256)
    assert np.abs(np.asarray(image, dtype=np.int64) - expected).max() == 0

    stored, _ = ingest_folder(tmp_path / "small", root, image_size=32)  # 256 > 2 * 32
    label, image = stored["ramp/a.png"]
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert (label["width"], label["height"]) == (32, 32)
    assert pixels.min() < 10 and pixels.max() > 245  # the whole range, not saturated
    assert abs(pixels.mean() - expected.mean()) < 3


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)  # 60 wide, 30 high: left black, right white
    pixels[:, 30:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 30 wide, 60 high
    root = tmp_path / "rot"
    (root / "a").mkdir(parents=True)
    Image.fromarray(pixels).save(root / "a" / "r.jpg", quality=95, exif=exif)
    shown = ImageOps.exif_transpose(Image.open(root / "a" / "r.jpg")).convert("L")
    assert shown.size == (30, 60)

    stored, _ = ingest_folder(tmp_path, root)
    label, image = stored["a/r.jpg"]
    assert (label["width"], label["height"]) == image.size == (30, 60)
    assert image.getexif().get(0x0112) is None  # readers that ignore EXIF see the same
    grey = np.asarray(image.convert("L"), float)
    assert np.abs(grey - np.asarray(shown, float)).mean() < 3
    assert grey[:20].mean() < 30 and grey[40:].mean() > 225  # turned: black on top, white below


def overwrite_mid_scan(data: bytes, fill: bytes) -> bytes:
    damaged = bytearray(data)
    start = data.find(b"\xff\xda")
    middle = start + (len(data) - start) // 2
    damaged[middle : middle + len(fill)] = fill
    return bytes(damaged)


@pytest.mark.parametrize("fill", ["zeros", "noise"])
def test_jpeg_overwritten_mid_scan_is_refused(tmp_path, capsys, fill):
    data = photo_jpeg()
    noise = np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes()
    damaged = overwrite_mid_scan(data, bytes(600) if fill == "zeros" else noise)
    Image.open(io.BytesIO(damaged)).load()  # Pillow alone decodes it without a word
    read_image(data)  # the intact file passes
    root = tmp_path / "cls"
    write_image(root / "a" / "ok.png")
    (root / "a" / "bad.jpg").write_bytes(damaged)
    code, out = run_ingest(tmp_path, root, "cls", capsys)
    assert_bad_input(code, out, "a/bad.jpg: corrupt or truncated image: JPEG data damaged")


def test_sound_jpegs_pass_the_scan_check():
    """No false alarms over sizes, qualities, subsampling, progressive and restart markers."""
    rng = np.random.default_rng(0)
    for trial in range(24):
        w, h = (int(v) for v in rng.integers(8, 400, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
        image = coarse.resize((w, h), Image.Resampling.BICUBIC).convert(["RGB", "L"][trial % 2])
        options = {"quality": int(rng.integers(30, 100)), "progressive": trial % 3 == 1}
        if trial % 4 == 3:
            options["restart_marker_rows"] = 1
        out = io.BytesIO()
        image.save(out, "JPEG", **options)
        assert read_image(out.getvalue()).data == out.getvalue(), options
    for size in ((1, 1), (8, 8), (16, 9)):  # scans of a few bytes
        out = io.BytesIO()
        Image.new("RGB", size, (90, 120, 200)).save(out, "JPEG")
        assert read_image(out.getvalue()).width == size[0]


def test_png_with_a_damaged_chunk_is_refused(tmp_path, capsys):
    root = tmp_path / "cls"
    png = write_image(root / "a" / "bad.png", size=(64, 48)).read_bytes()
    damaged = bytearray(png)
    at = png.find(b"IDAT") + 40
    damaged[at : at + 8] = bytes(8)
    (root / "a" / "bad.png").write_bytes(bytes(damaged))
    code, out = run_ingest(tmp_path, root, "cls", capsys)
    assert_bad_input(code, out, "a/bad.png: corrupt or truncated image")
