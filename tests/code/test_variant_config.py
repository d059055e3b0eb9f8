"""Seeds, variants and hints in the config: bad values fail at load with the field and fix."""

from __future__ import annotations

import pytest

from tests.pipeline_config import tiny_config_dict
from xlearner.config import ConfigError, Variant, validate_config
from xlearner.tasks import TaskType


def config(**overrides):
    return validate_config(
        tiny_config_dict("/data", "/store", sources=("shapes_cls", "shapes_det", "shapes_seg"),
                         **overrides),
        origin="pipeline.yaml",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"seeds": []}, r"seeds: an empty list runs nothing; .*`seeds: \[0, 1, 2\]`"),
        ({"seeds": [0, 1, 0]}, r"seeds: seeds must be distinct"),
        ({"compare": ["xlearner_q"]}, r"compare: unknown variant 'xlearner_q'; choose from"),
        ({"compare": ["without:depth"]}, r"without:depth: 'depth' is neither a task nor a source"),
        (
            {"compare": ["without:shapes_det"]},
            r"'shapes_det' is the only source of task\(s\) \['det'\]; use `without:<task>`",
        ),
        (
            {"squeeze": {"hints": [{"name": "shapes_cls", "path": "/w/in1k.safetensors"}]}},
            r"squeeze.hints: \['shapes_cls'\] are source names",
        ),
        (
            {"squeeze": {"hints": [{"name": "in1k", "path": "/w/in1k.bin"}]}},
            r"squeeze.hints.0.path: .*expected a local .safetensors or .pth or .pt file",
        ),
        ({"squeeze": {"hint_weight": -1}}, r"squeeze.hint_weight"),
        ({"reconcile": {"r_sub_backbone": "resnet5"}}, r"reconcile.r_sub_backbone: .*'resnet5'"),
    ],
)
def test_bad_values_name_the_field_and_the_fix(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        config(**overrides)
    assert str(err.value).startswith("invalid config pipeline.yaml:")


def test_seeds_default_to_the_one_seed():
    assert config(seed=4).run_seeds == [4]
    seeded = config(seed=4, seeds=[0, 1, 2])
    assert seeded.run_seeds == [0, 1, 2]
    assert seeded.with_seed(1).seed == 1 and seeded.with_seed(1).run_seeds == [1]


def test_compare_takes_variants_and_without_entries():
    cfg = config(compare=["xlearner_t", "without:det"])
    assert cfg.compare == [Variant.xlearner_t, "without:det"]
    assert isinstance(cfg.compare[0], Variant)


def test_without_a_task_drops_it_and_its_only_sources():
    cfg = config(
        tasks={"cls": {"steps": 3}, "det": {"steps": 4}, "seg": {"steps": 5}},
        squeeze={"target_weights": {"det": 0.5, "seg": 2.0}},
    )
    reduced = cfg.without("det")
    assert [s.name for s in reduced.sources] == ["shapes_cls", "shapes_seg"]
    assert reduced.task_types == [TaskType.cls, TaskType.seg]
    assert set(reduced.tasks) == {TaskType.cls, TaskType.seg}
    assert reduced.squeeze.target_weights == {TaskType.seg: 2.0}
    assert reduced.variant == Variant.xlearner and reduced.compare == []


def test_without_a_source_keeps_the_tasks_other_sources_feed():
    data = tiny_config_dict("/data", "/store", sources=("shapes_cls", "shapes_seg"))
    data["sources"].append({"name": "more_cls", "format": "cls", "uri": "/data/more"})
    cfg = validate_config({**data, "compare": ["without:more_cls"]})
    reduced = cfg.without("more_cls")
    assert [s.name for s in reduced.sources] == ["shapes_cls", "shapes_seg"]
    assert reduced.task_types == cfg.task_types


def test_without_the_only_task_is_refused():
    one = validate_config(tiny_config_dict("/data", "/store", sources=("shapes_cls",)))
    with pytest.raises(ValueError, match="'cls' is the only task; nothing would be left"):
        one.without("cls")
