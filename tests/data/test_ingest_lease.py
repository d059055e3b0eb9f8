"""One writer per source version: ingest publishes a version under its lease.

The version is known only once every image was read, so the lease covers the publish:
a second ingest of the same version waits for the first, then finds it published, or
gives up naming the writer (the stage exits BUSY, which the flow retries later).
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import yaml

from stages import ingest as ingest_stage
from stages.main import LEASE_WAIT_ENV, exit_code
from xlearner.config import SourceConfig, load_config
from xlearner.contract import ExitCode
from xlearner.data import ingest
from xlearner.data.ingest import ingest_source
from xlearner.lease import LeaseHeld, output_lease
from xlearner.store import S3Store, open_store
from xlearner.store_keys import manifest_key, source_prefix


def source_of(synth_data) -> SourceConfig:
    return SourceConfig(name="src", format="cls", uri=str(synth_data.paths["shapes_cls"]))


def version_of(source: SourceConfig, tmp_path, **kw) -> str:
    """The version an ingest of ``source`` publishes (ingested into a scratch store)."""
    scratch = open_store(str(tmp_path / "scratch"))
    return ingest_source(source, scratch, log=lambda _: None, **kw)["version"]


def version_lease(store, version: str, **kw):
    """The lease another writer of that version would hold."""
    endpoint = store.endpoint_url if isinstance(store, S3Store) else None
    return output_lease(store.uri(source_prefix("src", version)), endpoint, **kw)


def test_an_ingest_of_a_version_being_written_gives_up_naming_the_writer(
    store, synth_data, tmp_path
):
    source = source_of(synth_data)
    version = version_of(source, tmp_path)
    with version_lease(store, version, run="run-that-writes"), pytest.raises(LeaseHeld) as caught:
        ingest_source(source, store, lease_wait_s=0.5, log=lambda _: None)
    message = str(caught.value)
    assert f"pid {os.getpid()}" in message and "run run-that-writes" in message
    assert exit_code(caught.value) == ExitCode.BUSY
    assert not store.exists(manifest_key("src", version))  # nothing published beside it
    assert not [k for k in store.list("sources") if k.endswith(".tar")]


def test_an_ingest_waits_for_the_writer_then_finds_the_version_published(
    store, synth_data, monkeypatch
):
    """Two ingests of one version: the second reaches the publish while the first is in
    it, waits for the lease, then returns what the first published."""
    source = source_of(synth_data)
    inside, reached, results, reached_at = threading.Event(), threading.Event(), {}, []
    real_lease, real_publish = ingest.output_lease, store.publish_file

    def lease(*args, **kw):
        if threading.current_thread() is threading.main_thread():
            assert inside.wait(120)  # the first holds the lease
            reached_at.append(time.monotonic())
            reached.set()  # the second ingest is about to take the lease
        return real_lease(*args, **kw)

    def slow_publish(key, path, sha256):  # the first ingest, inside its lease
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            assert reached.wait(120)
            time.sleep(1.0)
        return real_publish(key, path, sha256)

    monkeypatch.setattr(ingest, "output_lease", lease)
    monkeypatch.setattr(store, "publish_file", slow_publish)
    first = threading.Thread(
        target=lambda: results.update(first=ingest_source(source, store, log=lambda _: None))
    )
    first.start()
    try:
        logs: list[str] = []
        second = ingest_source(source, store, lease_wait_s=60, log=logs.append)
        waited = time.monotonic() - reached_at[0]
    finally:
        first.join()
    assert waited >= 1.0  # it waited for the writer (asleep 1 s in its publish) ...
    assert second == results["first"]  # ... and returned what the writer published
    assert any("already published" in line for line in logs), logs


def test_the_ingest_stage_exits_busy_naming_the_writer(synth_data, tmp_path, capsys, monkeypatch):
    source = source_of(synth_data)
    store_root = tmp_path / "store"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "sources": [{"name": "src", "format": "cls", "uri": source.uri}],
                "store": {"uri": str(store_root)},
            }
        )
    )
    version = version_of(source, tmp_path, image_size=load_config(str(config)).model.image_size)
    monkeypatch.setenv(LEASE_WAIT_ENV, "0.5")
    with version_lease(open_store(str(store_root)), version, run="run-that-writes"):
        code = ingest_stage.main(["--config", str(config)])
    out = capsys.readouterr().out
    assert code == ExitCode.BUSY, out
    assert f"is being written by pid {os.getpid()}" in out and "Traceback" not in out
    assert ingest_stage.main(["--config", str(config)]) == ExitCode.OK  # once it is free
    assert open_store(str(store_root)).exists(manifest_key("src", version))
