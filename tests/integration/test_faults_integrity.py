"""Fault injection, integrity (issue 14 item 1): nothing published is reused unchecked.

A published backbone, shard, manifest and checkpoint are tampered with (40 KB overwritten
with finite values) or truncated, in a local store and in S3 (SeaweedFS), and the
stage, the flow's reuse check, ``fetch_dir``, ``load_backbone`` and the registration
are run again at the tiny budget of the flow tests: the damage is detected and named
(file, recorded and actual sha256), the output is re-run (or, with ``--no-repair``,
refused), and a damaged backbone is never registered. A manifest whose class list was
edited is refused naming the field, not an ``IndexError`` in the loss.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml

from flows import plan, publish
from flows.runners import StageFailed
from flows.runners.base import StageRun, StageRunner
from stages import expand, ingest
from tests.model.test_engine import ENGINE, LinearModel, streams, weights
from tests.pipeline_config import TINY_TRAIN, tiny_config_dict
from xlearner import integrity, tracking
from xlearner.checkpoint import Checkpointer
from xlearner.config import TrainConfig, validate_config
from xlearner.contract import RESULT_FILE, ExitCode, ExpandCall
from xlearner.data.shards import ManifestError, ShardDataset, load_manifest
from xlearner.engine import Trainer
from xlearner.integrity import IntegrityError, verified_result
from xlearner.models.loading import load_backbone
from xlearner.outputs import fetch_dir
from xlearner.store import (
    ArtifactStore,
    LocalStore,
    S3Store,
    join,
    open_store,
    sha256_bytes,
    sha256_file,
)

SIZE = 32
BACKBONE = "backbone/backbone.safetensors"


def tamper(data: bytes) -> bytes:
    """40 KB from the middle overwritten with finite float32 values (still loadable)."""
    start = len(data) // 2 & ~3
    patch = np.full(10 * 1024, 0.25, dtype=np.float32).tobytes()
    return data[:start] + patch + data[start + len(patch) :]


def truncate(data: bytes) -> bytes:
    """Cut to 100 KB (a small file: to half its size)."""
    return data[: min(100 * 1024, len(data) // 2)]


def damage(store: ArtifactStore, key: str, how) -> str:
    """Rewrite ``key`` as an outside writer would: in place on disk, a plain PUT on S3
    (no sha256 metadata); returns the sha256 of the damaged bytes."""
    data = how(store.read_bytes(key))
    if isinstance(store, LocalStore):
        path = store.root / key
        with open(path, "r+b") as f:  # same file, same inode: the hash cache must notice
            f.write(data)
            f.truncate()
    else:
        assert isinstance(store, S3Store)
        store.client.put_object(Bucket=store.bucket, Key=join(store.prefix, key), Body=data)
    return sha256_bytes(data)


class Published:
    """A tiny config, one ingested source (with an ingest stage output) and one expand
    stage output in a store; :meth:`restore` puts the store back as it was published."""

    def __init__(self, store: ArtifactStore, synth_data, tmp_path: Path):
        self.store = store
        data = tiny_config_dict(
            str(synth_data.root), store.root_uri, sources=("shapes_cls",), downstream=()
        )
        self.config = tmp_path / "config.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.cfg = validate_config(data)
        ingested = self.stage(
            ingest.main,
            ["--source", "shapes_cls", "--store", store.root_uri, "--out", self.uri("runs/ing")],
        )
        self.manifest = ingested["manifests"]["shapes_cls"]
        self.manifest_key = self.manifest[len(store.root_uri) + 1 :]
        self.expand_argv = ["--task", "cls", "--manifest", f"shapes_cls={self.manifest}"]
        self.expand_argv += ["--steps", "2"]
        self.expanded = self.expand()
        self.pristine = {key: store.read_bytes(key) for key in store.list()}

    def restore(self) -> None:
        for key in set(self.store.list()) - set(self.pristine):
            self.store.delete(key)
        for key, data in self.pristine.items():
            self.store.write_bytes(key, data)

    def uri(self, key: str) -> str:
        return self.store.uri(key)

    def out(self, prefix: str) -> ArtifactStore:
        return open_store(self.uri(prefix))

    def stage(self, main, argv: list[str]) -> dict:
        """Run a stage in this process; its log (stdout) is kept in ``self.log``."""
        code, self.log = run_main(main, ["--config", str(self.config), *argv])
        assert code == 0, self.log[-3000:]
        out = self.log
        line = [x for x in out.splitlines() if x.startswith("XLEARNER_RESULT ")][-1]
        return json.loads(line.removeprefix("XLEARNER_RESULT "))

    def expand(self) -> dict:
        return self.stage(expand.main, [*self.expand_argv, "--out", self.uri("runs/exp")])


def run_main(main, argv: list[str]) -> tuple[int, str]:
    """A stage's ``main`` run in this process: its exit code and its log (stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module", params=["local", "s3"])
