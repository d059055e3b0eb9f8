"""JPEG damage that Pillow decodes without a word, refused at ingest (xlearner/data/images.py).

Smooth images hide damage: bytes overwritten in their scan make libjpeg run past the
damaged data and pad the rest, with only a warning, which Pillow drops. The check decodes
with libjpeg-turbo's warnings as errors; these tests show that it refuses such files
(where the earlier check, a decode without the scan's last bytes, accepted nearly all)
and refuses no sound JPEG: not one of the synthetic sources', nor of Pillow's encoder
settings.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xlearner.data.formats import SourceReader
from xlearner.data.images import read_image
from xlearner.data.source_files import SourceError
from xlearner.data.synth import photo_jpeg


def smooth_jpeg(seed: int, size=(320, 240), mode="RGB", **options) -> bytes:
    """A JPEG of a smooth colour field: no edge, no noise (the hard case)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    out = io.BytesIO()
    coarse.resize(size, Image.Resampling.BICUBIC).convert(mode).save(out, "JPEG", **options)
    return out.getvalue()


def overwrite_scan(data: bytes, fill: bytes, seed: int) -> bytes:
    """``fill`` written over the entropy-coded data of the first scan, at a seeded place."""
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    end = data.rfind(b"\xff\xd9")
    at = int(np.random.default_rng(seed).integers(start, end - len(fill)))
    return data[:at] + fill + data[at + len(fill) :]


def pillow_decodes(data: bytes) -> bool:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
    return True


KINDS = {  # progressive: in test_noise_... (zeros over its DC scan can be a valid stream)
    "baseline": {},
    "greyscale": {"mode": "L"},
    "restart markers": {"restart_marker_rows": 1},
    "4:4:4": {"subsampling": 0, "quality": 95},
}


@pytest.mark.parametrize("kind", KINDS)
def test_zeros_over_a_smooth_scan_are_refused(kind):
    """64 zero bytes (a lost disk block's typical fill) over 20 seeded places: all refused,
    although Pillow decodes every one of them."""
    for seed in range(20):
        damaged = overwrite_scan(smooth_jpeg(seed, **KINDS[kind]), bytes(64), seed)
        assert pillow_decodes(damaged)
        with pytest.raises(ValueError, match="JPEG data damaged: Corrupt JPEG data"):
            read_image(damaged)


def test_noise_over_scans_is_refused_in_smooth_and_detailed_images():
    refused = {"smooth": 0, "progressive": 0, "photo": 0}
    for seed in range(20):
        noise = np.random.default_rng(seed).integers(0, 256, 600, dtype=np.uint8).tobytes()
        for name, data in (
            ("smooth", smooth_jpeg(seed)),
            ("progressive", smooth_jpeg(seed, progressive=True)),
            ("photo", photo_jpeg(seed=seed)),
        ):
            try:
                read_image(overwrite_scan(data, noise, seed))
            except ValueError as err:
                assert str(err).startswith("JPEG data damaged"), err
                refused[name] += 1
    assert refused == {"smooth": 20, "progressive": 20, "photo": 20}


def test_a_truncated_jpeg_is_refused():
    data = smooth_jpeg(0)
    with pytest.raises(ValueError, match="JPEG data damaged"):
        read_image(data[: len(data) * 2 // 3])


def test_ingest_names_the_damaged_file(tmp_path):
    root = tmp_path / "cls"
    (root / "a").mkdir(parents=True)
    (root / "a" / "ok.jpg").write_bytes(smooth_jpeg(1))
    (root / "a" / "bad.jpg").write_bytes(overwrite_scan(smooth_jpeg(2), bytes(64), 2))
    with pytest.raises(SourceError) as caught:
        list(SourceReader(str(root), "cls").records())
    (problem,) = caught.value.problems
    assert problem.file == "a/bad.jpg"
    assert problem.message.startswith("corrupt or truncated image: JPEG data damaged: Corrupt")


def test_no_synthetic_source_jpeg_is_refused(synth_data):
    """Every JPEG the synthetic sources hold (what the tests and the quick start ingest)."""
    files = [p for p in Path(synth_data.root).rglob("*") if p.suffix == ".jpg"]
    assert len(files) > 100
    for path in files:
        data = path.read_bytes()
        assert read_image(data).data == data, path


def test_no_sound_jpeg_is_refused_over_encoder_settings():
    """Sizes from 1 px, qualities 1-100, RGB/L/CMYK, subsampling, progressive, optimised
    Huffman tables, restart markers, noise or not: 150 settings drawn with a fixed seed."""
    rng = np.random.default_rng(0)
    for trial in range(150):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), float)
        if trial % 3 == 0:
            pixels = pixels + rng.normal(0, 10, pixels.shape)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image = image.convert(["RGB", "L", "CMYK"][trial % 3])
        options = {
            "quality": int(rng.integers(1, 101)),
            "progressive": trial % 5 == 1,
            "optimize": trial % 7 == 2,
        }
        if image.mode == "RGB":
            options["subsampling"] = int(rng.integers(0, 3))
        if trial % 4 == 3:
            options["restart_marker_blocks"] = int(rng.integers(1, 9))
        out = io.BytesIO()
        image.save(out, "JPEG", **options)
        assert read_image(out.getvalue()).data == out.getvalue(), (image.mode, w, h, options)
    for seed, size in enumerate([(16, 16), (320, 240), (900, 700)]):
        assert read_image(photo_jpeg(size, seed)).width == size[0]
