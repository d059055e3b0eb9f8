"""PASCAL VOC sources as VOC ships them: detection (``voc_det``), segmentation (``voc_seg``).

```
root/
  JPEGImages/<id>.jpg
  Annotations/<id>.xml                  voc_det: objects with name, difficult, bndbox
  SegmentationClass/<id>.png            voc_seg: palette PNG, index = class, 255 = ignore
  ImageSets/Main/<split>.txt            voc_det: one image id per line
  ImageSets/Segmentation/<split>.txt    voc_seg
  classes.txt                           optional: pins the class list and its order
```

The split lists decide which images belong to the source (VOC's ``JPEGImages/`` holds
the images of every challenge: unlisted ones are not part of it) and, when they can,
the split: ``test.txt`` present: train = ``trainval.txt``, val = ``test.txt`` (VOC2007);
else ``train.txt`` + ``val.txt``; else ``trainval.txt`` alone, split by ``val_fraction``.

VOC boxes are 1-based inclusive pixel corners; they become ``[xmin - 1, ymin - 1, xmax,
ymax]`` in the 0-based continuous pixels of the other formats. ``difficult`` flags are
kept in the label (``"difficult": [0|1, ...]``) so the VOC AP50 can leave those boxes
out. The annotation XML is parsed with ``defusedxml`` when it is installed; without it a
file declaring a DTD or entities is refused (VOC annotations have none), which rules
out entity expansion and external entities.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from xml.etree import ElementTree

from xlearner.data.coco import check_boxes
from xlearner.data.source_files import Problem, SourceFiles, safe_relpath
from xlearner.data.source_index import Entry, LayoutError, SourceIndex, read_classes, read_text
from xlearner.store import StoreError

try:  # pragma: no cover - depends on the environment
    from defusedxml.ElementTree import fromstring as _parse_xml
except ImportError:  # pragma: no cover
    _parse_xml = None

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
VOC_SEG_CLASSES = ("background", *VOC_CLASSES)
"""A ``voc_seg`` source without ``classes.txt``: palette index i = class i."""

MAX_XML_BYTES = 1 << 20
READ_WORKERS = 8


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message says what and how to fix it."""


# ---------------------------------------------------------------- split lists


def read_split_lists(
    files: SourceFiles, listing: list[str], folder: str
) -> tuple[list[tuple[str, str | None, str]], list[Problem]]:
    """``(id, split or None, where it is listed)`` for every id of ``folder``'s lists."""
    lists = {name: f"{folder}/{name}.txt" for name in ("train", "val", "trainval", "test")}
    present = {name for name, rel in lists.items() if rel in listing}
    if "test" in present:
        if "trainval" not in present:
            raise LayoutError(
                lists["test"], "needs trainval.txt beside it (train = trainval, val = test)"
            )
        plan = [("trainval", "train"), ("test", "val")]
    elif {"train", "val"} <= present:
        plan = [("train", "train"), ("val", "val")]
    elif "trainval" in present:
        plan = [("trainval", None)]
    else:
        raise LayoutError(
            f"{folder}/",
            "no split list; write train.txt and val.txt (or trainval.txt, split by "
            "val_fraction), one image id per line",
        )
    ids: list[tuple[str, str | None, str]] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for name, split in plan:
        rel = lists[name]
        for line_no, line in enumerate(read_text(files, rel).splitlines(), start=1):
            image_id = line.strip()
            if not image_id:
                continue
            if "/" in image_id or safe_relpath(image_id) != image_id or len(image_id.split()) > 1:
                problems.append(Problem(rel, f"line {line_no}: {image_id!r} is not one image id"))
                continue
            if image_id in seen:
                problems.append(
                    Problem(
                        rel, f"line {line_no}: image id {image_id!r} is already in {seen[image_id]}"
                    )
                )
                continue
            seen[image_id] = rel
            ids.append((image_id, split, f"{rel} line {line_no}"))
    return ids, problems


def _images_by_id(listing: list[str]) -> dict[str, str]:
    """``JPEGImages/<id>.<ext>`` by id (JPEG or PNG by content; any extension)."""
    images = {}
    for rel in listing:
        folder, _, name = rel.partition("/")
        if folder == "JPEGImages" and "/" not in name:
            images.setdefault(posixpath.splitext(name)[0], rel)
    return images


def _listed_images(
    files: SourceFiles, listing: list[str], folder: str
) -> tuple[list[tuple[str, str, str | None, str]], list[Problem]]:
    """``(id, image file, split, where)`` of every listed id whose image exists."""
    ids, problems = read_split_lists(files, listing, folder)
    images = _images_by_id(listing)
    found = []
    for image_id, split, where in ids:
        image = images.get(image_id)
        if image is None:
            problems.append(Problem(f"JPEGImages/{image_id}.jpg", f"listed in {where} but missing"))
        else:
            found.append((image_id, image, split, where))
    return found, problems


# ---------------------------------------------------------------- annotation XML


def parse_xml(data: bytes) -> ElementTree.Element:
    """The root element of an annotation; refuses DTDs and entities (see module doc)."""
    if len(data) > MAX_XML_BYTES:
        raise AnnotationError(f"is {len(data)} bytes; a VOC annotation is a few KiB")
    if _parse_xml is None and (b"<!DOCTYPE" in data or b"<!ENTITY" in data):
        raise AnnotationError("declares a DTD or entities, which VOC annotations never do: refused")
    try:
        if _parse_xml is not None:
            return _parse_xml(data, forbid_dtd=True)
        return ElementTree.fromstring(data)
    except ElementTree.ParseError as err:
        raise AnnotationError(f"is not well-formed XML: {err}") from None
    except ValueError as err:  # defusedxml's DTDForbidden, EntitiesForbidden, ...
        raise AnnotationError(f"refused: {err}") from None