def backend(request, synth_data, tmp_path_factory) -> Iterator[Published]:
    """Published once per backend (S3: a fresh prefix, AWS_* set for the module)."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "local":
            store = open_store(str(tmp_path_factory.mktemp("store")))
        else:
            server = request.getfixturevalue("s3_server")
            for key, value in server.env().items():
                mp.setenv(key, value)
            mp.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the first credentials
            prefix = f"t-{uuid.uuid4().hex[:12]}"
            store = open_store(server.uri(prefix), endpoint_url=server.endpoint_url)
        yield Published(store, synth_data, tmp_path_factory.mktemp("integrity"))


@pytest.fixture
def published(backend: Published) -> Published:
    """The published store, as it was before any test damaged or repaired it."""
    backend.restore()
    return backend


@pytest.fixture
def registrations(monkeypatch) -> list[dict[str, str]]:
    """What reached MLflow's registration: the sha256 of each file of each backbone folder."""
    calls: list[dict[str, str]] = []

    def register(cfg, folder: Path, *_scores) -> dict:
        files = {p.name: sha256_bytes(p.read_bytes()) for p in Path(folder).iterdir()}
        calls.append(files)
        return {"model_uri": "models:/x/1", "champion": True}

    monkeypatch.setattr(tracking, "register_backbone", register)
    return calls


def test_damaged_backbone_is_named_never_registered_and_rerun(published, registrations):
    p = published
    recorded = p.expanded["files"][BACKBONE]
    for how in (tamper, truncate):
        p.restore()
        actual = damage(p.out("runs/exp"), BACKBONE, how)
        with pytest.raises(IntegrityError) as err:
            verified_result(p.out("runs/exp"))  # the reuse check of the flow and the stage
        named = f"{p.uri('runs/exp/' + BACKBONE)} has sha256 {actual}, recorded {recorded}"
        assert named in str(err.value)
        with pytest.raises(IntegrityError, match=f"backbone.safetensors has sha256 {actual}"):
            fetch_dir(p.expanded["backbone"])  # S3: the downloaded copy is checked
        if isinstance(p.store, LocalStore):  # a folder in the store, loaded directly
            with pytest.raises(IntegrityError, match=recorded):
                load_backbone(p.store.root / "runs/exp/backbone")
        with pytest.raises(IntegrityError):
            publish.register_backbone(p.cfg, p.expanded["backbone"], 0.5)
        assert registrations == []  # a damaged backbone is never registered

    rerun = p.expand()  # the stage's own reuse check: named, set aside, run again
    assert not rerun.get("skipped")
    assert f"has sha256 {actual}, recorded {recorded}" in p.log
    out = p.out("runs/exp")
    assert [k for k in out.list() if k.startswith(f"{RESULT_FILE}.damaged-")]
    assert verified_result(out) is not None
    load_backbone(fetch_dir(rerun["backbone"]))
    publish.register_backbone(p.cfg, rerun["backbone"], 0.5)
    assert registrations == [
        {n.rpartition("/")[2]: h for n, h in rerun["files"].items() if n.startswith("backbone/")}
    ]
    assert registrations[0]["backbone.safetensors"] != actual


