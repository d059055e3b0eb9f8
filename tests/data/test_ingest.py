"""Ingest: manifest, shards with the original bytes, versioning, split stability, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import pytest

from xlearner.config import DownstreamConfig, SourceConfig
from xlearner.data.ingest import ingest_source, split_of
from xlearner.data.source_files import SourceError
from xlearner.lease import LEASE_SUFFIX
from xlearner.store import TMP_MARK, StoreError, join, sha256_file
from xlearner.store_keys import manifest_key

SMALL_SHARDS = 60_000  # several shards per split for the synthetic sources


def ingest(store, uri, fmt="cls", name="src", **kw):
    source_kw = {k: kw.pop(k) for k in ("val_fraction", "split_seed", "skip_invalid") if k in kw}
    source = SourceConfig(name=name, format=fmt, uri=str(uri), **source_kw)
    logs: list[str] = []
    manifest = ingest_source(source, store, log=logs.append, **kw)
    return manifest, logs


def shard_members(store, manifest, split, tmp_path):
    """{json record: {suffix: bytes}} over all shards of a split."""
    samples = {}
    for shard in manifest["splits"][split]["shards"]:
        local = store.local_copy(
            join("sources", manifest["name"], manifest["version"], shard["file"]), tmp_path
        )
        with tarfile.open(local) as tar:
            members = {}
            for m in tar.getmembers():
                key, _, suffix = m.name.partition(".")
                members.setdefault(key, {})[suffix] = tar.extractfile(m).read()
        for parts in members.values():
            samples[json.loads(parts.pop("json"))["file"]] = parts
    return samples


def test_ingest_publishes_manifest_and_shards(store, synth_data, tmp_path):
    root = synth_data.paths["shapes_cls"]
    manifest, logs = ingest(store, root, shard_bytes=SMALL_SHARDS)
    version = manifest["version"]
    assert len(version) == 16 and manifest["content_hash"].startswith(version)
    assert manifest["classes"] == ["circle", "square", "triangle", "cross"]
    prefix = f"sources/src/{version}"
    assert store.read_json(manifest_key("src", version)) == manifest
    assert store.read_json("sources/src/latest.json") == {
        "version": version,
        "manifest": f"{prefix}/manifest.json",
    }
    # a local lease stays as an empty file beside the version (xlearner.lease); S3's is deleted
    listed = {k for k in store.list("sources/src") if k != f"{prefix}{LEASE_SUFFIX}"}
    expected = {
        f"{prefix}/{s['file']}"
        for split in ("train", "val")
        for s in manifest["splits"][split]["shards"]
    }
    hashes = f"{prefix}/{manifest['file_hashes']['file']}"  # the source files' sha256
    assert listed == expected | {f"{prefix}/manifest.json", "sources/src/latest.json", hashes}
    assert sha256_file(store.local_copy(hashes, tmp_path)) == manifest["file_hashes"]["sha256"]
    assert len(manifest["splits"]["train"]["shards"]) >= 2
    total = 0
    for split in ("train", "val"):
        info = manifest["splits"][split]
        for shard in info["shards"]:
            local = store.local_copy(f"{prefix}/{shard['file']}", tmp_path)
            assert sha256_file(local) == shard["sha256"] and local.stat().st_size == shard["bytes"]
        samples = shard_members(store, manifest, split, tmp_path)
        assert len(samples) == info["records"] == sum(s["records"] for s in info["shards"])
        for file, parts in samples.items():
            assert split_of(file, 0.2, 0) == split
            (suffix,) = parts
            assert parts[suffix] == (root / file).read_bytes()  # the original encoded bytes
            assert suffix == ("jpg" if file.endswith(".jpg") else "png")
        counts = [0] * 4
        for file in samples:
            counts[manifest["classes"].index(file.split("/")[0])] += 1
        assert info["class_counts"] == counts
        total += info["records"]
    assert total == len(list(root.rglob("*.*"))) - 1  # all images (not classes.txt)
    assert 0.1 < manifest["splits"]["val"]["records"] / total < 0.3
    assert any("images/s" in line and "ETA" in line for line in logs)


def test_reingest_is_a_noop_and_version_follows_content(store, copy_source):
    root = copy_source("shapes_cls")
    first, _ = ingest(store, root)
    again, logs = ingest(store, root)
    assert again == first and any("already published" in line for line in logs)
    # A different split is a different version.
    other, _ = ingest(store, root, split_seed=1)
    assert other["version"] != first["version"]
    # Adding an image: new version, and no existing image changes split.
    (root / "circle" / "new.png").write_bytes(next((root / "square").glob("*.png")).read_bytes())
    grown, _ = ingest(store, root)
    assert grown["version"] != first["version"]
    assert grown["splits"]["train"]["records"] + grown["splits"]["val"]["records"] == (
        first["splits"]["train"]["records"] + first["splits"]["val"]["records"] + 1
    )
    assert store.read_json("sources/src/latest.json")["version"] == grown["version"]


def test_split_is_per_file_and_stable():
    files = [f"images/{i:05d}.jpg" for i in range(2000)]
    splits = [split_of(f, 0.25, 3) for f in files]
    assert 0.22 < splits.count("val") / len(files) < 0.28
    assert splits == [split_of(f, 0.25, 3) for f in files]
    assert splits != [split_of(f, 0.25, 4) for f in files]
    assert all(split_of(f, 0.0, 3) == "train" for f in files)


@pytest.mark.parametrize(
    "name, fmt", [("shapes_det", "det"), ("shapes_seg", "seg"), ("shapes_attr", "multilabel")]
)
def test_ingest_label_records(name, fmt, synth_data, tmp_path):
    from xlearner.store import open_store

    store = open_store(str(tmp_path / "store"))
    root = synth_data.paths[name]
    manifest, _ = ingest(store, root, fmt=fmt)
    samples = shard_members(store, manifest, "train", tmp_path)
    file, parts = next(iter(samples.items()))
    if fmt == "seg":
        stem = os.path.splitext(os.path.basename(file))[0]
        assert parts["mask.png"] == (root / "masks" / f"{stem}.png").read_bytes()
        assert manifest["classes"][0] == "background"
    if fmt == "det":
        counted = sum(
            manifest["splits"][s]["class_counts"][c] for s in ("train", "val") for c in range(4)
        )
        annotations = json.loads((root / "annotations.json").read_text())["annotations"]
        assert counted == len(annotations)


def test_downstream_config_is_accepted(store, synth_data):
    source = DownstreamConfig(**synth_data.source("down_cls_b"))
    manifest = ingest_source(source, store, log=lambda _: None)
    assert manifest["classes"] == ["one", "two", "three"]
    assert manifest["split"] == {"val_fraction": 0.3, "seed": 0}


def test_skip_invalid_records_skipped_files(store, copy_source):
    root = copy_source("shapes_cls")
    (root / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(SourceError, match="circle/broken.jpg"):
        ingest(store, root)
    assert store.list("sources") == []  # nothing published
    manifest, _ = ingest(store, root, skip_invalid=True)
    assert [s["file"] for s in manifest["skipped"]] == ["circle/broken.jpg"]


def test_image_size_downscales_big_images(tmp_path, synth_data):
    from data_helpers import write_coco, write_image

    from xlearner.store import open_store

    root = tmp_path / "big"
    write_image(root / "images" / "a.jpg", size=(400, 200))
    write_image(root / "images" / "b.png", size=(60, 50))
    write_coco(
        root,
        [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.png"}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 50, 200, 100]}],
        [{"id": 1, "name": "thing"}],
    )
    store = open_store(str(tmp_path / "store"))
    manifest, _ = ingest(store, root, fmt="det", image_size=32, val_fraction=0.0)
    samples = shard_members(store, manifest, "train", tmp_path)
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(samples["images/a.jpg"]["jpg"])).size == (64, 32)
    assert (
        samples["images/b.png"]["png"] == (root / "images" / "b.png").read_bytes()
    )  # small: untouched
    plain, _ = ingest(store, root, fmt="det", val_fraction=0.0)
    assert plain["version"] != manifest["version"]


def test_max_side_re_encodes_big_images_and_scales_their_targets(tmp_path):
    from io import BytesIO

    import numpy as np
    from data_helpers import write_coco, write_image, write_mask
    from PIL import Image

    from xlearner.config import IngestConfig
    from xlearner.store import open_store

    root = tmp_path / "det"
    write_image(root / "images" / "a.jpg", size=(400, 200))
    write_image(root / "images" / "b.png", size=(300, 600))
    write_image(root / "images" / "c.png", size=(60, 50))
    write_coco(
        root,
        [{"id": i, "file_name": f} for i, f in enumerate(["a.jpg", "b.png", "c.png"], 1)],
        [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 50, 200, 100]},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [30, 60, 90, 120]},
        ],
        [{"id": 1, "name": "thing"}],
    )
    store = open_store(str(tmp_path / "store"))
    small, _ = ingest(store, root, fmt="det", val_fraction=0.0, options=IngestConfig(max_side=100))
    assert small["max_side"] == 100
    samples = shard_members(store, small, "train", tmp_path)
    records = {}
    for shard in small["splits"]["train"]["shards"]:
        local = store.local_copy(f"sources/src/{small['version']}/{shard['file']}", tmp_path)
        with tarfile.open(local) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    record = json.loads(tar.extractfile(m).read())
                    records[record["file"]] = record
    a = Image.open(BytesIO(samples["images/a.jpg"]["jpg"]))
    b = Image.open(BytesIO(samples["images/b.png"]["png"]))
    assert (a.format, a.size, b.format, b.size) == ("JPEG", (100, 50), "PNG", (50, 100))
    assert max(a.size) <= 100 and max(b.size) <= 100
    assert (records["images/a.jpg"]["width"], records["images/a.jpg"]["height"]) == (100, 50)
    assert records["images/a.jpg"]["boxes"] == [[25.0, 12.5, 75.0, 37.5]]  # x 1/4 with it
    assert records["images/b.png"]["boxes"] == [[5.0, 10.0, 20.0, 30.0]]  # x 1/6
    assert samples["images/c.png"]["png"] == (root / "images" / "c.png").read_bytes()
    plain, _ = ingest(store, root, fmt="det", val_fraction=0.0)
    assert plain["max_side"] is None and plain["version"] != small["version"]

    seg = tmp_path / "seg"
    write_image(seg / "images" / "m.jpg", size=(400, 200))
    mask = np.zeros((200, 400), dtype=np.uint8)
    mask[40:120, 200:360] = 1
    write_mask(seg / "masks" / "m.png", mask)
    (seg / "classes.txt").write_text("background\nthing\n")
    manifest, _ = ingest(
        store, seg, fmt="seg", name="seg", val_fraction=0.0, options=IngestConfig(max_side=100)
    )
    sample = shard_members(store, manifest, "train", tmp_path)["images/m.jpg"]
    small_mask = np.asarray(Image.open(BytesIO(sample["mask.png"])))
    assert small_mask.shape == (50, 100) and set(np.unique(small_mask)) == {0, 1}
    assert small_mask[10:30, 50:90].all() and not small_mask[:10].any()  # scaled with it


def test_failed_upload_leaves_nothing_published_and_rerun_completes(store, synth_data, monkeypatch):
    real_publish = store.publish_file
    calls = []

    def flaky(key, path, sha256):
        calls.append(key)
        if len(calls) > 1:
            raise StoreError(f"{store.uri(key)}: injected network failure")
        return real_publish(key, path, sha256)

    monkeypatch.setattr(store, "publish_file", flaky)
    with pytest.raises(StoreError, match="injected"):
        ingest(store, synth_data.paths["shapes_cls"], shard_bytes=SMALL_SHARDS)
    assert len(calls) == 2
    assert not [k for k in store.list("sources") if k.endswith(".json")]  # no manifest, no latest
    monkeypatch.setattr(store, "publish_file", real_publish)
    manifest, _ = ingest(store, synth_data.paths["shapes_cls"], shard_bytes=SMALL_SHARDS)
    assert store.exists(manifest_key("src", manifest["version"]))


CHILD = """
import sys, time
import xlearner.store as st
from xlearner.config import SourceConfig
from xlearner.data.ingest import ingest_source

