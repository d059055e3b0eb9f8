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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A field's value for a message: short arrays of scalars as JSON, else the JSON type."""
    if (
        isinstance(value, list)
        and len(value) <= 8
        and not any(isinstance(v, list | dict) for v in value)
    ):
        return json.dumps(value)
    if isinstance(value, list | dict):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    return repr(value)


def _declared_size(image: dict) -> tuple[float, float] | None | str:
    """COCO ``width``/``height`` (None when both are absent), or what is wrong with them."""
    size = (image.get("width"), image.get("height"))
    if size == (None, None):
        return None
    if not all(_is_number(v) and math.isfinite(v) and v > 0 for v in size):
        return (
            f"image `width`/`height` must be positive numbers, got "
            f"{_shown(size[0])}/{_shown(size[1])}"
        )
    return size


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
    except RecursionError:
        raise LayoutError(
            "annotations.json", "is nested too deeply to be COCO annotations; check the file"
        ) from None
    if not isinstance(data, dict):
        raise LayoutError(
            "annotations.json", "top level must be an object with images/annotations/categories"
        )
    images, annotations, categories = (
        _coco_list(data, k) for k in ("images", "annotations", "categories")
    )
    bad = [c for c in categories if not (_is_int(c.get("id")) and isinstance(c.get("name"), str))]
    if bad:
        raise LayoutError(
            "annotations.json",
            f"every category needs an integer `id` and a string `name`; got id "
            f"{_shown(bad[0].get('id'))}, name {_shown(bad[0].get('name'))}",
        )
    categories = sorted(categories, key=lambda c: c["id"])
    category_index = {c["id"]: i for i, c in enumerate(categories)}
    classes = [c["name"] for c in categories]
    if len(category_index) != len(categories):
        raise LayoutError("annotations.json", "category ids are not unique")
    problems: list[Problem] = []
    by_id: dict[Any, Entry] = {}
    seen: set[str] = set()
    for image in images:
        file, problem = listed_image(
            image.get("file_name"), seen, f"annotations.json image id {_shown(image.get('id'))}"
        )
        if problem:
            problems.append(problem)
            continue
        if not _is_int(image.get("id")):
            problems.append(
                Problem(
                    file,
                    f"annotations.json: image `id` must be an integer, got "
                    f"{_shown(image.get('id'))}",
                )
            )
            continue
        if image["id"] in by_id:
            problems.append(
                Problem(file, f"annotations.json: image id {image['id']} is not unique")
            )
            continue
        declared = _declared_size(image)
        if isinstance(declared, str):
            problems.append(Problem(file, f"annotations.json: {declared}"))
            continue
        by_id[image["id"]] = Entry(file, {"boxes": [], "labels": []}, declared_size=declared)
    for ann in annotations:
        wrong = [k for k in ("image_id", "category_id") if not _is_int(ann.get(k))]
        if "id" in ann and not _is_int(ann["id"]):
            wrong.insert(0, "id")
        if wrong:
            problems.append(
                Problem(
                    "annotations.json",
                    f"annotation id {_shown(ann.get('id'))}: "
                    + ", ".join(
                        f"`{k}` must be an integer, got {_shown(ann.get(k))}" for k in wrong
                    ),
                )
            )
            continue
        entry = by_id.get(ann["image_id"])
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
                f"annotations.json: annotation id {ann.get('id')}: category_id {category} is "
                f"not in categories {sorted(category_index)}"
            )
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            entry.errors.append(
                f"annotations.json: annotation id {ann.get('id')}: bbox must be [x, y, w, h] "
                f"numbers, got {_shown(bbox)}"
            )
            continue
        x, y, w, h = (float(v) for v in bbox)
        entry.label["boxes"].append([x, y, x + w, y + h])
        entry.label["labels"].append(category_index[category])
    problems += unlisted(listing, seen, "annotations.json")
    return SourceIndex(classes, list(by_id.values()), problems)


def check_boxes(boxes: list[list[float]], width: int, height: int) -> list[str]:
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
            f"annotations.json says {entry.declared_size[0]:g}x{entry.declared_size[1]:g}, "
            f"the image is {width}x{height}"
        )
    return errors + check_boxes(entry.label["boxes"], width, height)