class InProcessRunner(StageRunner):
    """Runs the stage's ``main`` in this process (the stage itself is real; only the child
    process and its imports, tens of seconds on a busy machine, are saved)."""

    def run(self, stage: str, argv: list[str], env=None, log=print, **launch) -> StageRun:
        module = importlib.import_module(f"stages.{stage}")
        code, out = run_main(module.main, argv)
        for line in out.splitlines():
            log(line)
        lines = [x for x in out.splitlines() if x.startswith("XLEARNER_RESULT ")]
        result = json.loads(lines[-1].removeprefix("XLEARNER_RESULT ")) if lines else None
        return StageRun(code, result, out[-3000:], 0.0)


def flow_context(p: Published, monkeypatch, no_repair: bool) -> plan.PipelineContext:
    """What the flow's ``run_stage`` needs, without a Prefect server."""
    monkeypatch.setattr(plan, "get_run_logger", lambda: logging.getLogger("test.flow"))
    monkeypatch.setattr(plan, "make_runner", lambda config: InProcessRunner())
    return plan.PipelineContext(p.cfg, str(p.config), None, no_repair=no_repair)


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_flow_refuses_a_damaged_output_with_no_repair_and_reruns_it_without(
    published, monkeypatch, caplog
):
    p = published
    call = ExpandCall(
        config=str(p.config),
        out=p.uri("runs/exp"),
        task="cls",
        manifests={"shapes_cls": p.manifest},
        steps=2,
    )
    reused = plan.run_stage.fn(flow_context(p, monkeypatch, False), "expand-cls", call)
    assert reused["cached"] and reused["files"] == p.expanded["files"]

    actual = damage(p.store, f"runs/exp/{BACKBONE}", truncate)
    with pytest.raises(StageFailed) as err:
        plan.run_stage.fn(flow_context(p, monkeypatch, True), "expand-cls", call)
    assert err.value.returncode == ExitCode.BAD_INPUT  # not retried: it fails the same way
    assert f"{BACKBONE} has sha256 {actual}, recorded {p.expanded['files'][BACKBONE]}" in str(
        err.value
    )
    assert p.store.exists(f"runs/exp/{RESULT_FILE}")  # refused, left as it was

    with caplog.at_level(logging.WARNING, logger="test.flow"):
        rerun = plan.run_stage.fn(flow_context(p, monkeypatch, False), "expand-cls", call)
    assert "cached" not in rerun and f"has sha256 {actual}" in caplog.text
    assert verified_result(p.out("runs/exp")).files == rerun["files"]


@pytest.mark.parametrize("how", [tamper, truncate])
def test_damaged_shard_is_named_and_ingest_publishes_it_again(published, how):
    p = published
    manifest = load_manifest(p.manifest)
    shard = manifest["splits"]["train"]["shards"][0]
    key = join(p.manifest_key.rpartition("/")[0], shard["file"])
    actual = damage(p.store, key, how)

    with pytest.raises(IntegrityError, match=f"{shard['file']} has sha256 {actual}"):
        verified_result(p.out("runs/ing"))  # the flow's reuse check of the ingest output
    p.stage(ingest.main, ["--source", "shapes_cls", "--store", p.store.root_uri])
    assert f"is damaged, publishing it again: {p.uri(key)} has sha256 {actual}" in p.log
    assert verified_result(p.out("runs/ing")) is not None
    assert len(ShardDataset(p.manifest, "train", SIZE)) == manifest["splits"]["train"]["records"]


