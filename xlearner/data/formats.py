"""Readers of the five source formats and the public data-set layouts (see docs/data.md).

A reader first builds an *index* of the source from its folder listing and metadata
files (labels.csv, classes.txt; the det format's annotations.json is read in
:mod:`xlearner.data.coco`), then loads and validates every record: the image is decoded
completely, labels are checked against the class list and the image size. Every problem
is collected as a :class:`~xlearner.data.source_files.Problem` naming the file; by
default they are raised together as one :class:`~xlearner.data.source_files.SourceError`,
with ``skip_invalid`` the bad records are left out and the problems returned.

Sources are a local folder or ``s3://bucket/prefix`` (:mod:`xlearner.data.source_files`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import os
import posixpath
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from xlearner.data.coco import check_coco_record, index_coco
from xlearner.data.images import read_image
from xlearner.data.list_cls import index_csv_cls, split_folders
from xlearner.data.source_files import Problem, SourceError, SourceFiles, open_source_files
from xlearner.data.source_index import (
    Entry,
    LayoutError,
    SourceIndex,
    images_in,
    listed_image,
    read_classes,
    read_text,
    unlisted,
)
from xlearner.data.voc import check_voc_record, index_voc_det, index_voc_seg
from xlearner.store import StoreError
from xlearner.tasks import IGNORE_INDEX, SourceFormat, label_format

SKIP_HINT = (
    "fix these files, or set `skip_invalid: true` on the source to leave the bad records out"
)


@dataclass
class Record:
    """One validated sample: its encoded bytes and a JSON-able label payload.

    ``label`` by format: cls ``{"label": i}``; multilabel ``{"labels": [i, ...]}``;
    det ``{"boxes": [[x1, y1, x2, y2], ...], "labels": [i, ...]}`` in pixels of the
    original image; seg ``{"classes": [i, ...]}`` (classes present in ``mask``);
    unlabeled ``{}``.
    """

    file: str
    label: dict[str, Any]
    data: bytes  # the file's bytes, or normalised (:mod:`xlearner.data.images`)
    image_format: str  # "jpg" or "png", from the content (not the file name)
    width: int
    height: int
    mask: bytes | None = None
    sha256: str = ""  # of ``data``
    file_sha256: str = ""  # of the source file (``data`` differs where it was normalised)
    split: str | None = None  # "train" / "val" when the layout fixes it (Entry.split)


Transform = Callable[[Record], Record]


def _index_cls(files: SourceFiles, listing: list[str]) -> SourceIndex:
    problems: list[Problem] = []
    pinned = read_classes(files) if "classes.txt" in listing else None
    by_class: dict[str, list[str]] = {}
    split = split_folders(listing)  # train/<class>/..., val/<class>/... (ImageNet-style)
    for rel in listing:
        if rel == "classes.txt":
            continue
        parts = rel.split("/")
        if len(parts) < 2 + split:
            where = "<root>/{train,val}/<class>/" if split else "<root>/<class>/"
            problems.append(
                Problem(rel, f"stray file outside the class folders; images go in {where}")
            )
            continue
        by_class.setdefault(parts[split], []).append(rel)
    if pinned is not None:
        for folder in sorted(set(by_class) - set(pinned)):
            problems.append(Problem(folder, f"unknown class folder: not in classes.txt {pinned}"))
    classes = pinned if pinned is not None else sorted(by_class)
    index = {name: i for i, name in enumerate(classes)}
    entries = [
        Entry(rel, {"label": index[folder]}, split=rel.split("/", 1)[0] if split else None)
        for folder, rels in sorted(by_class.items())
        if folder in index
        for rel in rels
    ]
    return SourceIndex(classes, entries, problems)


def _index_multilabel(files: SourceFiles, listing: list[str]) -> SourceIndex:
    if "labels.csv" not in listing:
        raise LayoutError(
            "labels.csv", "missing; a multilabel source needs labels.csv with header `file,labels`"
        )
    rows = list(csv.reader(io.StringIO(read_text(files, "labels.csv"))))
    if not rows or [c.strip() for c in rows[0]] != ["file", "labels"]:
        raise LayoutError("labels.csv", "the first line must be the header `file,labels`")
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
        file, problem = listed_image(row[0].strip(), seen, f"labels.csv line {line_no}")
        if problem:
            problems.append(problem)
            continue
        parsed.append((file, [n.strip() for n in row[1].split(";") if n.strip()]))
    pinned = read_classes(files) if "classes.txt" in listing else None
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
    problems += unlisted(listing, seen, "labels.csv")
    return SourceIndex(classes, entries, problems)


def _index_seg(files: SourceFiles, listing: list[str]) -> SourceIndex:
    if "classes.txt" not in listing:
        raise LayoutError(
            "classes.txt", "missing; a seg source needs classes.txt (line i = name of class i)"
        )
    classes = read_classes(files)
    masks = {posixpath.splitext(f[len("masks/") :])[0]: f for f in images_in(listing, "masks")}
    problems: list[Problem] = []
    entries = []
    used: set[str] = set()
    for file in images_in(listing, "images"):
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
    return SourceIndex([], [Entry(f) for f in images_in(listing, "images")], [])


INDEXERS = {
    SourceFormat.cls: _index_cls,
    SourceFormat.multilabel: _index_multilabel,
    SourceFormat.det: index_coco,
    SourceFormat.seg: _index_seg,
    SourceFormat.unlabeled: _index_unlabeled,
    SourceFormat.voc_det: index_voc_det,
    SourceFormat.voc_seg: index_voc_seg,
    SourceFormat.csv_cls: index_csv_cls,
}
RECORD_CHECKS = {SourceFormat.det: check_coco_record, SourceFormat.voc_det: check_voc_record}
"""Checks of a record's labels against its decoded image (declared size, boxes)."""


