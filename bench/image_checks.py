"""What ingest's image checks cost: one draft decode (the check before issue 14) against
``read_image`` (marker walk, a decode without the scan's last bytes, EXIF probe), per image.

    .venv/bin/python bench/image_checks.py

JPEGs with a photograph's detail (smooth shapes plus noise), one core, best of REPEATS.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlearner.data.images import read_image  # noqa: E402
from xlearner.data.synth import photo_jpeg  # noqa: E402

REPEATS = 7
SIZES = ((256, 256), (640, 480), (1600, 1200))


def draft_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (image.width // 8, image.height // 8))
        image.load()


def per_image_ms(check: Callable[[bytes], object], files: list[bytes]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for data in files:
            check(data)
        best = min(best, (time.perf_counter() - start) / len(files))
    return best * 1e3


def main() -> None:
    for size in SIZES:
        files = [photo_jpeg(size, seed) for seed in range(10)]
        before, now = per_image_ms(draft_decode, files), per_image_ms(read_image, files)
        print(
            f"{size[0]}x{size[1]} ({len(files[0]) // 1024} KB): draft decode {before:.2f} ms, "
            f"read_image {now:.2f} ms, ratio {now / before:.2f}x"
        )


if __name__ == "__main__":
    main()
