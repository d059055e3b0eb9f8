"""Downstream sets stay held out: none shares an image with a training source.

Checked twice: by folder when the config loads (:func:`xlearner.config.data.check_held_out`)
and, after ingest, by content (:func:`check_held_out_content`): the same file copied or
linked into two folders has the same sha256 in both versions' ``files.sha256`` lists
(:data:`xlearner.data.ingest.FILE_HASHES`, whose own sha256 the manifest records).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from xlearner.config import ConfigError
from xlearner.store import StoreError, resolve, sha256_bytes

logger = logging.getLogger(__name__)

MAX_LISTED = 5  # shared files named in the error


def file_hashes(manifest_uri: str, endpoint_url: str | None = None) -> dict[str, str] | None:
    """``{sha256: file}`` of the source files of a published version; None for a version
    ingested before the lists were written. StoreError if the list cannot be read or does
    not match the sha256 its manifest records."""
    store, key = resolve(manifest_uri, endpoint_url)
    manifest = store.read_json(key)
    entry = manifest.get("file_hashes") if isinstance(manifest, dict) else None
    if not isinstance(entry, dict):
        return None
    data = store.read_bytes(str(entry.get("file")))  # beside the manifest
    uri = store.uri(str(entry.get("file")))
    if sha256_bytes(data) != entry.get("sha256"):
        raise StoreError(
            f"{uri} does not match the sha256 its manifest {manifest_uri} records; "
            "re-ingest the source"
        )
    hashes: dict[str, str] = {}
    for line in data.decode().splitlines():
        digest, _, file = line.partition("  ")
        hashes.setdefault(digest, file)
    return hashes


def check_held_out_content(
    training: Mapping[str, str],
    downstream: Mapping[str, str],
    endpoint_url: str | None = None,
    log: Callable[[str], None] = logger.warning,
) -> None:
    """ConfigError naming the first downstream set that shares files with a training source
    (both names, how many files, a few of them). ``training``/``downstream``: ``{source
    name: manifest URI}``. Versions without a hash list are logged and not compared."""
    hashes = {
        name: file_hashes(uri, endpoint_url) for name, uri in {**training, **downstream}.items()
    }
    unlisted = sorted(name for name, h in hashes.items() if h is None)
    if unlisted:
        log(
            f"sources {unlisted}: their versions list no file hashes (ingested by an older "
            "xlearner); downstream sets are checked against them by folder only"
        )
    for held_out in downstream:
        for source in training:
            if hashes[held_out] is None or hashes[source] is None:
                continue
            shared = sorted(hashes[held_out].keys() & hashes[source].keys())
            if not shared:
                continue
            pairs = [f"{hashes[held_out][d]} = {hashes[source][d]}" for d in shared[:MAX_LISTED]]
            more = f" and {len(shared) - MAX_LISTED} more" if len(shared) > MAX_LISTED else ""
            raise ConfigError(
                f"downstream {held_out!r} shares {len(shared)} file(s) with training source "
                f"{source!r} (same content): {'; '.join(pairs)}{more}. Transfer would be "
                f"evaluated on images the backbone trained on; remove them from one of the two"
            )
