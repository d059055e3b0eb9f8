"""Nothing reused is trusted: what a stage hands on is checked against the sha256 recorded
when it was published.

Every stage output lists its files with their sha256 in ``result.json``
(:attr:`StageResult.files`); a source version lists its shards with theirs in its
manifest, and the manifest seals its own fields (:mod:`xlearner.data.manifest`). Before
anything published is reused (a stage skipped, a folder fetched, a backbone loaded, a
source version re-ingested), its bytes are compared with those hashes:

- local store: the file is re-hashed. Its hash is cached by (path, inode, size,
  mtime_ns): within one process for every file, and across processes for files of 64 MiB
  or more, where re-hashing is slow (shards, large backbones: ``sha256-by-stat.jsonl`` in
  the cache folder, ``XLEARNER_CACHE``). What that trusts: a file rewritten with the same
  size and its mtime set back (``touch -r``) on the same inode is taken as unchanged.
- S3: a HEAD request. An object whose ``x-amz-meta-sha256`` equals the recorded hash is
  trusted: the store writes that metadata from the bytes it uploaded, S3 checks uploads
  (Content-MD5/checksums) and an object cannot change in place: any overwrite replaces
  it and its metadata. Any other object (no metadata, another hash) is downloaded and
  re-hashed, to report its actual hash. Downloaded copies (:func:`verify_copy`) are
  always re-hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from xlearner.contract import RESULT_FILE, StageResult
from xlearner.data.manifest import seal_problems
from xlearner.store import (
    CHUNK,
    ArtifactStore,
    LocalStore,
    S3Store,
    StoreError,
    default_cache_dir,
    join,
    open_store,
    resolve,
    sha256_bytes,
    sha256_file,
)

log = logging.getLogger(__name__)

RECORD_DEPTH = 3  # how many folders up a fetched folder looks for its stage's result.json

# hashes of large local files, kept across processes (see the module docstring)
PERSISTED_FROM_BYTES = 64 * 2**20
HASH_CACHE = "sha256-by-stat.jsonl"

Stat = tuple[str, int, int, int]  # resolved path, inode, size, mtime_ns
_cache: dict[Stat, str] = {}
_persisted: dict[Stat, str] | None = None  # loaded on first use
_cache_lock = threading.Lock()


@dataclass(frozen=True)
class Damage:
    """A published file that is not what was recorded: missing (``actual`` None) or changed."""

    uri: str
    expected: str
    actual: str | None

    def __str__(self) -> str:
        if self.actual is None:
            return f"{self.uri} is missing (recorded sha256 {self.expected})"
        return f"{self.uri} has sha256 {self.actual}, recorded {self.expected}"


class IntegrityError(ValueError):
    """Published files that do not match their recorded sha256, each named."""

    def __init__(self, what: str, damages: list[Damage | str], fix: str):
        self.what, self.damages, self.fix = what, damages, fix
        listed = "; ".join(map(str, damages))
        super().__init__(f"{what} is damaged: {listed}; {fix}")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a local file, cached by (path, inode, size, mtime_ns): in this
    process, and for files of :data:`PERSISTED_FROM_BYTES` or more in the cache folder."""
    stat = os.stat(path)
    key: Stat = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    large = stat.st_size >= PERSISTED_FROM_BYTES
    with _cache_lock:
        known = _cache.get(key) or (_persisted_hashes().get(key) if large else None)
    if known:
        return known
    digest = sha256_file(path)
    with _cache_lock:
        _cache[key] = digest
        if large:
            _persist(key, digest)
    return digest


def _persisted_hashes() -> dict[Stat, str]:
    """The hash cache file's entries (a line per file hashed; a damaged line is skipped)."""
    global _persisted
    if _persisted is None:
        _persisted = {}
        path = default_cache_dir() / HASH_CACHE
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in lines:
            with contextlib.suppress(ValueError, TypeError):
                *stat, digest = json.loads(line)
                _persisted[(str(stat[0]), int(stat[1]), int(stat[2]), int(stat[3]))] = digest
    return _persisted


def _persist(key: Stat, digest: str) -> None:
    """Append one entry (one short ``O_APPEND`` write: concurrent stages do not mix lines)."""
    _persisted_hashes()[key] = digest
    path = default_cache_dir() / HASH_CACHE
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps([*key, digest]) + "\n")


def stored_sha256(store: ArtifactStore, key: str, expected: str) -> str | None:
    """The sha256 of the published ``key`` (None when it is missing), as the module says."""
    if isinstance(store, LocalStore):
        path = store.root / key
        return file_sha256(path) if path.is_file() else None
    if isinstance(store, S3Store):
        if not store.exists(key):  # the store's own errors for anything but a 404
            return None
        full = join(store.prefix, key)
        try:
            head = store.client.head_object(Bucket=store.bucket, Key=full)
            if head.get("Metadata", {}).get("sha256") == expected:
                return expected
            digest = hashlib.sha256()
            body = store.client.get_object(Bucket=store.bucket, Key=full)["Body"]
            while block := body.read(CHUNK):
                digest.update(block)
        except Exception as err:  # noqa: BLE001 - any failure to read it is the store's
            raise StoreError(f"{store.uri(key)}: {type(err).__name__}: {err}") from None
        return digest.hexdigest()
    if not store.exists(key):
        return None
    return sha256_bytes(store.read_bytes(key))


