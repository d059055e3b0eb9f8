"""The squeeze stage's library: FitNet distillation and structured pruning (tiny_resnet, 32 px)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, default_collate

from xlearner.config import EngineConfig, SqueezeConfig, TrainConfig
from xlearner.loaders import Stream
from xlearner.models.backbone import count_parameters
from xlearner.models.loading import load_backbone
from xlearner.models.multitask import (
    MultiTaskModel,
    backbone_trunk_spec,
    build_model,
    reconciled_trunk_spec,
)
from xlearner.models.pruned import load_pruned_backbone, save_pruned_backbone
from xlearner.models.registry import create_backbone
from xlearner.models.spec import PRUNED_ARCHITECTURE, BackboneError
from xlearner.squeeze import (
    DistillationObjective,
    FeatureAdapter,
    count_flops,
    distill,
    prune,
)

SIZE = 32
ENGINE = EngineConfig(device="cpu", log_every_steps=10, eval_max_images=32)
TINY_PARAMS = count_parameters(create_backbone("tiny_resnet"))


class SyntheticCls(Dataset):
    """Random [0, 1] images with random labels: data for the distillation objective."""

    def __init__(self, n: int, seed: int, num_classes: int = 3) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, SIZE, SIZE, generator=gen)
        self.labels = torch.randint(0, num_classes, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], {"label": self.labels[index]}


def streams(names=("a:cls",)) -> list[Stream]:
    """Validation = the training images: the tests check that the FitNet loss is optimised
    (on 16 random images nothing generalises)."""
    out = []
    for i, name in enumerate(names):
        data = SyntheticCls(16, seed=i)
        out.append(Stream(name, "cls", data, data, default_collate))
    return out


def look_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affines (so the zero-initialised gammas contribute too) and BN statistics
    calibrated on random images, as a trained network's would be on its data."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.weight.data = 0.5 + torch.rand(norm.num_features, generator=gen)
        norm.bias.data = 0.2 * torch.randn(norm.num_features, generator=gen)
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
    model.train()
    trunk = getattr(model, "trunk", model)
    with torch.no_grad():
        for _ in range(4):
            trunk(torch.rand(16, 3, SIZE, SIZE, generator=gen))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def reconciled_teacher(tasks=("cls", "multilabel")) -> MultiTaskModel:
    torch.manual_seed(0)
    spec = {
        "trunk": reconciled_trunk_spec(
            {t: "tiny_resnet" for t in tasks}, "full", True, [1, 2, 3, 4]
        ),
        "streams": {
            "a:cls": {"task": "cls", "num_classes": 3},
            "b:cls": {"task": "cls", "num_classes": 3},
        }
        | {f"m:{t}": {"task": t, "num_classes": 3} for t in tasks if t != "cls"},
        "image_size": SIZE,
    }
    return look_trained(build_model(spec)).eval()


def single_teacher() -> MultiTaskModel:
    torch.manual_seed(0)
    spec = {
        "trunk": backbone_trunk_spec("tiny_resnet"),
        "streams": {"a:cls": {"task": "cls", "num_classes": 3}},
        "image_size": SIZE,
    }
    return look_trained(build_model(spec)).eval()


def squeeze_cfg(steps: int, **kwargs) -> SqueezeConfig:
    train = TrainConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, weight_decay=0.0)
    return SqueezeConfig(train=train, **kwargs)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k].cpu(), before[k])]
    assert not changed, f"teacher tensors changed: {changed[:5]}"


def test_distill_lowers_the_fitnet_loss_and_leaves_the_teacher_untouched():
    teacher = reconciled_teacher()
    before = snapshot(teacher)
    student, metrics = distill(teacher, "tiny_resnet", streams(), squeeze_cfg(30), ENGINE, seed=0)

    assert metrics["val_loss"] < 0.7 * metrics["val_loss_initial"], metrics
    sub_backbone_params = count_parameters(teacher.trunk.sub_backbones["cls"])
    assert (
        count_parameters(student)
        == sub_backbone_params
        == metrics["student_parameters"]
        == TINY_PARAMS
    )
    assert metrics["teacher_parameters"] == count_parameters(teacher.trunk) > sub_backbone_params
    assert_same_state(teacher, before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert len(student(torch.rand(2, 3, SIZE, SIZE))) == 4


def test_adapters_one_per_task_and_level_and_only_student_side_trains():
    teacher = reconciled_teacher(("cls", "multilabel", "seg"))
    student = create_backbone("tiny_resnet")
    objective = DistillationObjective(teacher, student, levels=[2, 3, 4])

    assert set(objective.adapters) == {"cls", "multilabel", "seg"}
    for task, per_level in objective.adapters.items():
        assert set(per_level) == {"C3", "C4", "C5"}
        for level, adapter in zip((2, 3, 4), per_level.values(), strict=True):
            conv = adapter[0]
            assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (
                student.channels[level - 1],
                teacher.trunk.channels[task][level - 1],
                (1, 1),
            )
    objective.train()
    assert not teacher.training and student.training
    losses = objective(torch.rand(4, 3, SIZE, SIZE), "a:cls", None)
    assert set(losses) == {"distill"} and losses["distill"].ndim == 0
    losses["distill"].backward()
    assert all(p.grad is not None for p in objective.trainable_parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_target_weights_scale_each_sub_backbones_share_of_the_fitnet_sum():
    teacher, images = reconciled_teacher(), torch.rand(4, 3, SIZE, SIZE)

    def distill_loss(weights: dict[str, float]) -> float:
        torch.manual_seed(1)  # the same student and adapters every time
        objective = DistillationObjective(
            teacher, create_backbone("tiny_resnet"), levels=[3, 4], target_weights=weights
        )
        with torch.no_grad():
            return float(objective.eval()(images, "a:cls")["distill"])

    both, without_multilabel = distill_loss({}), distill_loss({"multilabel": 0.0})
    assert both > without_multilabel > 0
    # weight 3 adds twice the multilabel share once more
    tripled = distill_loss({"multilabel": 3.0})
    assert tripled == pytest.approx(both + 2 * (both - without_multilabel), rel=1e-5)
    with pytest.raises(ValueError, match=r"target weights for \['mim'\]"):
        DistillationObjective(teacher, create_backbone("tiny_resnet"), target_weights={"mim": 1})


def test_single_trunk_teacher_is_matched_as_one_feature_set():
    objective = DistillationObjective(
        single_teacher(), create_backbone("tiny_resnet"), levels=[1, 4]
    )
    assert {k: set(v) for k, v in objective.adapters.items()} == {"shared": {"C2", "C5"}}
    assert float(objective(torch.rand(2, 3, SIZE, SIZE), "a:cls")["distill"].detach()) > 0


def test_task_loss_trains_head_copies_through_adapters_at_every_level():
    teacher = reconciled_teacher()
    objective = DistillationObjective(
        teacher, create_backbone("tiny_resnet"), levels=[4], task_loss_weight=0.5
    )
    assert {k: set(v) for k, v in objective.adapters.items()} == {
        t: {"C2", "C3", "C4", "C5"} for t in ("cls", "multilabel")
    }
    assert objective.heads["a:cls"] is not teacher.heads["a:cls"]
    images, targets = torch.rand(4, 3, SIZE, SIZE), {"label": torch.tensor([0, 1, 2, 0])}
    losses = objective(images, "a:cls", targets)
    assert set(losses) == {"distill", "task/ce"}
    sum(losses.values()).backward()
    assert objective.heads["a:cls"].fc.weight.grad is not None
    assert teacher.heads["a:cls"].fc.weight.grad is None


def test_hints_get_their_own_adapters_and_stay_frozen():
    hint = look_trained(create_backbone("tiny_resnet"), seed=3)
    objective = DistillationObjective(
        reconciled_teacher(), create_backbone("tiny_resnet"), hints={"inat": hint}, hint_weight=2.0
    )
    objective.train()
    assert set(objective.hint_adapters) == {"inat"} and set(objective.hint_adapters["inat"]) == {
        "C5"
    }
    losses = objective(torch.rand(4, 3, SIZE, SIZE), "a:cls")
    assert set(losses) == {"distill", "hint"} and float(losses["hint"].detach()) > 0
    sum(losses.values()).backward()
    assert not hint.training and all(p.grad is None for p in hint.parameters())
    assert objective.hint_adapters["inat"]["C5"][0].weight.grad is not None


def test_adapter_resizes_the_student_feature_to_the_teacher_resolution():
    adapter = FeatureAdapter(8, 16)
    assert adapter.match(torch.rand(2, 8, 4, 4), (8, 8)).shape == (2, 16, 8, 8)


def test_student_larger_than_the_teacher_is_refused_before_training():
    with pytest.raises(
        ValueError,
        match=r"squeeze target resnet18 \(.* params\) is larger than the teacher "
        r"\(.* params\); choose a smaller squeeze.student",
    ):
        distill(single_teacher(), "resnet18", streams(), squeeze_cfg(1000), ENGINE)


def test_levels_outside_c2_c5_are_refused():
    with pytest.raises(ValueError, match="levels must be a non-empty subset of 1..4"):
        DistillationObjective(single_teacher(), create_backbone("tiny_resnet"), levels=[5])


@pytest.fixture(scope="module")
def pruned():
    teacher = reconciled_teacher()
    before = snapshot(teacher)
    module, report = prune(teacher, TINY_PARAMS, streams(), squeeze_cfg(20), ENGINE, seed=0)
    return teacher, before, module, report


def test_prune_reaches_one_sub_backbone_size_with_fewer_flops(pruned):
    teacher, before, module, report = pruned
    params = count_parameters(module)
    assert abs(params / TINY_PARAMS - 1) <= 0.10, (params, TINY_PARAMS)
    assert report["parameters_after"] == params
    assert report["parameters_before"] == count_parameters(teacher.trunk) > 3 * params
    assert report["flops_after"] < report["flops_before"]
    assert report["flops_after"] == count_flops(module, SIZE)
    assert report["val_loss"] < report["val_loss_initial"], report
    assert_same_state(teacher, before)


def test_pruned_backbone_returns_four_concatenated_levels(pruned):
    _, _, module, _ = pruned
    features = module(torch.rand(2, 3, SIZE, SIZE))
    assert [tuple(f.shape) for f in features] == [
        (2, c, SIZE // stride, SIZE // stride)
        for c, stride in zip(module.channels, (4, 8, 16, 32), strict=True)
    ]
    assert all(
        c < 2 * full
        for c, full in zip(module.channels, create_backbone("tiny_resnet").channels, strict=True)
    )


def test_pruned_backbone_saves_without_pickles_and_loads_identically(pruned, tmp_path):
    _, _, module, _ = pruned
    spec = save_pruned_backbone(module, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.json", "backbone.safetensors"]
    on_disk = json.loads((tmp_path / "backbone.json").read_text())
    assert on_disk == spec and on_disk["architecture"] == PRUNED_ARCHITECTURE
    assert on_disk["trunk"]["kind"] == "reconciled"
    assert set(on_disk["shapes"]) == set(load_file(tmp_path / "backbone.safetensors"))

    images = torch.rand(2, 3, SIZE, SIZE)
    # load_backbone (what transfer and users call) dispatches on the json's architecture
    for loaded in (load_pruned_backbone(tmp_path), load_backbone(tmp_path)):
        assert loaded.channels == module.channels
        assert count_parameters(loaded) == count_parameters(module)
        with torch.no_grad():
            for ours, theirs in zip(module.eval()(images), loaded(images), strict=True):
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_load_pruned_backbone_names_the_file_and_the_problem(pruned, tmp_path):
    _, _, module, _ = pruned
    save_pruned_backbone(module, tmp_path)
    spec_path = tmp_path / "backbone.json"
    spec = json.loads(spec_path.read_text())

    key = next(k for k in spec["shapes"] if k.endswith("stem.conv.weight"))
    spec["shapes"][key][0] += 1
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(BackboneError, match=r"backbone.safetensors does not match .*backbone.json"):
        load_pruned_backbone(tmp_path)

    # Both files agree, but the widths do not fit together (the stem conv feeds a 7-wide BN).
    weights = load_file(tmp_path / "backbone.safetensors")
    weights[key] = torch.zeros(spec["shapes"][key])
    save_file(weights, tmp_path / "backbone.safetensors")
    with pytest.raises(
        BackboneError, match=r"backbone.json: field 'shapes' does not describe a working network"
    ):
        load_pruned_backbone(tmp_path)

    spec_path.write_text(json.dumps(spec | {"architecture": "tiny_resnet"}))
    with pytest.raises(
        BackboneError, match=r"backbone.json: field 'architecture' is 'tiny_resnet'"
    ):
        load_pruned_backbone(tmp_path)


def test_prune_needs_an_expanded_teacher():
    with pytest.raises(ValueError, match="pruning needs the expanded model"):
        prune(single_teacher(), TINY_PARAMS // 2, streams(), squeeze_cfg(1), ENGINE)
