"""Bad stage inputs fail before any training, with exit code 2 and a message that names them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from stages import expand, squeeze, transfer
from tests.pipeline_config import tiny_config_dict
from xlearner.config import validate_config
from xlearner.contract import RESULT_FILE, RESULT_PREFIX, ExitCode
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


def test_squeeze_wants_either_a_teacher_or_sub_models(tmp_path, synth_data, capsys):
    config = write_config(tmp_path, tiny_config_dict(str(synth_data.root), str(tmp_path / "store")))
    for flags in ([], ["--teacher", "t", "--sub-model", "cls=s"]):
        code = squeeze.main(["--config", str(config), *flags, "--out", str(tmp_path / "out")])
        assert code == ExitCode.BAD_INPUT
        assert "give either --teacher" in capsys.readouterr().out


def test_a_malformed_pair_or_config_is_bad_input(tmp_path, synth_data, capsys):
    config = write_config(tmp_path, tiny_config_dict(str(synth_data.root), str(tmp_path / "store")))
    out = str(tmp_path / "out")
    assert expand.main(["--config", str(config), "--task", "cls", "--manifest", "x", "--out", out])
    assert "--manifest 'x': expected NAME=VALUE" in capsys.readouterr().out
    code = expand.main(["--config", str(tmp_path / "nope.yaml"), "--task", "cls", "--out", out])
    assert code == ExitCode.BAD_INPUT
    assert "stage expand failed: config file" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # argparse: an unknown flag
        expand.main(["--config", str(config), "--task", "cls", "--bogus", "--out", out])
    assert exit_.value.code == ExitCode.BAD_INPUT


def test_a_published_output_is_skipped_with_its_result(tmp_path, synth_data, capsys):
    config = write_config(tmp_path, tiny_config_dict(str(synth_data.root), str(tmp_path / "store")))
    out = tmp_path / "out"
    out.mkdir()
    published = {"task": "cls", "metrics": {"s:cls": {"top1": 0.5}}, "out": str(out), "files": {}}
    (out / RESULT_FILE).write_text(json.dumps(published))
    assert expand.main(["--config", str(config), "--task", "cls", "--out", str(out)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(RESULT_PREFIX)][-1]
    result = json.loads(line.removeprefix(RESULT_PREFIX))
    assert result.pop("seconds") >= 0
    assert result == {**published, "skipped": True, "stage": "expand"}
    assert json.loads((out / RESULT_FILE).read_text()) == published
