"""The schemas of model.json and backbone.json: a bad field fails where the file is read,
naming the file and the field."""

from __future__ import annotations

import json

import pytest

from xlearner.models.backbone import save_backbone
from xlearner.models.loading import load_backbone
from xlearner.models.multitask import (
    backbone_trunk_spec,
    build_model,
    load_model,
    reconciled_trunk_spec,
    save_model,
)
from xlearner.models.registry import create_backbone
from xlearner.models.spec import BackboneError

SIZE = 32


@pytest.fixture
def model_dir(tmp_path):
    spec = {
        "trunk": backbone_trunk_spec("tiny_resnet"),
        "streams": {"a:cls": {"task": "cls", "num_classes": 3}, "a:mim": {"task": "mim"}},
        "image_size": SIZE,
    }
    save_model(build_model(spec), tmp_path)
    return tmp_path


def _rewrite(model_dir, **changes):
    path = model_dir / "model.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_saved_model_loads_with_its_spec_unchanged(model_dir):
    saved = json.loads((model_dir / "model.json").read_text())
    loaded = load_model(model_dir)
    assert {"format": saved["format"], **loaded.spec} == saved  # no defaults added


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"streams": {"a:depth": {"task": "depth"}}}, r"field 'streams\.a:depth\.task'.*'depth'"),
        (
            {"streams": {"a:cls": {"num_classes": 3}}},
            r"field 'streams\.a:cls\.task': Field required",
        ),
        ({"trunk": {"kind": "vit"}}, r"field 'trunk':.*'vit'.*'backbone', 'reconciled'"),
        (
            {"trunk": {"kind": "backbone", "architecture": "vit_b"}},
            r"field 'trunk\.architecture': unknown backbone 'vit_b'",
        ),
        (
            {"trunk": {"kind": "reconciled", "architectures": {"cls": "tiny_resnet"}}},
            r"field 'trunk\.mode': Field required",
        ),
        ({"image_size": "big"}, r"field 'image_size'.*\(got 'big'\)"),
    ],
)
def test_a_bad_model_spec_names_the_file_and_the_field(model_dir, changes, message):
    _rewrite(model_dir, **changes)
    with pytest.raises(ValueError, match=rf"model\.json: {message}"):
        load_model(model_dir)


def test_a_model_spec_without_streams_or_of_another_format_is_refused(model_dir):
    spec = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(
        json.dumps({k: v for k, v in spec.items() if k != "streams"})
    )
    with pytest.raises(ValueError, match=r"model\.json: field 'streams': Field required"):
        load_model(model_dir)
    (model_dir / "model.json").write_text(json.dumps([spec]))
    with pytest.raises(ValueError, match=r"model\.json: not an xlearner model"):
        load_model(model_dir)


def test_reconciled_trunk_specs_validate(tmp_path):
    trunk = reconciled_trunk_spec({"cls": "tiny_resnet", "mim": "tiny_resnet"}, "full", True, [4])
    spec = {
        "trunk": trunk,
        "streams": {"a:cls": {"task": "cls", "num_classes": 2}},
        "image_size": SIZE,
    }
    save_model(build_model(spec), tmp_path)
    assert load_model(tmp_path).spec["trunk"] == trunk


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"channels": None}, r"field 'channels'"),
        ({"channels": [16, 32]}, r"field 'channels': List should have at least 4 items"),
        ({"architecture": None}, r"field 'architecture'"),
        # a pruned backbone's json needs its trunk and tensor shapes
        ({"architecture": "pruned_reconciled"}, r"field 'trunk': Field required"),
    ],
)
def test_a_bad_backbone_spec_names_the_file_and_the_field(tmp_path, changes, message):
    save_backbone(create_backbone("tiny_resnet"), tmp_path)
    path = tmp_path / "backbone.json"
    spec = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in spec.items() if v is not None}))
    with pytest.raises(BackboneError, match=rf"backbone\.json: {message}"):
        load_backbone(tmp_path)