def damaged(store: ArtifactStore, files: dict[str, str]) -> list[Damage]:
    """The files of ``files`` (key -> recorded sha256) that are missing or changed."""
    out = []
    for key, expected in sorted(files.items()):
        actual = stored_sha256(store, key, expected)
        if actual != expected:
            out.append(Damage(store.uri(key), expected, actual))
    return out


# stage outputs -------------------------------------------------------------------------
REPAIR = "xlearner run re-runs the stage that published it (with --no-repair it fails instead)"


def verified_result(store: ArtifactStore) -> StageResult | None:
    """The published result of the stage output ``store`` when every file it lists (and
    every source version it names) is intact; None when there is none; else an
    :class:`IntegrityError` naming each damaged file."""
    if not store.exists(RESULT_FILE):
        return None
    try:
        result = StageResult.model_validate(store.read_json(RESULT_FILE))
    except (StoreError, ValueError) as err:
        raise IntegrityError(store.uri(RESULT_FILE), [str(err)], REPAIR) from None
    problems: list[Damage | str] = [*damaged(store, result.files)]
    for uri in (getattr(result, "manifests", None) or {}).values():
        problems += source_damage(*resolve_manifest(uri, store))
    if problems:
        raise IntegrityError(f"stage output {store.root_uri}", problems, REPAIR)
    return result


def set_aside(store: ArtifactStore) -> str:
    """Move a damaged output's ``result.json`` aside (kept for inspection), so the stage
    counts as not done and runs again; returns the key it was moved to."""
    aside = f"{RESULT_FILE}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    with contextlib.suppress(StoreError):  # an unreadable result is dropped, not kept
        store.write_bytes(aside, store.read_bytes(RESULT_FILE))
    store.delete(RESULT_FILE)
    log.warning(f"{store.uri(RESULT_FILE)} moved aside to {aside}: the stage runs again")
    return aside


# source versions -----------------------------------------------------------------------
def resolve_manifest(uri: str, near: ArtifactStore) -> tuple[ArtifactStore, str]:
    endpoint = near.endpoint_url if isinstance(near, S3Store) else None
    return resolve(uri, endpoint)


def source_damage(store: ArtifactStore, key: str) -> list[Damage | str]:
    """What is wrong with the published source version whose manifest is ``key``: the
    manifest (unreadable, edited after ingest) and its shards (missing, changed)."""
    uri = store.uri(key)
    if not store.exists(key):
        return [f"manifest {uri} is missing"]
    try:
        manifest = store.read_json(key)
    except StoreError as err:
        return [f"manifest {err}"]
    if not isinstance(manifest, dict):
        return [f"manifest {uri} is not a JSON object"]
    problems: list[Damage | str] = [f"manifest {uri}: {p}" for p in seal_problems(manifest, key)]
    if problems:
        return problems
    folder = key.rpartition("/")[0]
    try:
        shards = {
            join(folder, shard["file"]): shard["sha256"]
            for split in manifest["splits"].values()
            for shard in split["shards"]
        }
    except (AttributeError, KeyError, TypeError):
        return [f"manifest {uri}: field 'splits' does not list shards as ingest writes them"]
    return [*damaged(store, shards)]


# fetched and local folders -------------------------------------------------------------
def recorded_files(uri: str, endpoint_url: str | None = None) -> tuple[str, dict[str, str]]:
    """The sha256 recorded for the files below the folder ``uri`` by the stage that
    published it (its ``result.json``, up to :data:`RECORD_DEPTH` folders up), by their
    path relative to ``uri``; ``("", {})`` when no stage output holds it."""
    parent, below = uri.rstrip("/"), ""
    for _ in range(RECORD_DEPTH + 1):
        if not parent or parent.endswith(":/"):
            break
        store = open_store(parent, endpoint_url)
        if store.exists(RESULT_FILE):
            files = StageResult.model_validate(store.read_json(RESULT_FILE)).files
            prefix = f"{below}/" if below else ""
            return store.uri(RESULT_FILE), {
                k[len(prefix) :]: v for k, v in files.items() if k.startswith(prefix)
            }
        parent, _, name = parent.rpartition("/")
        below = join(name, below)
    return "", {}


def verify_copy(folder: Path, record: str, files: dict[str, str], uri: str) -> None:
    """Check the local ``folder`` (a copy of ``uri``) against ``files`` recorded in ``record``."""
    problems = []
    for rel, expected in sorted(files.items()):
        path = folder / rel
        actual = file_sha256(path) if path.is_file() else None
        if actual != expected:
            problems.append(Damage(f"{uri}/{rel}", expected, actual))
    if problems:
        raise IntegrityError(
            uri,
            problems,
            f"the hashes recorded in {record} do not match; rerun xlearner run (it re-runs "
            "the stage that published it)",
        )


def verify_folder(folder: str | Path) -> None:
    """Check a local folder published by a stage against its recorded hashes (a folder no
    stage output holds, e.g. a user's own backbone, has none and is taken as it is)."""
    path = Path(folder).resolve()
    record, files = recorded_files(str(path))
    if files:
        verify_copy(path, record, files, str(path))
