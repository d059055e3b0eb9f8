"""Readers of the five source formats (see docs/data.md).

A reader first builds an *index* of the source from its folder listing and metadata
files (labels.csv, annotations.json, classes.txt), then loads and validates every
record: the image is decoded completely, labels are checked against the class list and
the image size. Every problem is collected as a :class:`Problem` naming the file; by
default they are raised together as one :class:`SourceError`, with ``skip_invalid``
the bad records are left out and the problems returned.

Sources are a local folder or ``s3://bucket/prefix``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import posixpath
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from xlearner.store import StoreError, is_s3, open_store
from xlearner.tasks import IGNORE_INDEX, SourceFormat

PIL_FORMATS = {"JPEG": "jpg", "PNG": "png"}
MAX_LISTED_PROBLEMS = 100


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a source: the file (relative to the source root) and what."""

    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


class SourceError(ValueError):
    """A source with problems; ``.problems`` has all of them, the message lists them."""

    def __init__(self, uri: str, problems: list[Problem], hint: str = ""):
        self.uri = uri
        self.problems = list(problems)
        lines = [f"source {uri}: {len(problems)} problem(s):"]
        lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


SKIP_HINT = (
    "fix these files, or set `skip_invalid: true` on the source to leave the bad records out"
)


@dataclass
class Record:
    """One validated sample: the original encoded bytes and a JSON-able label payload.

    ``label`` by format: cls ``{"label": i}``; multilabel ``{"labels": [i, ...]}``;
    det ``{"boxes": [[x1, y1, x2, y2], ...], "labels": [i, ...]}`` in pixels of the
    original image; seg ``{"classes": [i, ...]}`` (classes present in ``mask``);
    unlabeled ``{}``.
    """

    file: str
    label: dict[str, Any]
    data: bytes
    image_format: str  # "jpg" or "png", from the content (not the file name)
    width: int
    height: int
    mask: bytes | None = None
    sha256: str = ""  # of ``data``


@dataclass
class Entry:
    """A record as the index knows it, before its image was read."""

    file: str
    label: dict[str, Any] = field(default_factory=dict)
    mask_file: str | None = None
    declared_size: tuple[int, int] | None = None  # COCO width/height
    errors: list[str] = field(default_factory=list)  # label problems found by the index


# ---------------------------------------------------------------- file access


class SourceFiles:
    """Listing and reading the files of a source root (local folder or S3 prefix)."""

    uri: str

    def list(self) -> tuple[list[str], list[Problem]]:
        """All non-hidden files as sorted posix paths relative to the root, plus problems."""
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


class LocalFiles(SourceFiles):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.real_root = os.path.realpath(self.root)
        self.uri = str(self.root)

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self.real_root or real.startswith(self.real_root + os.sep)

    def list(self) -> tuple[list[str], list[Problem]]:
        files, problems, seen = [], [], set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if not self._inside(dirpath):
                problems.append(Problem(rel_dir, "symlink points outside the source root"))
                dirnames[:] = []
                continue
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink loop or a second link to the same folder
                dirnames[:] = []
                continue
            seen.add(real)
            for name in filenames:
                if name.startswith("."):
                    continue
                rel = posixpath.join(rel_dir, name) if rel_dir else name
                if not self._inside(os.path.join(dirpath, name)):
                    problems.append(Problem(rel, "symlink points outside the source root"))
                else:
                    files.append(rel)
        return sorted(files), problems

    def _path(self, rel: str) -> str:
        path = os.path.join(self.root, rel)
        if not self._inside(path):
            raise OSError("path escapes the source root (symlink)")
        return path

    def read(self, rel: str) -> bytes:
        with open(self._path(rel), "rb") as f:
            return f.read()


class StoreFiles(SourceFiles):
    """A source below an S3 prefix (any :class:`~xlearner.store.ArtifactStore`)."""

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.store = open_store(uri, endpoint_url)
        self.uri = uri

    def list(self) -> tuple[list[str], list[Problem]]:
        return [k for k in self.store.list("") if not _hidden(k)], []

    def read(self, rel: str) -> bytes:
        return self.store.read_bytes(rel)


