"""Config validation at the boundary: bad fields fail at load, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from xlearner.config import ConfigError, load_config
from xlearner.tasks import TaskType

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def test_quickstart_loads_with_one_sub_backbone_per_task():
    cfg = load_config(QUICKSTART)
    assert cfg.task_types == [TaskType.cls, TaskType.multilabel, TaskType.det, TaskType.seg]
    assert [s.name for s in cfg.sources_for(TaskType.det)] == ["shapes_det"]


def test_overrides_reach_nested_fields_and_list_items_by_name(tmp_path):
    cfg = load_config(
        QUICKSTART,
        [
            "squeeze.method=prune",
            "reconcile.receive_stages=[1,2]",
            "sources.shapes_cls.val_fraction=0.3",
        ],
    )
    assert cfg.squeeze.method == "prune"
    assert cfg.reconcile.receive_stages == [1, 2]
    assert next(s for s in cfg.sources if s.name == "shapes_cls").val_fraction == 0.3


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ("model.backbone=resnet51", "model.backbone", "available"),
        ("squeeze.method=quantize", "squeeze.method", "distill"),
        ("reconcile.receive_stages=[0,5]", "reconcile.receive_stages", "1..4"),
        ("tasks.cls.steps=0", "tasks.cls.steps", "greater than or equal to 1"),
        ("engine.devise=cuda", "engine.devise", "Extra inputs"),
    ],
)
def test_invalid_field_names_its_path_and_what_is_allowed(override, field, hint):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    message = str(err.value)
    assert str(QUICKSTART) in message and field in message and hint in message


def test_task_with_hyper_parameters_but_no_source_is_rejected(tmp_path):
    data = base()
    data["tasks"]["mim"] = {"steps": 5}
    with pytest.raises(
        ConfigError, match=r"\['mim'\] have hyper-parameters but no source feeds them"
    ):
        load_config(write(tmp_path, data))


def test_source_cannot_feed_a_task_of_another_label_type(tmp_path):
    data = base()
    data["sources"][0]["tasks"] = ["det"]
    with pytest.raises(ConfigError, match="format 'cls' and cannot feed task 'det'"):
        load_config(write(tmp_path, data))


def test_duplicate_source_names_are_rejected(tmp_path):
    data = base()
    data["downstream"][0]["name"] = "shapes_cls"
    with pytest.raises(ConfigError, match="unique"):
        load_config(write(tmp_path, data))


def test_unlabeled_source_feeds_the_self_supervised_tasks(tmp_path):
    data = base()
    data["sources"].append({"name": "raw", "format": "unlabeled", "uri": "x"})
    cfg = load_config(write(tmp_path, data))
    assert TaskType.mim in cfg.task_types and TaskType.contrastive in cfg.task_types


def test_missing_file_and_bad_yaml_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(QUICKSTART, ["squeeze.method"])


def test_no_ssl_variant_drops_the_self_supervised_tasks_and_their_only_sources():
    cfg = load_config(QUICKSTART.with_name("ssl.yaml"))
    assert {TaskType.mim, TaskType.contrastive} <= set(cfg.task_types)
    plain = cfg.without_ssl()
    assert plain.task_types == [TaskType.cls, TaskType.multilabel, TaskType.det, TaskType.seg]
    assert "shapes_unlabeled" not in [s.name for s in plain.sources]
    assert TaskType.mim not in plain.tasks and plain.compare == []


def test_ssl_head_options_are_config_fields():
    cfg = load_config(
        QUICKSTART, ["heads.mim.mask_ratio=0.75", "heads.contrastive.temperature=0.1"]
    )
    assert cfg.heads.options("mim") == {"mask_ratio": 0.75, "patch_size": None}
    assert cfg.heads.options("contrastive")["temperature"] == 0.1
    with pytest.raises(ConfigError, match="heads.mim.mask_ratio") as err:
        load_config(QUICKSTART, ["heads.mim.mask_ratio=1.5"])
    assert str(QUICKSTART) in str(err.value)  # the file it came from


def test_squeeze_target_weights_name_tasks_of_the_pipeline(tmp_path):
    cfg = load_config(
        QUICKSTART.with_name("ssl.yaml"), ["squeeze.target_weights={mim: 0.5, cls: 2}"]
    )
    assert cfg.squeeze.target_weights == {TaskType.mim: 0.5, TaskType.cls: 2.0}
    assert cfg.without_ssl().squeeze.target_weights == {TaskType.cls: 2.0}  # mim is gone
    with pytest.raises(
        ConfigError, match=r"squeeze.target_weights: \['mim'\] are not tasks"
    ) as err:
        load_config(QUICKSTART, ["squeeze.target_weights={mim: 0.5}"])
    assert str(QUICKSTART) in str(err.value)
    with pytest.raises(ConfigError, match=r"squeeze.target_weights.*negative for \['cls'\]") as err:
        load_config(QUICKSTART, ["squeeze.target_weights={cls: -1}"])
    assert str(QUICKSTART) in str(err.value)


def test_no_ssl_variant_needs_a_self_supervised_task(tmp_path):
    with pytest.raises(ConfigError, match="no source feeds mim or contrastive"):
        load_config(write(tmp_path, {**base(), "compare": ["no_ssl"]}))


def test_hard_sharing_sees_as_many_images_as_expansion_and_reconciliation():
    from xlearner.expand import hard_sharing_budget

    cfg = load_config(QUICKSTART)
    budget = hard_sharing_budget(cfg)
    expansion = sum(
        cfg.train_config(t).steps * cfg.train_config(t).batch_size for t in cfg.task_types
    )
    joint = cfg.reconcile.train.steps * cfg.reconcile.train.batch_size * 4  # 4 streams
    assert budget.batch_size == cfg.reconcile.train.batch_size
    assert budget.steps * budget.batch_size * 4 >= expansion + joint
    assert (budget.steps - 1) * budget.batch_size * 4 < expansion + joint