def test_damaged_cached_shard_is_downloaded_again(published, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = ShardDataset(published.manifest, "val", SIZE, cache_dir=cache)
    before = first.raw(0)
    cached = Path(first.shard_paths[0])
    cached.write_bytes(tamper(cached.read_bytes()))
    with caplog.at_level(logging.WARNING):
        again = ShardDataset(published.manifest, "val", SIZE, cache_dir=cache)
    assert f"{cached}: cached copy" in caplog.text and "downloading it again" in caplog.text
    assert again.raw(0) == before


def test_manifest_with_an_edited_class_list_is_refused_naming_the_field(published):
    p = published
    manifest = p.store.read_json(p.manifest_key)
    # a consistent-looking edit: one class fewer, the counts trimmed to match
    manifest["classes"] = manifest["classes"][:-1]
    manifest["num_classes"] -= 1
    for split in manifest["splits"].values():
        split["class_counts"] = split["class_counts"][:-1]
    p.store.write_json(p.manifest_key, manifest)

    expected = rf"manifest {p.manifest}: field 'classes' was edited after ingest.*re-ingest"
    for read in (load_manifest, lambda uri: ShardDataset(uri, "train", SIZE)):
        with pytest.raises(ManifestError, match=expected):
            read(p.manifest)
    with pytest.raises(IntegrityError, match="field 'classes' was edited"):
        verified_result(p.out("runs/ing"))
    code, log = run_main(
        expand.main,
        ["--config", str(p.config), *p.expand_argv, "--out", p.uri("runs/exp-edited")],
    )
    assert code == ExitCode.BAD_INPUT  # one clear error, not an IndexError in the loss
    assert "field 'classes' was edited" in log and "Traceback" not in log


def test_truncated_manifest_is_published_again_by_ingest(published):
    p = published
    original = p.store.read_json(p.manifest_key)
    damage(p.store, p.manifest_key, lambda data: data[: len(data) // 2])
    with pytest.raises(IntegrityError, match="not valid JSON"):
        verified_result(p.out("runs/ing"))
    p.stage(ingest.main, ["--source", "shapes_cls", "--store", p.store.root_uri])
    again = load_manifest(p.manifest)
    assert again["splits"] == original["splits"] and again["classes"] == original["classes"]


@pytest.mark.parametrize("how", [tamper, truncate])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(store, how, caplog):
    cfg = TrainConfig(**TINY_TRAIN, lr=0.05)  # 6 steps, a checkpoint at 3 and at 6
    straight = LinearModel()
    Trainer(straight, streams(), cfg, ENGINE, seed=1, checkpointer=Checkpointer(store, "ck")).fit()
    damage(store, "ck/step-00000006/model.safetensors", how)

    resumed = LinearModel()
    with caplog.at_level(logging.WARNING, logger="xlearner.checkpoint"):
        start = Trainer(
            resumed, streams(), cfg, ENGINE, seed=1, checkpointer=Checkpointer(store, "ck")
        ).fit()
    assert start == 3  # from step 3, not from scratch, and no SafetensorError
    assert "step-00000006: model.safetensors has sha256" in caplog.text
    assert f"resuming from {store.uri('ck/step-00000003')}" in caplog.text
    assert weights(resumed).allclose(weights(straight))

    for step in (3, 6):  # nothing intact: it starts over, saying so
        damage(store, f"ck/step-{step:08d}/trainer_state.pt", truncate)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xlearner.checkpoint"):
        start = Trainer(
            LinearModel(), streams(), cfg, ENGINE, seed=1, checkpointer=Checkpointer(store, "ck")
        ).fit()
    assert start == 0 and "no intact checkpoint" in caplog.text


def test_hashes_of_large_files_are_cached_across_processes_until_they_change(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "PERSISTED_FROM_BYTES", 1024)  # "large" here: 1 KiB

    def new_process() -> None:
        monkeypatch.setattr(integrity, "_cache", {})
        monkeypatch.setattr(integrity, "_persisted", None)

    path = tmp_path / "shard.tar"
    path.write_bytes(b"a" * 4096)
    new_process()
    first = integrity.file_sha256(path)
    new_process()
    monkeypatch.setattr(integrity, "sha256_file", lambda _: pytest.fail("hashed again"))
    assert integrity.file_sha256(path) == first  # from sha256-by-stat.jsonl
    monkeypatch.setattr(integrity, "sha256_file", sha256_file)
    mtime = path.stat().st_mtime_ns
    path.write_bytes(b"b" * 4096)  # same size, a new mtime (set: file times are coarse)
    os.utime(path, ns=(mtime, mtime + 10**6))
    assert integrity.file_sha256(path) == sha256_bytes(b"b" * 4096) != first
