"""Synthetic sources: coloured shapes on textured backgrounds, in the five source formats.

Used by the quick start and the tests. The pre-training sources share one palette and
background style; the downstream sources use another palette, another background and a
shape (``diamond``) the sources never show, so transfer is measured on shifted data.
Output is byte-identical for the same arguments (numpy's seeded generator, fixed
encoder settings). JPEG and PNG are mixed within every source.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SYNTH_FORMAT = "xlearner-synth/1"
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SOURCE_PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}
DOWN_PALETTE = {
    "orange": (245, 140, 20),
    "purple": (140, 50, 200),
    "cyan": (30, 200, 210),
    "pink": (250, 120, 190),
}
COUNT_NAMES = ("one", "two", "three")


@dataclass(frozen=True)
class Spec:
    """One synthetic source: what it shows and how it is labelled."""

    name: str
    format: str  # cls | multilabel | det | seg | unlabeled
    kind: str  # shape | attr | count | objects
    shapes: tuple[str, ...]
    palette: dict[str, tuple[int, int, int]]
    background: str  # blobs | stripes
    downstream: bool = False


BASE_SHAPES = SHAPES[:4]
SPECS = (
    Spec("shapes_cls", "cls", "shape", BASE_SHAPES, SOURCE_PALETTE, "blobs"),
    Spec("shapes_attr", "multilabel", "attr", BASE_SHAPES, SOURCE_PALETTE, "blobs"),
    Spec("shapes_det", "det", "objects", BASE_SHAPES, SOURCE_PALETTE, "blobs"),
    Spec("shapes_seg", "seg", "objects", BASE_SHAPES, SOURCE_PALETTE, "blobs"),
    Spec("shapes_unlabeled", "unlabeled", "objects", BASE_SHAPES, SOURCE_PALETTE, "blobs"),
    Spec("down_cls_a", "cls", "shape", SHAPES, DOWN_PALETTE, "stripes", downstream=True),
    Spec("down_cls_b", "cls", "count", SHAPES, DOWN_PALETTE, "stripes", downstream=True),
    Spec("down_det", "det", "objects", SHAPES, DOWN_PALETTE, "stripes", downstream=True),
    Spec("down_seg", "seg", "objects", SHAPES, DOWN_PALETTE, "stripes", downstream=True),
)


@dataclass
class Drawn:
    shape: int  # index into the spec's shapes
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive pixel corners


def _background(rng: np.random.Generator, size: int, style: str) -> np.ndarray:
    if style == "blobs":  # smooth low-frequency colour noise around a muted grey
        grid = rng.uniform(70, 170, size=(6, 6, 3)).astype(np.uint8)
        base = np.asarray(
            Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
        )
    else:  # oriented stripes in a random dark tint
        angle, period = rng.uniform(0, np.pi), rng.uniform(size / 10, size / 4)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
        tint = rng.uniform(40, 110, size=3).astype(np.float32)
        base = tint + 30 * wave[..., None]
    return base + rng.normal(0, 10, size=(size, size, 3)).astype(np.float32)


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: Any) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        arm_x, arm_y = (x1 - x0) / 6, (y1 - y0) / 6
        draw.rectangle((x0, cy - arm_y, x1, cy + arm_y), fill=fill)
        draw.rectangle((cx - arm_x, y0, cx + arm_x, y1), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(
    rng: np.random.Generator, size: int, extent: int, taken: list[tuple[int, int, int, int]]
):
    """A box of side ``extent`` inside the image, avoiding ``taken`` boxes when possible."""
    for _ in range(20):
        x0, y0 = (int(v) for v in rng.integers(0, size - extent + 1, size=2))
        box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
        if all(box[2] < t[0] or t[2] < box[0] or box[3] < t[1] or t[3] < box[1] for t in taken):
            return box
    return box


def render(
    rng: np.random.Generator, spec: Spec, size: int, count: int, extent_range: tuple[float, float]
) -> tuple[Image.Image, Image.Image, list[Drawn]]:
    """An image, its class mask (0 = background, shape i -> i + 1) and what was drawn."""
    pixels = _background(rng, size, spec.background)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    colours = list(spec.palette)
    drawn: list[Drawn] = []
    for _ in range(count):
        extent = int(round(size * rng.uniform(*extent_range)))
        box = _place(rng, size, extent, [d.box for d in drawn])
        shape = int(rng.integers(len(spec.shapes)))
        colour = colours[int(rng.integers(len(colours)))]
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(
            int(np.clip(c + j, 0, 255)) for c, j in zip(spec.palette[colour], jitter, strict=True)
        )
        _draw(draw, spec.shapes[shape], box, fill)
        _draw(draw_mask, spec.shapes[shape], box, shape + 1)
        drawn.append(Drawn(shape, colour, box))
    return image, mask, drawn


def _save(image: Image.Image, path: Path, as_jpeg: bool) -> Path:
    path = path.with_suffix(".jpg" if as_jpeg else ".png")
    if as_jpeg:
        image.save(path, format="JPEG", quality=90)
    else:
        image.save(path, format="PNG")
    return path


class _Writer:
    """Collects samples of one source and writes its metadata files at the end."""

    def __init__(self, root: Path, spec: Spec):
        self.root, self.spec = root, spec
        self.rows: list[list[str]] = []
        self.coco: dict[str, list] = {"images": [], "annotations": [], "categories": []}
        root.mkdir(parents=True)
        if spec.format != "cls":
            (root / "images").mkdir()
        if spec.format == "seg":
            (root / "masks").mkdir()

    def classes(self) -> list[str]:
        spec = self.spec
        if spec.kind == "count":
            return list(COUNT_NAMES)
        if spec.kind == "attr":
            return sorted([*spec.palette, "big", "small"])
        if spec.format == "seg":
            return ["background", *spec.shapes]
        return list(spec.shapes)

    def add(self, i: int, rng: np.random.Generator, size: int) -> None:
        spec, stem = self.spec, f"{i:05d}"
        as_jpeg = bool(rng.integers(2))
        if spec.kind == "shape":
            image, _, drawn = render(rng, spec, size, 1, (0.45, 0.8))
            folder = self.root / spec.shapes[drawn[0].shape]
            folder.mkdir(exist_ok=True)
            _save(image, folder / stem, as_jpeg)
        elif spec.kind == "count":
            count = int(rng.integers(1, 4))
            image, _, _ = render(rng, spec, size, count, (0.25, 0.33))
            folder = self.root / COUNT_NAMES[count - 1]
            folder.mkdir(exist_ok=True)
            _save(image, folder / stem, as_jpeg)
        elif spec.kind == "attr":
            big = bool(rng.integers(2))
            image, _, drawn = render(
                rng, spec, size, int(rng.integers(1, 3)), (0.5, 0.65) if big else (0.25, 0.33)
            )
            path = _save(image, self.root / "images" / stem, as_jpeg)
            names = sorted({d.colour for d in drawn} | {"big" if big else "small"})
            self.rows.append([path.name, ";".join(names)])
        else:  # objects: det, seg, unlabeled
            image, mask, drawn = render(rng, spec, size, int(rng.integers(1, 4)), (0.28, 0.45))
            path = _save(image, self.root / "images" / stem, as_jpeg)
            if spec.format == "seg":
                mask.save(self.root / "masks" / f"{stem}.png", format="PNG")
            elif spec.format == "det":
                self._coco_image(i, path.name, size, drawn)

    def _coco_image(self, i: int, file_name: str, size: int, drawn: list[Drawn]) -> None:
        self.coco["images"].append({"id": i, "file_name": file_name, "width": size, "height": size})
        for d in drawn:
            x0, y0, x1, y1 = d.box
            w, h = x1 - x0 + 1, y1 - y0 + 1
            self.coco["annotations"].append(
                {
                    "id": len(self.coco["annotations"]) + 1,
                    "image_id": i,
                    "category_id": d.shape + 1,
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )

    def finish(self) -> None:
        spec = self.spec
        if spec.format in ("cls", "multilabel", "seg"):
            (self.root / "classes.txt").write_text("\n".join(self.classes()) + "\n")
        if spec.format == "multilabel":
            with open(self.root / "labels.csv", "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(["file", "labels"])
                writer.writerows(self.rows)
        if spec.format == "det":
            self.coco["categories"] = [{"id": k + 1, "name": s} for k, s in enumerate(spec.shapes)]
            (self.root / "annotations.json").write_text(json.dumps(self.coco, indent=1))


def synthesize(
    out_dir: str | Path,
    seed: int = 0,
    images_per_source: int = 240,
    image_size: int = 64,
    log: Callable[[str], None] = print,
    specs: tuple[Spec, ...] = SPECS,
) -> dict[str, Path]:
    """Write the synthetic sources below ``out_dir``; returns ``{name: folder}``.

    Idempotent: ``out_dir/synth.json`` records the arguments, and a second call with the
    same ones returns at once. Each source is written to a temporary folder and moved
    into place, so an interrupted run leaves no half-written source.
    """
    out = Path(out_dir)
    params = {
        "format": SYNTH_FORMAT,
        "seed": seed,
        "images_per_source": images_per_source,
        "image_size": image_size,
        "sources": [s.name for s in specs],
    }
    paths = {spec.name: out / spec.name for spec in specs}
    marker = out / "synth.json"
    if (
        marker.is_file()
        and json.loads(marker.read_text()) == params
        and all(p.is_dir() for p in paths.values())
    ):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    start = time.monotonic()
    for index, spec in enumerate(specs):
        rng = np.random.default_rng([seed, index])
        tmp = out / f".tmp-{spec.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        writer = _Writer(tmp, spec)
        for i in range(images_per_source):
            writer.add(i, rng, image_size)
        writer.finish()
        shutil.rmtree(paths[spec.name], ignore_errors=True)
        os.replace(tmp, paths[spec.name])
    marker.write_text(json.dumps(params, indent=2))
    log(
        f"synth: {len(specs)} sources x {images_per_source} images ({image_size}px) in {out} "
        f"in {time.monotonic() - start:.1f} s"
    )
    return paths


def synth_source_configs(out_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(sources, downstream)``: ``SourceConfig`` / ``DownstreamConfig`` dicts for ``out_dir``."""
    out = Path(out_dir)
    sources = [
        {"name": s.name, "format": s.format, "uri": str(out / s.name)}
        for s in SPECS
        if not s.downstream
    ]
    downstream = [
        {"name": s.name, "format": s.format, "uri": str(out / s.name)}
        for s in SPECS
        if s.downstream
    ]
    return sources, downstream
