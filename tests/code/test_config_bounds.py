"""Configs that should not load: `--set` keys that do not exist, sizes and counts out of
bounds, URI schemes the pipeline cannot use, downstream sets that are not held out."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import ingest
from xlearner.config import ConfigError, DownstreamConfig, SourceConfig, load_config
from xlearner.contract import ExitCode
from xlearner.data.held_out import check_held_out_content
from xlearner.data.ingest import FILE_HASHES, ingest_source
from xlearner.store import LocalStore, StoreError

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def config_error(overrides: list[str], source: Path = QUICKSTART) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    return str(info.value)


@pytest.mark.parametrize(
    "override, named",
    [
        ("sources.99.uri=x", "--set sources.99.uri: sources has 4 item(s), so no item 99"),
        ("sources.nope.uri=x", "--set sources.nope.uri: no item of sources is named 'nope'"),
        ("model.image_size.x=3", "--set model.image_size.x: model.image_size is 64, not a section"),
        ("tasks=[1,2", "--set tasks: the value '[1,2' is not valid YAML"),
        ("tasks={a: 1", "--set tasks: the value '{a: 1' is not valid YAML"),
    ],
)
def test_bad_set_keys_and_values_are_named(override, named, capsys):
    assert named in config_error([override])
    code = ingest.main(["--config", str(QUICKSTART), "--set", override])  # the stage: exit 2
    out = capsys.readouterr().out
    assert code == ExitCode.BAD_INPUT and named in out and "Traceback" not in out


def test_a_config_nested_100k_deep_is_named(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("sources: " + "[" * 100_000 + "]" * 100_000)
    assert f"config file {path} is nested too deeply" in config_error([], path)


@pytest.mark.parametrize(
    "override, field, hint",
    [
        ("tasks.cls.steps=100000000000", "tasks.cls.steps", "less than or equal to 10000000"),
        ("tasks.cls.steps=1e20", "tasks.cls.steps", "Input should be a valid integer"),
        ("reconcile.train.batch_size=1.0e+8", "reconcile.train.batch_size", "65536"),
        ("squeeze.train.warmup_steps=1.0e+12", "squeeze.train.warmup_steps", "10000000"),
        ("engine.num_workers=100000", "engine.num_workers", "0..256 worker processes"),
        ("engine.num_workers=1.0e+5", "engine.num_workers", "0..256 worker processes"),
        ("engine.prefetch_factor=100000", "engine.prefetch_factor", "64"),
        ("ingest.max_side=1000000", "ingest.max_side", "65535"),
        ("synth.images_per_source=1.0e+9", "synth.images_per_source", "1000000"),
        ("heads.contrastive.projection_dim=1.0e+9", "heads.contrastive.projection_dim", "65536"),
        ("resources.expand.gpus=-7", "resources.expand.gpus", "-1"),
        ("resources.reconcile.procs_per_node=2000", "resources.reconcile.procs_per_node", "1024"),
        ("resources.squeeze.cpus=0", "resources.squeeze.cpus", "greater than 0"),
        ("resources.transfer.memory=lots", "resources.transfer.memory", "512m or 64g"),
        ("runner.docker.shm_size=banana", "runner.docker.shm_size", "512m or 2g"),
        ("sources.shapes_cls.uri=file:///data/x", "sources.0.uri", "unsupported scheme file://"),
        ("downstream.down_cls_a.uri=http://h/x", "downstream.0.uri", "unsupported scheme http://"),
        ("store.uri=ftp://host/store", "store.uri", "unsupported scheme ftp://"),
        ("store.uri=s3://", "store.uri", "no bucket"),
    ],
)
def test_out_of_bounds_fields_name_the_field_and_the_bound(override, field, hint):
    message = config_error([override])
    line = next((ln for ln in message.splitlines() if ln.strip().startswith(field + ":")), "")
    assert hint in line, message


def test_steps_1e20_in_the_file_itself_is_refused(tmp_path):
    data = yaml.safe_load(QUICKSTART.read_text())
    data["tasks"]["cls"]["steps"] = 1e20
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    assert "tasks.cls.steps: " in config_error([], path)  # a float too large for an int


def test_the_bounds_leave_real_configs_alone():
    cfg = load_config(QUICKSTART, ["engine.num_workers=16", "store.uri=s3://bucket/prefix"])
    assert cfg.engine.num_workers == 16 and cfg.store.uri == "s3://bucket/prefix"


# ---------------------------------------------------------------- held-out downstream sets


@pytest.mark.parametrize(
    "downstream_uri",
    [".xlearner/data/shapes_cls", ".xlearner/data/shapes_cls/", ".xlearner/data/shapes_cls/sub"],
)
def test_a_downstream_set_in_a_training_source_folder_is_refused(downstream_uri):
    message = config_error([f"downstream.down_cls_a.uri={downstream_uri}"])
    assert "downstream 'down_cls_a'" in message and "training source 'shapes_cls'" in message
    assert "share a folder" in message


def test_a_training_source_inside_a_downstream_folder_is_refused_on_s3_too():
    message = config_error(
        [
            "store.uri=s3://b/store",
            "downstream.down_cls_a.uri=s3://b/data",
            "sources.shapes_cls.uri=s3://b/data/shapes_cls",
        ]
    )
    assert "downstream 'down_cls_a' (s3://b/data)" in message and "'shapes_cls'" in message


def test_sibling_folders_with_a_common_name_prefix_are_not_a_leak():
    cfg = load_config(QUICKSTART, ["downstream.down_cls_a.uri=.xlearner/data/shapes_cls_held"])
    assert cfg.downstream[0].uri.endswith("shapes_cls_held")


def write_cls_source(root: Path, seeds: range) -> Path:
    for seed in seeds:
        pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG")
        folder = root / ("a" if seed % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{seed:03d}.png").write_bytes(out.getvalue())
    return root


def published(store: LocalStore, source: SourceConfig | DownstreamConfig) -> str:
    manifest = ingest_source(source, store, log=lambda _: None)
    return store.uri(f"sources/{source.name}/{manifest['version']}/manifest.json")


def test_a_downstream_set_sharing_files_with_a_training_source_is_refused(tmp_path):
    store = LocalStore(tmp_path / "store")
    train = write_cls_source(tmp_path / "train", range(0, 12))
    held = write_cls_source(tmp_path / "held", range(100, 110))
    leaky = write_cls_source(tmp_path / "leaky", range(200, 208))
    shutil.copy(train / "a" / "003.png", leaky / "a" / "copied.png")  # another name, same bytes
    training = {"train": published(store, SourceConfig(name="train", format="cls", uri=str(train)))}
    clean = {"held": published(store, DownstreamConfig(name="held", format="cls", uri=str(held)))}
    check_held_out_content(training, clean)  # nothing shared: no error

    dirty = {
        "leaky": published(store, DownstreamConfig(name="leaky", format="cls", uri=str(leaky)))
    }
    with pytest.raises(ConfigError) as info:
        check_held_out_content(training, {**clean, **dirty})
    message = str(info.value)
    assert "downstream 'leaky' shares 1 file(s) with training source 'train'" in message
    assert "images/a/copied.png" not in message and "a/copied.png = a/003.png" in message


def test_a_tampered_hash_list_is_refused_and_an_old_version_is_logged(tmp_path):
    store = LocalStore(tmp_path / "store")
    train = write_cls_source(tmp_path / "train", range(0, 6))
    held = write_cls_source(tmp_path / "held", range(50, 56))
    training = {"train": published(store, SourceConfig(name="train", format="cls", uri=str(train)))}
    uri = published(store, DownstreamConfig(name="held", format="cls", uri=str(held)))
    hashes = Path(uri).parent / FILE_HASHES
    hashes.write_text(hashes.read_text().replace("a/", "x/", 1))
    with pytest.raises(StoreError, match=f"{FILE_HASHES} does not match the sha256"):
        check_held_out_content(training, {"held": uri})

    manifest = Path(uri)
    manifest.write_text(manifest.read_text().replace('"file_hashes"', '"old_field"'))
    logged: list[str] = []
    check_held_out_content(training, {"held": uri}, log=logged.append)
    assert "['held']" in logged[0] and "by folder only" in logged[0]