# ---------------------------------------------------------------- validation


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


METADATA_FILES = {SourceFormat.multilabel: "labels.csv", SourceFormat.det: "annotations.json"}


def _listed_but_missing(format: SourceFormat, entries: list[Entry]) -> list[Problem]:
    listed_in = METADATA_FILES.get(format, "the source's metadata")
    return [
        Problem(
            e.file,
            f"listed in {listed_in} but missing: no such file in the source; "
            "add the file or remove its entry",
        )
        for e in entries
    ]


class SourceReader:
    """Reads and validates one source. ``records()`` streams; ``read()`` collects."""

    def __init__(
        self,
        uri: str,
        format: SourceFormat | str,
        endpoint_url: str | None = None,
        workers: int | None = None,
        validated: Collection[str] = (),
    ):
        """``validated``: sha256s of files that passed these image checks before (in a
        published version): their images are not decoded again."""
        self.uri = uri
        self.validated = frozenset(validated)
        self.format = SourceFormat(format)
        self.files = open_source_files(uri, endpoint_url)
        self.workers = workers or min(8, len(os.sched_getaffinity(0)) + 2)
        listing, problems = self.files.list()
        try:
            index = INDEXERS[self.format](self.files, listing)
        except LayoutError as fatal:
            raise SourceError(
                uri, [fatal.problem, *problems], "fix the source's layout (see docs/data.md)"
            ) from None
        present = set(listing)
        missing = [e for e in index.entries if e.file not in present]
        self.classes = index.classes
        self.entries = [e for e in index.entries if e.file in present]
        self.problems: list[Problem] = (
            problems + index.problems + _listed_but_missing(self.format, missing)
        )
        if not self.entries and not self.problems:
            raise SourceError(
                uri,
                [Problem("", f"empty source: no images found for format {self.format.value!r}")],
            )

    def _load(self, entry: Entry, transform: Transform | None = None) -> Record | list[Problem]:
        try:
            data = self.files.read(entry.file)
        except (OSError, StoreError) as err:
            return [Problem(entry.file, f"unreadable file: {err}")]
        file_sha256 = hashlib.sha256(data).hexdigest()
        try:
            image = read_image(data, validated=file_sha256 in self.validated)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
            return [Problem(entry.file, f"corrupt or truncated image: {err}")]
        width, height = image.width, image.height
        label = dict(entry.label)
        errors = list(entry.errors)
        mask = None
        if self.format in RECORD_CHECKS:
            errors += RECORD_CHECKS[self.format](entry, width, height)
        elif label_format(self.format) == SourceFormat.seg:
            try:
                mask = self.files.read(entry.mask_file)
                present, mask_errors = _check_mask(mask, len(self.classes), width, height)
                mask_errors = [f"{entry.mask_file}: {e}" for e in mask_errors]
            except Exception as err:  # noqa: BLE001
                present, mask_errors = [], [f"unreadable or corrupt mask {entry.mask_file}: {err}"]
            label["classes"] = present
            errors += mask_errors
        if errors:
            return [Problem(entry.file, e) for e in errors]
        record = Record(
            entry.file,
            label,
            image.data,
            image.format,
            width,
            height,
            mask,
            sha256=file_sha256 if image.data is data else hashlib.sha256(image.data).hexdigest(),
            file_sha256=file_sha256,
            split=entry.split,
        )
        return transform(record) if transform is not None else record

    def records(
        self, skip_invalid: bool = False, transform: Transform | None = None
    ) -> Iterator[Record]:
        """Valid records in file order; problems accumulate in ``self.problems``.

        ``transform`` (e.g. ingest's downscale) runs on each valid record in the worker
        threads that read it.

        Raises :class:`SourceError` at the end when there were problems (unless
        ``skip_invalid``) or when no record is valid.
        """
        valid = 0
        in_flight: deque[Future] = deque()
        entries = iter(self.entries)
        with ThreadPoolExecutor(self.workers) as pool:  # PIL and hashlib release the GIL
            # A sliding window of 4 x workers loads: bounded memory, no pipeline bubbles.
            for entry in itertools.islice(entries, 4 * self.workers):
                in_flight.append(pool.submit(self._load, entry, transform))
            while in_flight:
                result = in_flight.popleft().result()
                if (entry := next(entries, None)) is not None:
                    in_flight.append(pool.submit(self._load, entry, transform))
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
