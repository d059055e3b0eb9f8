"""A re-ingest decodes only what the latest published version did not validate.

The files the latest version lists in ``files.sha256`` (checked against its sealed
manifest) passed the same image checks, so their bytes are not decoded again; the
result is the same as an ingest that checks everything.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from xlearner.config import SourceConfig
from xlearner.data import images
from xlearner.data.ingest import ingest_source
from xlearner.data.manifest import seal
from xlearner.data.source_files import SourceError
from xlearner.store import open_store
from xlearner.store_keys import manifest_key, source_prefix


@pytest.fixture
def decodes(monkeypatch) -> list[bytes]:
    """The images fully decoded (validated) from now on."""
    seen: list[bytes] = []
    for name in ("_check_jpeg", "_check_png"):
        real = getattr(images, name)

        def counting(data, real=real):
            seen.append(data)
            return real(data)

        monkeypatch.setattr(images, name, counting)
    return seen


def ingest(store, root):
    source = SourceConfig(name="src", format="cls", uri=str(root))
    return ingest_source(source, store, shard_bytes=60_000, log=lambda _: None)


def comparable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("created_at", "seal")}


def add_image(root, name: str, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "circle" / name)


def test_a_reingest_decodes_only_the_new_files(synth_data, tmp_path, decodes):
    root = tmp_path / "src"
    shutil.copytree(synth_data.paths["shapes_cls"], root)
    store = open_store(str(tmp_path / "store"))
    first = ingest(store, root)
    images_count = first["splits"]["train"]["records"] + first["splits"]["val"]["records"]
    assert len(decodes) == images_count and first["image_checks"] == images.IMAGE_CHECKS
    add_image(root, "new.png", 0)
    decodes.clear()
    second = ingest(store, root)
    assert len(decodes) == 1  # only the new file
    fresh_root = tmp_path / "fresh"
    fresh = ingest(open_store(str(fresh_root)), root)  # checks everything
    assert comparable(second) == comparable(fresh) and second["version"] != first["version"]
    for split in ("train", "val"):
        for shard in second["splits"][split]["shards"]:
            key = f"{source_prefix('src', second['version'])}/{shard['file']}"
            assert (tmp_path / "store" / key).read_bytes() == (fresh_root / key).read_bytes()


def test_changed_bytes_under_a_validated_name_are_checked_again(synth_data, tmp_path, decodes):
    root = tmp_path / "src"
    shutil.copytree(synth_data.paths["shapes_cls"], root)
    store = open_store(str(tmp_path / "store"))
    ingest(store, root)
    victim = sorted((root / "circle").iterdir())[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated: its sha256 is no longer listed
    decodes.clear()
    with pytest.raises(SourceError, match=f"circle/{victim.name}: corrupt or truncated"):
        ingest(store, root)
    assert len(decodes) == 1


def test_a_version_validated_by_older_checks_is_not_trusted(synth_data, tmp_path, decodes):
    root = tmp_path / "src"
    shutil.copytree(synth_data.paths["shapes_cls"], root)
    store = open_store(str(tmp_path / "store"))
    first = ingest(store, root)
    key = manifest_key("src", first["version"])
    older = {k: v for k, v in first.items() if k not in ("image_checks", "seal")}
    store.write_json(key, seal(older))  # as an ingest before IMAGE_CHECKS wrote it
    add_image(root, "new.png", 1)
    decodes.clear()
    second = ingest(store, root)
    assert len(decodes) == second["splits"]["train"]["records"] + second["splits"]["val"]["records"]
