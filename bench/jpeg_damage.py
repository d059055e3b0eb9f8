"""How much JPEG scan damage ingest's image check refuses, and how many sound JPEGs.

    .venv/bin/python bench/jpeg_damage.py [--synth FOLDER ...]

Damage: ``n`` bytes (zeros or random) written over the entropy-coded data at a seeded
place, 40 seeds per row, in smooth images (no edge, no noise: where damage hides) and in
``photo_jpeg`` (a photograph's detail). Prints the share ``read_image`` refuses (Pillow
alone refuses none of these). False positives: every JPEG below the ``--synth`` folders
(``xlearner data synth --out FOLDER``) and 300 JPEGs of Pillow's encoder settings.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlearner.data.images import read_image  # noqa: E402
from xlearner.data.synth import photo_jpeg  # noqa: E402

SEEDS = 40
DAMAGE = ((1, "noise"), (4, "noise"), (16, "noise"), (64, "zeros"), (600, "noise"), (600, "zeros"))


def smooth(seed: int, mode: str = "RGB", **options) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    out = io.BytesIO()
    coarse.resize((320, 240), Image.Resampling.BICUBIC).convert(mode).save(out, "JPEG", **options)
    return out.getvalue()


KINDS: dict[str, Callable[[int], bytes]] = {
    "smooth": smooth,
    "smooth, progressive": lambda s: smooth(s, progressive=True),
    "smooth, greyscale": lambda s: smooth(s, "L"),
    "smooth, restart markers": lambda s: smooth(s, restart_marker_rows=1),
    "photo_jpeg": lambda s: photo_jpeg(seed=s),
}


def damaged(data: bytes, n: int, fill: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed * 7 + n)
    sos = data.find(b"\xff\xda")
    start, end = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big"), data.rfind(b"\xff\xd9")
    at = int(rng.integers(start, max(start + 1, end - n)))
    over = bytes(n) if fill == "zeros" else rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return data[:at] + over[: end - at] + data[at + n :]


def refused(data: bytes) -> bool:
    try:
        read_image(data)
    except Exception:  # noqa: BLE001 - what ingest counts as corrupt (formats.py)
        return True
    return False


def encoder_variants(count: int) -> list[bytes]:
    rng, files = np.random.default_rng(0), []
    for trial in range(count):
        w, h = (int(v) for v in rng.integers(1, 500, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), float)
        if trial % 3 == 0:
            pixels = pixels + rng.normal(0, 10, pixels.shape)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(
            ["RGB", "L", "CMYK"][trial % 3]
        )
        options = {"quality": int(rng.integers(1, 101)), "progressive": trial % 5 == 1}
        if trial % 4 == 3:
            options["restart_marker_blocks"] = int(rng.integers(1, 9))
        out = io.BytesIO()
        image.save(out, "JPEG", optimize=trial % 7 == 2, **options)
        files.append(out.getvalue())
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--synth", nargs="*", default=[], help="folders of synthetic sources")
    args = parser.parse_args()
    print("| image | " + " | ".join(f"{n} B {fill}" for n, fill in DAMAGE) + " |")
    print("|---|" + "---:|" * len(DAMAGE))
    for name, make in KINDS.items():
        cells = []
        for n, fill in DAMAGE:
            cases = [(make(s), damaged(make(s), n, fill, s)) for s in range(SEEDS)]
            changed = [bad for good, bad in cases if bad != good]
            cells.append(f"{sum(map(refused, changed))}/{len(changed)}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    synth = [p.read_bytes() for f in args.synth for p in Path(f).rglob("*.jpg")]
    variants = encoder_variants(300)
    print(
        f"false positives: {sum(map(refused, synth))} of {len(synth)} synthetic-source JPEGs, "
        f"{sum(map(refused, variants))} of {len(variants)} encoder settings"
    )


if __name__ == "__main__":
    main()
