"""The new-source trigger: a landed source version starts exactly one pipeline run.

The first tests drive the sensor's bookkeeping against a local store with a recording
``emit``; the integration test runs it against the real stack (Prefect server with its
automation services, SeaweedFS) and asserts on the flow runs the automation creates.
Those runs are only checked to be *created* with the right parameters: the pool has no
worker, so they stay Scheduled (their completion is test_deployment.py's subject).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from flows.operator import DATA_ROOTS_ENV, data_roots, is_under
from flows.trigger import (
    ANNOUNCED,
    INGESTED,
    LANDED_EVENT,
    add_source,
    announce,
    emit_events,
    event_id,
    landed_event,
    latest_versions,
    read_state,
    updated_config,
    watch_sources,
)
from tests.integration.deploy_helpers import (
    deployment_runs,
    wait_for_runs,
    write_config,
)
from tests.pipeline_config import tiny_config
from xlearner.config import ConfigError, SourceConfig, load_config, validate_config
from xlearner.data.ingest import ingest_source
from xlearner.store import open_store
from xlearner.store_keys import manifest_key, source_latest, stage_result

TRIGGER_POOL = "xlearner-trigger-test"
QUIET_S = 15  # how long "no run starts" is watched after the last event


class Recorder:
    def __init__(self, fail: bool = False):
        self.events: list = []
        self.fail = fail

    def __call__(self, events: list) -> None:
        if self.fail:
            raise ConnectionError("server went away")
        self.events.extend(events)


def fresh_source(
    synth_root: Path,
    tmp_path: Path,
    name: str = "fresh_cls",
    copy_of: str = "down_cls_b",
    format: str = "cls",
) -> SourceConfig:
    """A source no config lists yet: a copy of a synthetic source (classification by default)."""
    folder = shutil.copytree(synth_root / copy_of, tmp_path / name)
    return SourceConfig(name=name, format=format, uri=str(folder), val_fraction=0.25)


def change_one_image(folder: Path) -> None:
    """A new version of a source: one image duplicated under a new name."""
    image = next(p for p in sorted(folder.rglob("*")) if p.suffix in {".png", ".jpg"})
    shutil.copy(image, image.with_name(f"extra-{image.name}"))


@pytest.fixture
def local_setup(synth_data, tmp_path):
    cfg = tiny_config(str(synth_data.root), str(tmp_path / "store"), name="tiny-sensor")
    return cfg, open_store(cfg.store.uri)


def test_new_source_is_announced_once_with_the_updated_source_list(
    local_setup, synth_data, tmp_path
):
    cfg, store = local_setup
    assert announce(cfg, store, emit=Recorder()) == []  # empty store: nothing landed
    fresh = fresh_source(synth_data.root, tmp_path)
    manifest = ingest_source(fresh, store, image_size=cfg.model.image_size)

    recorder = Recorder()
    landed = announce(cfg, store, source_roots=[str(tmp_path)], emit=recorder)
    assert [(v.name, v.version) for v in landed] == [("fresh_cls", manifest["version"])]
    (event,) = recorder.events
    assert event.event == LANDED_EVENT
    assert event.resource["prefect.resource.id"] == "xlearner.source.fresh_cls"
    assert event.resource["xlearner.config"] == "tiny-sensor"
    assert event.id == event_id("tiny-sensor", landed[0])
    config = validate_config(event.payload["config"])
    assert [s.name for s in config.sources] == [*(s.name for s in cfg.sources), "fresh_cls"]
    added = config.sources[-1]
    assert (added.format, added.uri, added.val_fraction) == ("cls", fresh.uri, 0.25)
    assert config.compare == ["without:fresh_cls"]  # did it help? the same X-Learner without it
    assert config.model_copy(update={"sources": cfg.sources, "compare": cfg.compare}) == cfg
    assert read_state(store, cfg.name) == {"fresh_cls": {manifest["version"]: ANNOUNCED}}

    again = Recorder()
    assert announce(cfg, store, source_roots=[str(tmp_path)], emit=again) == []
    assert again.events == []

    change_one_image(Path(fresh.uri))  # a new version of the same source is news again
    newer = ingest_source(fresh, store, image_size=cfg.model.image_size)
    assert newer["version"] != manifest["version"]
    third = Recorder()
    announced = announce(cfg, store, source_roots=[str(tmp_path)], emit=third)
    assert [v.version for v in announced] == [newer["version"]]
    assert third.events[0].id != event.id


def test_a_new_source_is_compared_with_the_run_without_it(synth_data, tmp_path):
    """The triggered run answers "did the new source help?": a `without:` row beside the
    X-Learner row, for the sources announced now only."""
    cfg = tiny_config(
        str(synth_data.root), str(tmp_path / "store"), name="tiny-helped", variant="hard_sharing"
    )
    store = open_store(cfg.store.uri)
    attr = fresh_source(synth_data.root, tmp_path, "fresh_attr", "shapes_attr", "multilabel")
    unlabeled = fresh_source(
        synth_data.root, tmp_path, "fresh_raw", "shapes_unlabeled", "unlabeled"
    )
    for source in (attr, unlabeled):
        ingest_source(source, store, image_size=cfg.model.image_size)
    landed, lines = latest_versions(store), []

    # fresh_attr is the only source of its one task: leaving it out is `without:multilabel`;
    # the main variant is hard sharing, so the X-Learner row it is measured against joins
    config = updated_config(cfg, store, landed, compare_new=["fresh_attr"], log=lines.append)
    assert [s.name for s in config.sources][-2:] == ["fresh_attr", "fresh_raw"]
    assert config.compare == ["xlearner", "without:multilabel"]
    left = [s.name for s in config.without("multilabel").sources]
    assert left == [*(s.name for s in cfg.sources), "fresh_raw"]
    assert "without:multilabel: did the new source help?" in lines[-1]

    # fresh_raw alone feeds both self-supervised tasks: no one entry leaves just it out
    lines.clear()
    config = updated_config(cfg, store, landed, compare_new=["fresh_raw"], log=lines.append)
    assert config.compare == []
    assert lines[0].startswith("no `without:` row for the new source fresh_raw: ")
    assert "'fresh_raw' is the only source of task(s) ['contrastive', 'mim']" in lines[0]

    # a source the config lists already gets no row; nor do adopted ones not announced now
    config = updated_config(cfg, store, landed, compare_new=["shapes_cls"])
    assert config.compare == [] and len(config.sources) == len(cfg.sources) + 2


def test_versions_a_pipeline_run_ingested_are_not_news(local_setup, synth_data):
    cfg, store = local_setup
    source = cfg.sources[0]
    manifest = ingest_source(source, store, image_size=cfg.model.image_size)
    # what the pipeline's ingest stage publishes last (stages/ingest.py, StageOutput.finish)
    store.write_json(stage_result("ingest", "k1"), {"versions": {source.name: manifest["version"]}})
    recorder = Recorder()
    assert announce(cfg, store, emit=recorder) == [] and recorder.events == []
    assert read_state(store, cfg.name) == {source.name: {manifest["version"]: INGESTED}}


def test_unlisted_sources_are_ignored_when_not_adopted(local_setup, synth_data, tmp_path):
    cfg, store = local_setup
    ingest_source(fresh_source(synth_data.root, tmp_path), store, image_size=cfg.model.image_size)
    recorder, lines = Recorder(), []
    roots = [str(tmp_path)]  # trusted, but not adopted
    options = {"adopt_new_sources": False, "source_roots": roots, "log": lines.append}
    assert announce(cfg, store, emit=recorder, **options) == []
    assert recorder.events == [] and "fresh_cls" in lines[0]
    assert read_state(store, cfg.name) == {}  # still news for a sensor that adopts sources


def test_failed_emit_records_nothing_so_the_next_scan_retries(local_setup, synth_data, tmp_path):
    cfg, store = local_setup
    ingest_source(fresh_source(synth_data.root, tmp_path), store, image_size=cfg.model.image_size)
    with pytest.raises(ConnectionError):
        announce(cfg, store, source_roots=[str(tmp_path)], emit=Recorder(fail=True))
    assert read_state(store, cfg.name) == {}
    retry = Recorder()
    assert len(announce(cfg, store, source_roots=[str(tmp_path)], emit=retry)) == 1
    assert retry.events[0].id == event_id(cfg.name, latest_versions(store)["fresh_cls"])


def plant_foreign_source(store, name: str, source_uri: str, fmt: str = "cls") -> None:
    """What anyone who can write to the store could publish: a manifest and its latest.json."""
    store.write_json(
        manifest_key(name, "v-foreign"),
        {"format": fmt, "source_uri": source_uri, "split": {"val_fraction": 0.1, "seed": 0}},
    )
    store.write_json(
        source_latest(name), {"version": "v-foreign", "manifest": manifest_key(name, "v-foreign")}
    )


def test_a_foreign_source_outside_the_roots_is_reported_and_ignored(local_setup, tmp_path):
    cfg, store = local_setup
    plant_foreign_source(store, "stolen", "/root/.ssh")
    recorder, warnings = Recorder(), []
    announced = announce(
        cfg, store, source_roots=[str(tmp_path)], emit=recorder, warn=warnings.append
    )
    assert announced == [] and recorder.events == []
    (warning,) = warnings
    assert "source stolen landed from /root/.ssh" in warning and "ignored" in warning
    assert read_state(store, cfg.name) == {}  # nothing recorded: it stays refused
    # ".." does not climb out of a root; without roots no unlisted source is adopted
    plant_foreign_source(store, "stolen", f"{tmp_path}/../../root/.ssh")
    assert announce(cfg, store, source_roots=[str(tmp_path)], emit=recorder, warn=[].append) == []
    assert announce(cfg, store, source_roots=[], emit=recorder, warn=warnings.append) == []
    assert f"no data roots are set ({DATA_ROOTS_ENV})" in warnings[-1] and recorder.events == []


def test_a_declared_source_landed_from_elsewhere_is_ignored(local_setup):
    cfg, store = local_setup
    plant_foreign_source(store, cfg.sources[0].name, "/root/.ssh")  # a listed name
    recorder, warnings = Recorder(), []
    assert announce(cfg, store, emit=recorder, warn=warnings.append) == []
    assert recorder.events == [] and f"reads it from {cfg.sources[0].uri}" in warnings[0]


def test_roots_come_from_the_operators_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ROOTS_ENV, f"{tmp_path}/a, s3://bucket/data")
    assert data_roots() == [f"{tmp_path}/a", "s3://bucket/data"]
    assert is_under("s3://bucket/data/x", data_roots())
    assert not is_under("s3://bucket/database", data_roots())
    assert not is_under(f"{tmp_path}/a/../b", data_roots())


def test_add_source_rejects_a_source_the_config_does_not_list(local_setup):
    cfg, _ = local_setup
    with pytest.raises(ConfigError, match="'nope' is not in config 'tiny-sensor'.*shapes_cls"):
        add_source(cfg, "nope")


@pytest.mark.integration
@pytest.mark.slow
def test_landed_source_starts_exactly_one_pipeline_run(
    local_stack, synth_data, tmp_path, monkeypatch
):
    from flows.deployments import deploy

    monkeypatch.setenv(DATA_ROOTS_ENV, str(tmp_path))  # where fresh_cls lives

    cls_copy = shutil.copytree(synth_data.root / "shapes_cls", tmp_path / "shapes_cls")
    path = write_config(
        tmp_path / "trigger.yaml", local_stack, synth_data.root, "trigger",
        uris={"shapes_cls": cls_copy}, name="tiny-trigger",
    )  # fmt: skip
    cfg = load_config(path)
    deployment = "xlearner-pipeline/tiny-trigger"
    deployment_id = deploy(path, pool=TRIGGER_POOL, sensor_every_s=None)[deployment]
    store = open_store(cfg.store.uri, cfg.store.endpoint_url)

    assert watch_sources(deployment=deployment) == []  # nothing has landed yet

    fresh = fresh_source(synth_data.root, tmp_path)
    version = ingest_source(fresh, store, image_size=cfg.model.image_size)["version"]
    assert watch_sources(deployment=deployment) == [
        {
            "name": "fresh_cls",
            "version": version,
            "manifest": store.uri(manifest_key("fresh_cls", version)),
        }
    ]
    (run,) = wait_for_runs(deployment_id, 1)
    sources = {s["name"]: s for s in run.parameters["config"]["sources"]}
    assert sources["fresh_cls"]["uri"] == fresh.uri
    assert set(sources) == {*(s.name for s in cfg.sources), "fresh_cls"}
    assert run.parameters["config"]["compare"] == ["without:fresh_cls"]  # did it help?

    # Nothing new: no event. A crash between emit and record: the same event id again,
    # which the server drops.
    assert watch_sources(deployment=deployment) == []
    landed = latest_versions(store)["fresh_cls"]
    emit_events([landed_event(updated_config(cfg, store, latest_versions(store)), landed)])

    # A changed configured source through `xlearner sources add`: the one new run
    # (any run from the duplicate event would have been created before this one).
    change_one_image(Path(cls_copy))
    message = add_source(cfg, "shapes_cls")
    assert "emitted xlearner.source.landed" in message, message
    runs = wait_for_runs(deployment_id, 2)
    assert len(runs) == 2, [r.parameters["config"]["sources"] for r in runs]
    newest = max(runs, key=lambda r: r.created)
    assert {s["name"] for s in newest.parameters["config"]["sources"]} == set(sources)
    assert "compare" not in newest.parameters["config"]  # a listed source: no without: row

    assert "nothing to do" in add_source(cfg, "shapes_cls")  # same version again
    assert watch_sources(deployment=deployment) == []
    time.sleep(QUIET_S)
    assert len(deployment_runs(deployment_id)) == 2