def open_source_files(uri: str, endpoint_url: str | None = None) -> SourceFiles:
    if is_s3(uri):
        return StoreFiles(uri, endpoint_url)
    if "://" in uri:
        raise SourceError(
            uri, [Problem("", "unsupported URI scheme; use a local folder or s3://bucket/prefix")]
        )
    if not Path(uri).expanduser().is_dir():
        raise SourceError(uri, [Problem("", "the source folder does not exist")])
    return LocalFiles(uri)


def safe_relpath(name: str) -> str | None:
    """``name`` normalised to a relative posix path, or None if it escapes its folder."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or ":" in name.split("/")[0]:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


# ---------------------------------------------------------------- indexes


@dataclass
class SourceIndex:
    classes: list[str]
    entries: list[Entry]
    problems: list[Problem]


class _Fatal(Exception):
    """A structural problem: nothing can be read until it is fixed."""

    def __init__(self, file: str, message: str):
        self.problem = Problem(file, message)


def _read_text(files: SourceFiles, rel: str) -> str:
    try:
        return files.read(rel).decode("utf-8-sig")
    except (OSError, StoreError) as err:
        raise _Fatal(rel, f"cannot be read: {err}") from None
    except UnicodeDecodeError:
        raise _Fatal(rel, "is not UTF-8 text") from None


def _read_classes(files: SourceFiles, rel: str = "classes.txt") -> list[str]:
    names = [line.strip() for line in _read_text(files, rel).splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _Fatal(rel, f"duplicate class names {duplicates}; each class once, one per line")
    if not names:
        raise _Fatal(rel, "lists no classes; write one class name per line")
    return names


def _images_in(listing: list[str], folder: str) -> list[str]:
    return [f for f in listing if f.startswith(folder + "/")]


def _listed_image(name: Any, seen: set[str], where: str) -> tuple[str | None, Problem | None]:
    """``images/<name>`` for a name in a metadata file; rejects escapes and duplicates."""
    rel = safe_relpath(str(name)) if isinstance(name, str) else None
    if rel is None:
        return None, Problem(f"images/{name}", f"{where}: path escapes the source root or is empty")
    file = f"images/{rel}"
    if file in seen:
        return None, Problem(file, f"{where}: listed more than once (duplicate file name)")
    seen.add(file)
    return file, None


def _unlisted(listing: list[str], listed: set[str], metadata: str) -> list[Problem]:
    return [
        Problem(f, f"is not listed in {metadata}; add it (labels may be empty) or remove the file")
        for f in _images_in(listing, "images")
        if f not in listed
    ]


def _index_cls(files: SourceFiles, listing: list[str]) -> SourceIndex:
    problems: list[Problem] = []
    pinned = _read_classes(files) if "classes.txt" in listing else None
    by_class: dict[str, list[str]] = {}
    for rel in listing:
        if rel == "classes.txt":
            continue
        if "/" not in rel:
            problems.append(
                Problem(rel, "stray file at the source root; images go in <root>/<class>/")
            )
            continue
        by_class.setdefault(rel.split("/", 1)[0], []).append(rel)
    if pinned is not None:
        for folder in sorted(set(by_class) - set(pinned)):
            problems.append(Problem(folder, f"unknown class folder: not in classes.txt {pinned}"))
    classes = pinned if pinned is not None else sorted(by_class)
    index = {name: i for i, name in enumerate(classes)}
    entries = [
        Entry(rel, {"label": index[folder]})
        for folder, rels in sorted(by_class.items())
        if folder in index
        for rel in rels
    ]
    return SourceIndex(classes, entries, problems)


def _index_multilabel(files: SourceFiles, listing: list[str]) -> SourceIndex:
    if "labels.csv" not in listing:
        raise _Fatal(
            "labels.csv", "missing; a multilabel source needs labels.csv with header `file,labels`"
        )
    rows = list(csv.reader(io.StringIO(_read_text(files, "labels.csv"))))
    if not rows or [c.strip() for c in rows[0]] != ["file", "labels"]:
        raise _Fatal("labels.csv", "the first line must be the header `file,labels`")
    problems: list[Problem] = []
    parsed: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            problems.append(
                Problem(
                    "labels.csv",
                    f"line {line_no}: expected 2 columns (file,labels), got {len(row)}",
                )
            )
            continue
        file, problem = _listed_image(row[0].strip(), seen, f"labels.csv line {line_no}")
        if problem:
            problems.append(problem)
            continue
        parsed.append((file, [n.strip() for n in row[1].split(";") if n.strip()]))
    pinned = _read_classes(files) if "classes.txt" in listing else None
    classes = pinned if pinned is not None else sorted({n for _, names in parsed for n in names})
    index = {name: i for i, name in enumerate(classes)}
    entries = []
    for file, names in parsed:
        unknown = sorted({n for n in names if n not in index})
        if unknown:
            problems.append(
                Problem(file, f"unknown label(s) {unknown}; classes.txt lists {classes}")
            )
            continue
        entries.append(Entry(file, {"labels": sorted({index[n] for n in names})}))
    problems += _unlisted(listing, seen, "labels.csv")
    return SourceIndex(classes, entries, problems)


def _coco_list(data: dict, key: str) -> list[dict]:
    value = data.get(key, [] if key == "annotations" else None)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _Fatal(
            "annotations.json", f"`{key}` must be a list of objects (COCO detection format)"
        )
    return value


def _index_det(files: SourceFiles, listing: list[str]) -> SourceIndex:
    if "annotations.json" not in listing:
        raise _Fatal("annotations.json", "missing; a det source needs a COCO annotations.json")
    try:
        data = json.loads(_read_text(files, "annotations.json"))
    except json.JSONDecodeError as err:
        raise _Fatal("annotations.json", f"is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise _Fatal(
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
        raise _Fatal(
            "annotations.json", "every category needs an integer `id` and a `name`"
        ) from None
    if len(category_index) != len(categories):
        raise _Fatal("annotations.json", "category ids are not unique")
    problems: list[Problem] = []
    by_id: dict[Any, Entry] = {}
    seen: set[str] = set()
    for image in images:
        file, problem = _listed_image(
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
    problems += _unlisted(listing, seen, "annotations.json")
    return SourceIndex(classes, list(by_id.values()), problems)


def _index_seg(files: SourceFiles, listing: list[str]) -> SourceIndex:
    if "classes.txt" not in listing:
        raise _Fatal(
            "classes.txt", "missing; a seg source needs classes.txt (line i = name of class i)"
        )
    classes = _read_classes(files)
    masks = {posixpath.splitext(f[len("masks/") :])[0]: f for f in _images_in(listing, "masks")}
    problems: list[Problem] = []
    entries = []
    used: set[str] = set()
    for file in _images_in(listing, "images"):
        stem = posixpath.splitext(file[len("images/") :])[0]
        mask = masks.get(stem)
        if mask is None:
            problems.append(Problem(file, f"has no mask masks/{stem}.png"))
            continue
        used.add(stem)
        entries.append(Entry(file, {}, mask_file=mask))
    problems += [
        Problem(m, "mask has no image with the same stem in images/")
        for s, m in masks.items()
        if s not in used
    ]
    return SourceIndex(classes, entries, problems)


def _index_unlabeled(files: SourceFiles, listing: list[str]) -> SourceIndex:
    return SourceIndex([], [Entry(f) for f in _images_in(listing, "images")], [])


INDEXERS = {
    SourceFormat.cls: _index_cls,
    SourceFormat.multilabel: _index_multilabel,
    SourceFormat.det: _index_det,
    SourceFormat.seg: _index_seg,
    SourceFormat.unlabeled: _index_unlabeled,
}


# ---------------------------------------------------------------- validation


def decode_image(data: bytes) -> tuple[str, int, int]:
    """Decode ``data`` completely (a truncated file fails here); returns (format, w, h)."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can identify") from None
    with image:
        if image.format not in PIL_FORMATS:
            raise ValueError(f"is {image.format}, not JPEG or PNG")
        width, height = image.size
        if image.format == "JPEG":
            # DCT scaling: every coded byte is still decoded (truncation is still caught),
            # but the inverse transform runs at 1/8 size, which makes validation cheap.
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        image.load()
        return PIL_FORMATS[image.format], width, height


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


