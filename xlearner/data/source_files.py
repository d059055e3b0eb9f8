"""A source's files and the problems found in them.

:class:`SourceFiles` lists and reads the files below a source root, a local folder
(symlinks must stay inside it) or ``s3://bucket/prefix``. Every problem found in a
source is a :class:`Problem` naming the file; :class:`SourceError` raises them together.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from xlearner.store import is_s3, open_store

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


def dangling_link(path: str) -> str | None:
    """What is wrong with ``path`` if it is a symlink whose target does not exist."""
    if os.path.islink(path) and not os.path.exists(path):
        return (
            f"dangling symlink to {os.readlink(path)} (the target does not exist); "
            "restore the target or remove the link"
        )
    return None


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
                if problem := dangling_link(os.path.join(dirpath, name)):
                    problems.append(Problem(rel, problem))
                elif not self._inside(os.path.join(dirpath, name)):
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
