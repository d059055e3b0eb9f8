"""Classification from a list file (``csv_cls``), as iNat and Places ship their labels.

```
root/
  train/.../a.jpg        images anywhere below the root
  val/.../b.jpg
  train.csv, val.csv     `file,label` each: the split is theirs
  labels.csv             or one list, split by val_fraction
  classes.txt            optional: pins the class list and its order
```

``file`` is relative to the source root, ``label`` a class name. The classes are the
sorted labels, or the lines of ``classes.txt`` (then a label not in it is a problem).
Every JPEG or PNG below the root must be listed; other files are not looked at.

:func:`split_folders` detects the ImageNet-style split of the class-folder format
(``cls``): ``train/<class>/...`` and ``val/<class>/...``.
"""

from __future__ import annotations

import csv
import io

from xlearner.data.source_files import Problem, SourceFiles, safe_relpath
from xlearner.data.source_index import Entry, LayoutError, SourceIndex, read_classes, read_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HEADER = ["file", "label"]
SPLITS = ("train", "val")


def _lists(listing: list[str]) -> list[tuple[str, str | None]]:
    """``(list file, split)``: train.csv + val.csv, or labels.csv (split by val_fraction)."""
    split_lists = [f"{s}.csv" for s in SPLITS if f"{s}.csv" in listing]
    if split_lists and len(split_lists) != len(SPLITS):
        missing = next(f"{s}.csv" for s in SPLITS if f"{s}.csv" not in listing)
        raise LayoutError(
            split_lists[0],
            f"without {missing}: give both train.csv and val.csv (the split is theirs), "
            "or one labels.csv (split by val_fraction)",
        )
    if split_lists:
        if "labels.csv" in listing:
            raise LayoutError("labels.csv", "beside train.csv and val.csv: keep one of the two")
        return [("train.csv", "train"), ("val.csv", "val")]
    if "labels.csv" in listing:
        return [("labels.csv", None)]
    raise LayoutError(
        "labels.csv",
        "missing; a csv_cls source needs labels.csv (or train.csv and val.csv) "
        "with the header `file,label`",
    )


def _rows(files: SourceFiles, rel: str) -> list[tuple[int, list[str]]]:
    rows = list(csv.reader(io.StringIO(read_text(files, rel))))
    if not rows or [c.strip() for c in rows[0]] != HEADER:
        raise LayoutError(rel, "the first line must be the header `file,label`")
    return [(n, row) for n, row in enumerate(rows[1:], start=2) if row and "".join(row).strip()]


def index_csv_cls(files: SourceFiles, listing: list[str]) -> SourceIndex:
    present = set(listing)
    problems: list[Problem] = []
    parsed: list[tuple[str, str, str | None, str]] = []  # file, label name, split, list file
    seen: dict[str, str] = {}
    for list_file, split in _lists(listing):
        for line_no, row in _rows(files, list_file):
            where = f"{list_file} line {line_no}"
            if len(row) != 2:
                problems.append(
                    Problem(
                        list_file,
                        f"line {line_no}: expected 2 columns (file,label), got {len(row)}",
                    )
                )
                continue
            name, label = row[0].strip(), row[1].strip()
            file = safe_relpath(name)
            if file is None:
                problems.append(Problem(name, f"{where}: path escapes the source root or is empty"))
            elif file in seen:
                problems.append(Problem(file, f"{where}: already listed in {seen[file]}"))
            elif not label:
                problems.append(Problem(file, f"{where}: empty label; every image needs a class"))
            elif file not in present:
                seen[file] = where
                problems.append(Problem(file, f"listed in {where} but missing"))
            else:
                seen[file] = where
                parsed.append((file, label, split, list_file))
    pinned = read_classes(files) if "classes.txt" in listing else None
    classes = pinned if pinned is not None else sorted({label for _, label, _, _ in parsed})
    index = {name: i for i, name in enumerate(classes)}
    entries = []
    for file, label, split, list_file in parsed:
        if label not in index:
            problems.append(
                Problem(file, f"{list_file}: unknown label {label!r}; classes.txt lists {classes}")
            )
            continue
        entries.append(Entry(file, {"label": index[label]}, split=split))
    lists = ", ".join(f for f, _ in _lists(listing))
    problems += [
        Problem(f, f"is not listed in {lists}; add a row or remove the file")
        for f in listing
        if f.lower().endswith(IMAGE_SUFFIXES) and f not in seen
    ]
    return SourceIndex(classes, entries, problems)


def split_folders(listing: list[str]) -> bool:
    """True when a class-folder source is split ImageNet-style: ``train/`` and ``val/``
    folders (and ``classes.txt``) are all its root holds."""
    top = {rel.split("/", 1)[0] for rel in listing if rel != "classes.txt"}
    return top == set(SPLITS) and all("/" in rel for rel in listing if rel != "classes.txt")
