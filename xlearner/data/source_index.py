"""The index of a source: the entries its folder listing and metadata files name.

The pieces every format's indexer shares: :class:`Entry` (a record before its image is
read), :class:`SourceIndex`, :class:`LayoutError` for a layout nothing can be read
from, and the readers of the metadata files (classes.txt, the image lists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xlearner.data.source_files import Problem, SourceFiles, safe_relpath
from xlearner.store import StoreError


@dataclass
class Entry:
    """A record as the index knows it, before its image was read."""

    file: str
    label: dict[str, Any] = field(default_factory=dict)
    mask_file: str | None = None
    declared_size: tuple[float, float] | None = None  # COCO width/height (may be floats)
    label_file: str | None = None  # a per-image annotation file (VOC's Annotations/<id>.xml)
    split: str | None = None  # "train" / "val" when the layout fixes the split, else None
    errors: list[str] = field(default_factory=list)  # label problems found by the index


@dataclass
class SourceIndex:
    classes: list[str]
    entries: list[Entry]
    problems: list[Problem]


class LayoutError(Exception):
    """A structural problem: nothing can be read until it is fixed."""

    def __init__(self, file: str, message: str):
        self.problem = Problem(file, message)


def read_text(files: SourceFiles, rel: str) -> str:
    try:
        return files.read(rel).decode("utf-8-sig")
    except (OSError, StoreError) as err:
        raise LayoutError(rel, f"cannot be read: {err}") from None
    except UnicodeDecodeError:
        raise LayoutError(rel, "is not UTF-8 text") from None


def read_classes(files: SourceFiles, rel: str = "classes.txt") -> list[str]:
    names = [line.strip() for line in read_text(files, rel).splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LayoutError(rel, f"duplicate class names {duplicates}; each class once, one per line")
    if not names:
        raise LayoutError(rel, "lists no classes; write one class name per line")
    return names


def images_in(listing: list[str], folder: str) -> list[str]:
    return [f for f in listing if f.startswith(folder + "/")]


def listed_image(name: Any, seen: set[str], where: str) -> tuple[str | None, Problem | None]:
    """``images/<name>`` for a name in a metadata file; rejects escapes and duplicates."""
    rel = safe_relpath(str(name)) if isinstance(name, str) else None
    if rel is None:
        return None, Problem(f"images/{name}", f"{where}: path escapes the source root or is empty")
    file = f"images/{rel}"
    if file in seen:
        return None, Problem(file, f"{where}: listed more than once (duplicate file name)")
    seen.add(file)
    return file, None


def unlisted(listing: list[str], listed: set[str], metadata: str) -> list[Problem]:
    return [
        Problem(f, f"is not listed in {metadata}; add it (labels may be empty) or remove the file")
        for f in images_in(listing, "images")
        if f not in listed
    ]
