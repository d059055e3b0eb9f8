"""Bad stage inputs fail before any training, with exit code 2 and a message that names them."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from stages import squeeze, transfer
from tests.pipeline_config import tiny_config_dict
from xlearner.config import validate_config
from xlearner.data.ingest import ingest_source, split_of
from xlearner.models.multitask import backbone_trunk_spec, build_model, save_model
from xlearner.store import LocalStore


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_transfer_refuses_a_folder_that_is_not_a_backbone(tmp_path, synth_data, capsys):
    config = write_config(tmp_path, tiny_config_dict(str(synth_data.root), str(tmp_path / "store")))
    fake = tmp_path / "not_a_backbone"
    fake.mkdir()
    (fake / "weights.bin").write_bytes(b"\x00" * 16)
    code = transfer.main(
        ["--config", str(config), "--backbone", f"x={fake}", "--out", str(tmp_path / "out")]
    )
    out = capsys.readouterr().out
    assert code == 2
    assert str(fake) in out and "not a backbone" in out


def test_transfer_names_a_downstream_source_whose_val_classes_are_missing_from_train(
    tmp_path, synth_data, capsys
):
    source = tmp_path / "skewed"
    shutil.copytree(synth_data.paths["down_cls_a"], source)
    rare = source / "rare"
    rare.mkdir()
    classes = source / "classes.txt"
    if classes.exists():
        classes.write_text(classes.read_text().rstrip("\n") + "\nrare\n")
    example = next((source / "circle").iterdir())
    names = [
        f"r{i}{example.suffix}"
        for i in range(200)
        if split_of(f"rare/r{i}{example.suffix}", 0.3, 0) == "val"
    ]
    for name in names[:3]:  # every "rare" image lands in val: train never sees the class
        shutil.copy(example, rare / name)
    data = tiny_config_dict(str(synth_data.root), str(tmp_path / "store"))
    data["downstream"] = [{"name": "skewed", "format": "cls", "uri": str(source)}]
    config = write_config(tmp_path, data)
    cfg = validate_config(data)
    store = LocalStore(tmp_path / "store")
    manifest = ingest_source(cfg.downstream[0], store, image_size=32)
    uri = store.uri(f"sources/skewed/{manifest['version']}/manifest.json")
    code = transfer.main(
        [
            "--config",
            str(config),
            "--backbone",
            "r=random:tiny_resnet",
            "--downstream",
            f"skewed={uri}",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 2
    assert "downstream source 'skewed'" in out and "no train examples" in out


def test_squeeze_refuses_a_student_larger_than_the_teacher(tmp_path, synth_data, capsys):
    data = tiny_config_dict(str(synth_data.root), str(tmp_path / "store"), sources=("shapes_cls",))
    data["squeeze"]["student"] = "resnet50"
    config = write_config(tmp_path, data)
    cfg = validate_config(data)
    store = LocalStore(tmp_path / "store")
    manifest = ingest_source(cfg.sources[0], store, image_size=32)
    uri = store.uri(f"sources/shapes_cls/{manifest['version']}/manifest.json")
    teacher = build_model(
        {
            "trunk": backbone_trunk_spec("tiny_resnet"),
            "streams": {"shapes_cls:cls": {"task": "cls", "num_classes": 4}},
            "image_size": 32,
        }
    )
    save_model(teacher, tmp_path / "teacher")
    code = squeeze.main(
        [
            "--config",
            str(config),
            "--teacher",
            str(tmp_path / "teacher"),
            "--manifest",
            f"shapes_cls={uri}",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 2
    assert "squeeze target resnet50" in out and "larger than the teacher" in out
    assert not (tmp_path / "out" / "result.json").exists()