store = st.open_store(sys.argv[1])
real_publish = store.publish_file
calls = []
def slow_publish(key, path, sha256):  # publishes a shard: hang in the second one
    calls.append(key)
    if len(calls) == 2:
        print("PUBLISHING", flush=True)
        time.sleep(120)
    return real_publish(key, path, sha256)
store.publish_file = slow_publish
source = SourceConfig(name="src", format="cls", uri=sys.argv[2])
ingest_source(source, store, shard_bytes=int(sys.argv[3]))
print("FINISHED", flush=True)
"""


def test_sigkill_mid_ingest_leaves_nothing_visible(store, synth_data):
    root = synth_data.paths["shapes_cls"]
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(CHILD),
            store.root_uri,
            str(root),
            str(SMALL_SHARDS),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "PUBLISHING", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    keys = store.list("")
    assert keys and not [k for k in keys if k.endswith(".json")]
    assert not [k for k in keys if TMP_MARK in k or k.startswith(".tmp/")]
    if hasattr(store, "root"):  # local: the killed publish left its temporary file, unlisted
        assert any(TMP_MARK in p.name for p in store.root.rglob("*"))
    manifest, _ = ingest(store, root, shard_bytes=SMALL_SHARDS)
    published = set(store.list(""))
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            assert f"sources/src/{manifest['version']}/{shard['file']}" in published