def _check_mask(
    data: bytes, num_classes: int, width: int, height: int
) -> tuple[list[int], list[str]]:
    with Image.open(io.BytesIO(data)) as mask:
        if mask.format != "PNG" or mask.mode not in ("L", "P"):
            return [], [
                "mask must be a single-channel 8-bit PNG (mode L or P), "
                f"got {mask.format} {mask.mode}"
            ]
        if mask.size != (width, height):
            return [], [
                f"mask size {mask.size[0]}x{mask.size[1]} does not match "
                f"the image's {width}x{height}"
            ]
        values = np.unique(np.asarray(mask))
    bad = [int(v) for v in values if v >= num_classes and v != IGNORE_INDEX]
    if bad:
        return [], [
            f"mask values {bad} are outside the classes 0..{num_classes - 1} (255 = ignore)"
        ]
    return [int(v) for v in values if v < num_classes], []


class SourceReader:
    """Reads and validates one source. ``records()`` streams; ``read()`` collects."""

    def __init__(
        self,
        uri: str,
        format: SourceFormat | str,
        endpoint_url: str | None = None,
        workers: int | None = None,
    ):
        self.uri = uri
        self.format = SourceFormat(format)
        self.files = open_source_files(uri, endpoint_url)
        self.workers = workers or min(8, (os.cpu_count() or 1) + 2)
        listing, problems = self.files.list()
        try:
            index = INDEXERS[self.format](self.files, listing)
        except _Fatal as fatal:
            raise SourceError(
                uri, [fatal.problem, *problems], "fix the source's layout (see docs/data.md)"
            ) from None
        self.classes = index.classes
        self.entries = index.entries
        self.problems: list[Problem] = problems + index.problems
        if not self.entries and not self.problems:
            raise SourceError(
                uri,
                [Problem("", f"empty source: no images found for format {self.format.value!r}")],
            )

    def _load(self, entry: Entry) -> Record | list[Problem]:
        try:
            data = self.files.read(entry.file)
        except (OSError, StoreError) as err:
            return [Problem(entry.file, f"unreadable file: {err}")]
        try:
            image_format, width, height = decode_image(data)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
            return [Problem(entry.file, f"corrupt or truncated image: {err}")]
        label = dict(entry.label)
        errors = list(entry.errors)
        mask = None
        if self.format == SourceFormat.det:
            if entry.declared_size and entry.declared_size != (width, height):
                errors.append(
                    f"annotations.json says {entry.declared_size[0]}x{entry.declared_size[1]}, "
                    f"the image is {width}x{height}"
                )
            errors += _check_boxes(label["boxes"], width, height)
        elif self.format == SourceFormat.seg:
            try:
                mask = self.files.read(entry.mask_file)
                present, mask_errors = _check_mask(mask, len(self.classes), width, height)
            except Exception as err:  # noqa: BLE001
                present, mask_errors = [], [f"unreadable or corrupt mask {entry.mask_file}: {err}"]
            label["classes"] = present
            errors += mask_errors
        if errors:
            return [Problem(entry.file, e) for e in errors]
        return Record(
            entry.file,
            label,
            data,
            image_format,
            width,
            height,
            mask,
            hashlib.sha256(data).hexdigest(),
        )

    def records(self, skip_invalid: bool = False) -> Iterator[Record]:
        """Valid records in file order; problems accumulate in ``self.problems``.

        Raises :class:`SourceError` at the end when there were problems (unless
        ``skip_invalid``) or when no record is valid.
        """
        valid = 0
        in_flight: deque[Future] = deque()
        entries = iter(self.entries)
        with ThreadPoolExecutor(self.workers) as pool:  # PIL and hashlib release the GIL
            # A sliding window of 4 x workers loads: bounded memory, no pipeline bubbles.
            for entry in itertools.islice(entries, 4 * self.workers):
                in_flight.append(pool.submit(self._load, entry))
            while in_flight:
                result = in_flight.popleft().result()
                if (entry := next(entries, None)) is not None:
                    in_flight.append(pool.submit(self._load, entry))
                if isinstance(result, Record):
                    valid += 1
                    yield result
                else:
                    self.problems += result
        if self.problems and not skip_invalid:
            raise SourceError(self.uri, self.problems, SKIP_HINT)
        if not valid:
            raise SourceError(self.uri, [*self.problems, Problem("", "no valid records left")])

    def read(self, skip_invalid: bool = False) -> tuple[list[Record], list[Problem]]:
        records = list(self.records(skip_invalid))
        return records, list(self.problems)


def read_source(
    uri: str,
    format: SourceFormat | str,
    *,
    skip_invalid: bool = False,
    endpoint_url: str | None = None,
) -> tuple[list[Record], list[Problem]]:
    """All valid records of a source and the problems found (raises unless ``skip_invalid``)."""
    return SourceReader(uri, format, endpoint_url).read(skip_invalid)