def _text(element: ElementTree.Element, path: str, what: str) -> str:
    found = element.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise AnnotationError(f"{what}: <{path}> missing")
    return found.text.strip()


def _number(element: ElementTree.Element, path: str, what: str) -> float:
    text = _text(element, path, what)
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(f"{what}: <{path}> is {text!r}, not a number") from None


def parse_annotation(data: bytes) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
    """The objects (``name``, ``box`` 0-based xyxy, ``difficult``) and declared ``size``."""
    root = parse_xml(data)
    if root.tag != "annotation":
        raise AnnotationError(f"root element is <{root.tag}>, not <annotation>")
    size = None
    if root.find("size") is not None:
        width, height = (_number(root, f"size/{k}", "size") for k in ("width", "height"))
        size = (int(width), int(height))
    objects = []
    for number, obj in enumerate(root.iter("object"), start=1):
        what = f"object {number}"
        name = _text(obj, "name", what)
        what = f"object {number} ({name})"
        difficult = obj.find("difficult")
        if difficult is None or (difficult.text or "").strip() not in ("0", "1"):
            raise AnnotationError(
                f"{what}: <difficult> is missing or not 0/1; write <difficult>0</difficult> "
                "(1 = left out of the VOC AP50)"
            )
        xmin, ymin, xmax, ymax = (
            _number(obj, f"bndbox/{k}", what) for k in ("xmin", "ymin", "xmax", "ymax")
        )
        objects.append(
            {
                "name": name,
                "box": [xmin - 1.0, ymin - 1.0, xmax, ymax],
                "difficult": int(difficult.text.strip()),
            }
        )
    return objects, size


def _read_all(files: SourceFiles, rels: list[str]) -> list[bytes | Exception]:
    def read(rel: str) -> bytes | Exception:
        try:
            return files.read(rel)
        except (OSError, StoreError) as err:
            return err

    with ThreadPoolExecutor(READ_WORKERS) as pool:
        return list(pool.map(read, rels))


def _pinned_classes(files: SourceFiles, listing: list[str]) -> list[str] | None:
    return read_classes(files) if "classes.txt" in listing else None


def index_voc_det(files: SourceFiles, listing: list[str]) -> SourceIndex:
    listed, problems = _listed_images(files, listing, "ImageSets/Main")
    xml_files = [f"Annotations/{image_id}.xml" for image_id, *_ in listed]
    parsed: list[tuple[str, str | None, str, list[dict], tuple[int, int] | None]] = []
    for (_, image, split, where), xml, data in zip(
        listed, xml_files, _read_all(files, xml_files), strict=True
    ):
        if xml not in listing:
            problems.append(Problem(xml, f"missing: the annotation of {image} ({where})"))
            continue
        if isinstance(data, Exception):
            problems.append(Problem(xml, f"unreadable file: {data}"))
            continue
        try:
            objects, size = parse_annotation(data)
        except AnnotationError as err:
            problems.append(Problem(xml, str(err)))
            continue
        parsed.append((image, split, xml, objects, size))
    pinned = _pinned_classes(files, listing)
    names = {o["name"] for *_, objects, _ in parsed for o in objects}
    classes = pinned if pinned is not None else sorted(names)
    index = {name: i for i, name in enumerate(classes)}
    entries = []
    for image, split, xml, objects, size in parsed:
        unknown = sorted({o["name"] for o in objects} - set(index))
        if unknown:
            problems.append(
                Problem(xml, f"unknown class(es) {unknown}; classes.txt lists {classes}")
            )
            continue
        label = {
            "boxes": [o["box"] for o in objects],
            "labels": [index[o["name"]] for o in objects],
            "difficult": [o["difficult"] for o in objects],
        }
        entries.append(Entry(image, label, label_file=xml, declared_size=size, split=split))
    return SourceIndex(classes, entries, problems)


def check_voc_record(entry: Entry, width: int, height: int) -> list[str]:
    """What is wrong with a ``voc_det`` entry given its image's size (size, boxes)."""
    xml = entry.label_file
    errors = []
    if entry.declared_size and entry.declared_size != (width, height):
        errors.append(
            f"{xml} says {entry.declared_size[0]}x{entry.declared_size[1]}, "
            f"the image is {width}x{height}"
        )
    return errors + [f"{xml}: {e}" for e in check_boxes(entry.label["boxes"], width, height)]


def index_voc_seg(files: SourceFiles, listing: list[str]) -> SourceIndex:
    listed, problems = _listed_images(files, listing, "ImageSets/Segmentation")
    pinned = _pinned_classes(files, listing)
    classes = pinned if pinned is not None else list(VOC_SEG_CLASSES)
    entries = []
    for image_id, image, split, where in listed:
        mask = f"SegmentationClass/{image_id}.png"
        if mask not in listing:
            problems.append(Problem(mask, f"missing: the mask of {image} ({where})"))
            continue
        entries.append(Entry(image, {}, mask_file=mask, split=split))
    return SourceIndex(classes, entries, problems)
