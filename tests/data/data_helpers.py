"""Plain helpers to build small hand-made sources for the data tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def encode_image(size: tuple[int, int] = (32, 24), fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write_image(path: Path, size: tuple[int, int] = (32, 24), seed: int = 0) -> Path:
    """A small random image; JPEG or PNG by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(encode_image(size, fmt, seed))
    return path


def write_mask(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path, format="PNG")
    return path


def write_coco(
    root: Path, images: list[dict], annotations: list[dict], categories: list[dict]
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(payload))
