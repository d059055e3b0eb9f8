"""The COCO detection source (``det``): ``annotations.json`` and ``images/``.

:func:`index_coco` reads the images, categories and boxes of ``annotations.json``
(``bbox`` ``[x, y, w, h]`` becomes ``[x1, y1, x2, y2]``, crowd regions are left out);
:func:`check_coco_record` checks a record against its decoded image: the declared size
and that every box is finite, has an area and lies inside the image.
"""

from __future__ import annotations

import json
import math
from typing import Any

from xlearner.data.source_files import Problem, SourceFiles
from xlearner.data.source_index import (
    Entry,
    LayoutError,
    SourceIndex,
    listed_image,
    read_text,
    unlisted,
)


def _coco_list(data: dict, key: str) -> list[dict]:
    value = data.get(key, [] if key == "annotations" else None)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise LayoutError(
            "annotations.json", f"`{key}` must be a list of objects (COCO detection format)"
        )
    return value


def index_coco(files: SourceFiles, listing: list[str]) -> SourceIndex:
    if "annotations.json" not in listing:
        raise LayoutError("annotations.json", "missing; a det source needs a COCO annotations.json")
    try:
        data = json.loads(read_text(files, "annotations.json"))
    except json.JSONDecodeError as err:
        raise LayoutError("annotations.json", f"is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise LayoutError(
            "annotations.json", "top level must be an object with images/annotations/categories"
        )
    images, annotations, categories = (
        _coco_list(data, k) for k in ("images", "annotations", "categories")
    )
    try:
        categories = sorted(categories, key=lambda c: int(c["id"]))
        category_index = {int(c["id"]): i for i, c in enumerate(categories)}
        classes = [str(c["name"]) for c in categories]
    except (KeyError, TypeError, ValueError):
        raise LayoutError(
            "annotations.json", "every category needs an integer `id` and a `name`"
        ) from None
    if len(category_index) != len(categories):
        raise LayoutError("annotations.json", "category ids are not unique")
    problems: list[Problem] = []
    by_id: dict[Any, Entry] = {}
    seen: set[str] = set()
    for image in images:
        file, problem = listed_image(
            image.get("file_name"), seen, f"annotations.json image id {image.get('id')}"
        )
        if problem:
            problems.append(problem)
            continue
        if "id" not in image or image["id"] in by_id:
            problems.append(Problem(file, "annotations.json: image `id` missing or not unique"))
            continue
        size = (image.get("width"), image.get("height"))
        declared = size if all(isinstance(v, int) for v in size) else None
        by_id[image["id"]] = Entry(file, {"boxes": [], "labels": []}, declared_size=declared)
    for ann in annotations:
        entry = by_id.get(ann.get("image_id"))
        if entry is None:
            problems.append(
                Problem(
                    "annotations.json",
                    f"annotation id {ann.get('id')} refers to unknown "
                    f"image_id {ann.get('image_id')}",
                )
            )
            continue
        if ann.get("iscrowd"):
            continue  # crowd regions are not objects to detect (documented)
        category = ann.get("category_id")
        if category not in category_index:
            entry.errors.append(
                f"annotation id {ann.get('id')}: category_id {category} is not in "
                f"categories {sorted(category_index)}"
            )
            continue
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, int | float) for v in bbox)
        ):
            entry.errors.append(f"annotation id {ann.get('id')}: bbox must be [x, y, w, h]")
            continue
        x, y, w, h = (float(v) for v in bbox)
        entry.label["boxes"].append([x, y, x + w, y + h])
        entry.label["labels"].append(category_index[category])
    problems += unlisted(listing, seen, "annotations.json")
    return SourceIndex(classes, list(by_id.values()), problems)


def _check_boxes(boxes: list[list[float]], width: int, height: int) -> list[str]:
    errors = []
    for x1, y1, x2, y2 in boxes:
        box = f"box [x={x1:g}, y={y1:g}, w={x2 - x1:g}, h={y2 - y1:g}]"
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            errors.append(f"{box} is not finite")
        elif x2 <= x1 or y2 <= y1:
            errors.append(f"{box} has zero area")
        elif x1 < 0 or y1 < 0 or x2 > width + 1e-3 or y2 > height + 1e-3:
            errors.append(f"{box} lies outside the {width}x{height} image")
    return errors


def check_coco_record(entry: Entry, width: int, height: int) -> list[str]:
    """What is wrong with a det entry given its image's size (declared size, boxes)."""
    errors = []
    if entry.declared_size and entry.declared_size != (width, height):
        errors.append(
            f"annotations.json says {entry.declared_size[0]}x{entry.declared_size[1]}, "
            f"the image is {width}x{height}"
        )
    return errors + _check_boxes(entry.label["boxes"], width, height)
