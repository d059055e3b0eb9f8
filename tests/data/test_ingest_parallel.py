"""Ingest's fast path: parallel validation with a deterministic result, tars written once.

The shards and the manifest must not depend on how many threads read the images, and a
shard is written once: as :mod:`tarfile` would write it, hashed on the way, and moved
into a local store instead of copied.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from xlearner.config import IngestConfig, SourceConfig
from xlearner.data.formats import Record
from xlearner.data.ingest import ShardWriter, ingest_source
from xlearner.store import open_store, sha256_file
from xlearner.store_keys import source_prefix

SMALL_SHARDS = 60_000  # several shards per split


def record(i: int, size: int, mask: bool) -> Record:
    data = bytes((i * 7 + k) % 251 for k in range(size))
    return Record(
        f"images/{i}.png",
        {"label": i % 3},
        data,
        "png",
        4,
        4,
        mask=b"mask" * (i + 1) if mask else None,
    )


def tarfile_shard(path: Path, records: list[tuple[Record, bytes]]) -> None:
    """The same samples packed with tarfile itself (the format the readers expect)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n, (rec, label_json) in enumerate(records):
            members = [(f"{n:09d}.{rec.image_format}", rec.data), (f"{n:09d}.json", label_json)]
            if rec.mask is not None:
                members.append((f"{n:09d}.mask.png", rec.mask))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))


def test_shard_writer_writes_tarfile_bytes_and_hashes_them(tmp_path):
    # sizes around the 512-byte blocks and a shard that ends on a 10240-byte record
    records = [
        (record(i, size, mask=i % 2 == 0), json.dumps({"i": i}).encode())
        for i, size in enumerate([1, 511, 512, 513, 10_000, 20_480, 3])
    ]
    writer = ShardWriter(tmp_path, "train", shard_bytes=10**9)
    for rec, label_json in records:
        writer.write(rec, label_json)
    (shard,) = writer.close()
    tarfile_shard(tmp_path / "expected.tar", records)
    written = (tmp_path / shard["file"]).read_bytes()
    assert written == (tmp_path / "expected.tar").read_bytes()
    assert shard["bytes"] == len(written) and shard["records"] == len(records)
    assert shard["sha256"] == sha256_file(tmp_path / shard["file"])


def test_shard_writer_cuts_shards_where_it_did_before(tmp_path):
    """Shards are cut on the estimated sample sizes (not the padded tar bytes), as before."""
    writer = ShardWriter(tmp_path, "val", shard_bytes=4 * 1024)
    for i in range(5):  # each sample: 1000 + 2 + 3 * 512 = 2538 estimated bytes
        writer.write(record(i, 1000, mask=False), b"{}")
    shards = writer.close()
    assert [s["records"] for s in shards] == [1, 1, 1, 1, 1]
    for shard in shards:
        with tarfile.open(tmp_path / shard["file"]) as tar:
            assert len(tar.getmembers()) == 2
        assert shard["sha256"] == sha256_file(tmp_path / shard["file"])


def published(store_root: Path, manifest: dict) -> dict[str, bytes]:
    folder = store_root / source_prefix(manifest["name"], manifest["version"])
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("max_side", [None, 48], ids=["as-is", "downscaled"])
def test_shards_and_manifest_do_not_depend_on_the_thread_count(synth_data, tmp_path, max_side):
    """One thread against eight (downscaling runs in those threads too): the same bytes."""
    source = SourceConfig(name="src", format="det", uri=str(synth_data.paths["shapes_det"]))
    results = {}
    for workers in (1, 8):
        root = tmp_path / f"store{workers}"
        manifest = ingest_source(
            source,
            open_store(str(root)),
            options=IngestConfig(max_side=max_side) if max_side else None,
            shard_bytes=SMALL_SHARDS,
            workers=workers,
            log=lambda _: None,
        )
        files = published(root, manifest)
        files.pop("manifest.json")
        manifest.pop("created_at")
        manifest.pop("seal")  # holds created_at's hash
        results[workers] = (manifest, files)
    (serial, serial_files), (parallel, parallel_files) = results[1], results[8]
    assert len(serial["splits"]["train"]["shards"]) >= 2
    assert serial == parallel
    assert serial_files == parallel_files  # every shard and files.sha256, byte for byte


def test_local_publish_moves_the_staged_file(tmp_path):
    """A shard staged by a local store is renamed into place: its bytes are written once."""
    store = open_store(str(tmp_path / "store"))
    with store.staging() as staging:
        assert staging.parent == store.root
        staged = staging / "train-000000.tar"
        staged.write_bytes(b"x" * 5000)
        inode = staged.stat().st_ino
        assert store.list("") == []  # the staging folder is never listed
        store.publish_file("sources/s/v/train-000000.tar", staged, sha256_file(staged))
        assert not staged.exists()
    target = store.root / "sources/s/v/train-000000.tar"
    assert target.stat().st_ino == inode and target.read_bytes() == b"x" * 5000
    assert store.list("") == ["sources/s/v/train-000000.tar"]
    assert os.listdir(store.root) == ["sources"]  # the staging folder is gone
