"""ReconciledNetwork: exact start from the sub-backbones, gamma topology, gradients, detach;
the two gamma kinds, their cost (against hand-computed counts) and the budget check."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

from xlearner.config import ReconcileConfig
from xlearner.models import Backbone, create_backbone
from xlearner.models.gamma_cost import (
    GammaBudgetError,
    check_gamma_budget,
    estimate_gamma_cost,
    gamma_cost,
)
from xlearner.models.multitask import (
    build_model,
    build_trunk,
    load_model,
    reconciled_trunk_spec,
    save_model,
)
from xlearner.models.reconciliation import ReconciledNetwork

SIZE = 64
TASKS4 = ("cls", "det", "seg", "mim")


def _sub_backbones(wide_det: bool = False) -> dict[str, Backbone]:
    torch.manual_seed(0)
    subs = {"cls": create_backbone("tiny_resnet"), "det": create_backbone("tiny_resnet")}
    if wide_det:
        subs["det"] = create_backbone("resnet18")
    subs["seg"] = create_backbone("tiny_resnet")
    return subs


def _images(batch: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _last_bns(network: ReconciledNetwork) -> list[nn.BatchNorm2d]:
    return [gamma[-1] for gamma in network.gammas.values()]


@pytest.mark.parametrize("gamma", ["conv", "light"])
@pytest.mark.parametrize("mode", ["full", "same_level", "none"])
@pytest.mark.parametrize("train", [False, True])
def test_zero_init_gives_exactly_the_sub_backbones_features(mode, train, gamma):
    subs = _sub_backbones()
    references = copy.deepcopy(subs)
    network = ReconciledNetwork(subs, mode=mode, receive_stages=(1, 2, 3, 4), gamma=gamma)
    network.train(train)
    x = _images()
    with torch.no_grad():
        outputs = network(x)
        for task, reference in references.items():
            for got, expected in zip(outputs[task], reference.train(train)(x), strict=True):
                assert torch.equal(got, expected), (task, mode, train, gamma)


def test_default_receive_stages_are_1_to_3_in_the_network_and_the_config():
    network = ReconciledNetwork(_sub_backbones())
    assert network.receive_stages == (1, 2, 3) and network.gamma == "conv"
    assert {key.split("->")[-1] for key in network.gammas} == {"1", "2", "3"}
    cfg = ReconcileConfig()
    assert cfg.receive_stages == [1, 2, 3] and cfg.gamma == "conv" and cfg.max_gamma_ratio is None
    assert ReconcileConfig(receive_stages=[4, 1, 2, 3]).receive_stages == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="gamma"):
        ReconcileConfig(gamma="heavy")
    with pytest.raises(ValueError, match="max_gamma_ratio"):
        ReconcileConfig(max_gamma_ratio=0)


def test_full_mode_has_a_gamma_from_every_task_and_lower_or_same_level():
    network = ReconciledNetwork(_sub_backbones(), mode="full", receive_stages=(1, 2, 3, 4))
    tasks = ["cls", "det", "seg"]
    expected = {
        f"{t}<-{k}:{j}->{i}"
        for t in tasks
        for k in tasks
        for i in range(1, 5)
        for j in range(1, i + 1)
        if not (k == t and j == i)  # a task's own same-level term is its stage itself
    }
    assert set(network.gammas) == expected
    assert network.tasks == tasks
    # j == i: 1x1 conv + BN; j < i: (i-j-1) [conv, BN, ReLU] + conv + BN.
    assert [type(m) for m in network.gammas["cls<-det:2->2"]] == [nn.Conv2d, nn.BatchNorm2d]
    strided = network.gammas["cls<-det:1->4"]
    assert len(strided) == 3 * 2 + 2
    assert [m.stride for m in strided if isinstance(m, nn.Conv2d)] == [(2, 2)] * 3


def test_light_gammas_pool_to_the_target_stride_then_1x1_conv_and_bn():
    network = ReconciledNetwork(_sub_backbones(), receive_stages=(1, 2, 3, 4), gamma="light")
    assert set(network.gammas) == set(
        ReconciledNetwork(_sub_backbones(), receive_stages=(1, 2, 3, 4)).gammas
    )
    same = network.gammas["cls<-det:2->2"]
    assert [type(m) for m in same] == [nn.Conv2d, nn.BatchNorm2d]
    pool, conv, bn = network.gammas["cls<-det:1->4"]
    assert isinstance(pool, nn.AvgPool2d) and (pool.kernel_size, pool.stride) == (8, 8)
    assert conv.kernel_size == (1, 1) and (conv.in_channels, conv.out_channels) == (16, 128)
    assert isinstance(bn, nn.BatchNorm2d)
    assert network.gammas["seg<-seg:2->3"][0].kernel_size == 2


def test_only_the_last_bn_of_each_gamma_starts_at_zero():
    for gamma in ("conv", "light"):
        network = ReconciledNetwork(_sub_backbones(), receive_stages=(1, 2, 3, 4), gamma=gamma)
        for key, layers in network.gammas.items():
            bns = [m for m in layers if isinstance(m, nn.BatchNorm2d)]
            assert torch.count_nonzero(bns[-1].weight) == 0
            assert torch.count_nonzero(bns[-1].bias) == 0
            assert all(torch.all(bn.weight == 1) for bn in bns[:-1]), key


def test_same_level_mode_has_only_same_level_gammas_and_none_mode_has_none():
    same = ReconciledNetwork(_sub_backbones(), mode="same_level", receive_stages=(1, 2, 3, 4))
    assert same.gammas and all(
        key.split(":")[1] in {"1->1", "2->2", "3->3", "4->4"} for key in same.gammas
    )
    assert len(same.gammas) == 3 * 2 * 4  # t, k != t, i
    none = ReconciledNetwork(_sub_backbones(), mode="none")
    assert len(none.gammas) == 0 and none.num_gamma_parameters() == 0
    assert same.num_gamma_parameters() < ReconciledNetwork(_sub_backbones()).num_gamma_parameters()


def test_receive_stages_limits_which_stages_get_gammas():
    network = ReconciledNetwork(_sub_backbones(), receive_stages=(1, 3))
    assert {key.split("->")[-1] for key in network.gammas} == {"1", "3"}
    with pytest.raises(ValueError, match="receive_stages"):
        ReconciledNetwork(_sub_backbones(), receive_stages=(0, 5))
    with pytest.raises(ValueError, match="mode"):
        ReconciledNetwork(_sub_backbones(), mode="partial")
    with pytest.raises(ValueError, match="gamma"):
        ReconciledNetwork(_sub_backbones(), gamma="heavy")


@pytest.mark.parametrize(
    ("mode", "wide_det", "gamma", "size"),
    [
        ("full", False, "conv", SIZE),
        ("full", True, "conv", SIZE),
        ("full", True, "light", SIZE),
        ("full", True, "light", 72),  # C4, C5 = 5x5, 3x3: pooling rounds up as the convs do
        ("full", False, "light", 33),
        ("same_level", True, "conv", SIZE),
        ("none", True, "conv", SIZE),
    ],
)
def test_output_shapes_follow_each_tasks_own_widths(mode, wide_det, gamma, size):
    network = ReconciledNetwork(
        _sub_backbones(wide_det), mode=mode, receive_stages=(1, 2, 3, 4), gamma=gamma
    )
    with torch.no_grad():
        outputs = network(_images(size=size))
    assert set(outputs) == {"cls", "det", "seg"}
    assert network.channels["det"] == ((64, 128, 256, 512) if wide_det else (16, 32, 64, 128))
    for task, features in outputs.items():
        assert [f.shape[1] for f in features] == list(network.channels[task])
        assert [f.shape[-1] for f in features] == [-(-size // s) for s in (4, 8, 16, 32)]


def _loss(outputs: dict[str, list[torch.Tensor]], tasks) -> torch.Tensor:
    return sum(f.square().mean() for t in tasks for f in outputs[t])


@pytest.mark.parametrize("gamma", ["conv", "light"])
def test_one_backward_pass_reaches_every_gamma(gamma):
    network = ReconciledNetwork(
        _sub_backbones(wide_det=True), receive_stages=(1, 2, 3, 4), gamma=gamma
    ).train()
    _loss(network(_images()), network.tasks).backward()
    for key, layers in network.gammas.items():
        assert torch.count_nonzero(layers[-1].weight.grad) > 0, key
        assert torch.count_nonzero(layers[-1].bias.grad) > 0, key


@pytest.mark.parametrize("gamma", ["conv", "light"])
def test_after_one_step_gradients_reach_the_first_conv_of_every_gamma(gamma):
    network = ReconciledNetwork(_sub_backbones(), receive_stages=(1, 2, 3, 4), gamma=gamma)
    network.train()
    optimizer = torch.optim.SGD(network.gammas.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        _loss(network(_images()), network.tasks).backward()
        optimizer.step()
    for key, layers in network.gammas.items():
        first_conv = next(m for m in layers if isinstance(m, nn.Conv2d))
        assert torch.count_nonzero(first_conv.weight.grad) > 0, key


@pytest.mark.parametrize("detach", [True, False])
def test_detach_keeps_a_tasks_loss_out_of_other_sub_backbones(detach):
    network = ReconciledNetwork(
        _sub_backbones(), detach_other_tasks=detach, receive_stages=(1, 2, 3, 4)
    ).train()
    with torch.no_grad():  # zero-init would block the gradient regardless of detach
        for bn in _last_bns(network):
            bn.weight.fill_(0.5)
    _loss(network(_images()), ["cls"]).backward()
    own = network.sub_backbones["cls"]
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in own.parameters())
    for other in ("det", "seg"):
        grads = [p.grad for p in network.sub_backbones[other].parameters()]
        if detach:
            assert all(g is None for g in grads), other
        else:
            assert all(g is not None for g in grads) and any(
                torch.count_nonzero(g) > 0 for g in grads
            )


# --- the gamma kind in the model spec ---------------------------------------------------


def _model_spec(gamma: str | None) -> dict:
    trunk = reconciled_trunk_spec(
        {"cls": "tiny_resnet", "det": "tiny_resnet"}, "full", True, [1, 2, 3], gamma=gamma or "conv"
    )
    if gamma is None:
        del trunk["gamma"]  # a spec written before the gamma kinds
    return {
        "trunk": trunk,
        "streams": {
            "a:cls": {"task": "cls", "num_classes": 3},
            "b:det": {"task": "det", "num_classes": 2},
        },
        "image_size": SIZE,
    }


def test_the_gamma_kind_is_saved_in_the_spec_and_rebuilt_by_load_model(tmp_path):
    model = build_model(_model_spec("light"))
    assert model.spec["trunk"]["gamma"] == "light"
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["trunk"]["gamma"] == "light"
    loaded = load_model(tmp_path)
    assert loaded.trunk.gamma == "light"
    assert isinstance(loaded.trunk.gammas["cls<-det:1->3"][0], nn.AvgPool2d)


def test_a_spec_without_the_gamma_key_loads_as_conv(tmp_path):
    assert build_trunk(_model_spec(None)["trunk"]).gamma == "conv"
    save_model(build_model(_model_spec("conv")), tmp_path)
    spec = json.loads((tmp_path / "model.json").read_text())
    del spec["trunk"]["gamma"]
    (tmp_path / "model.json").write_text(json.dumps(spec))
    loaded = load_model(tmp_path)  # strict: the conv gammas' tensors must all match
    assert loaded.trunk.gamma == "conv"
    assert isinstance(loaded.trunk.gammas["cls<-det:1->3"][0], nn.Conv2d)


# --- cost: hand-computed for ResNet-50 x 4 tasks ----------------------------------------
# C2..C5 of ResNet-50 = 256, 512, 1024, 2048. A BN has 2 parameters per channel (weight,
# bias; its running statistics are buffers). Per target task and receiving stage i: the
# 3 other tasks' j == i gammas (1x1 conv C_i -> C_i + BN), and all 4 tasks' j < i gammas.
# conv, j < i: (i-j-1) x [3x3 C_j -> C_j + BN] then 3x3 C_j -> C_i + BN.
# light, j < i: avg-pool (no parameters), 1x1 C_j -> C_i + BN.
C = {1: 256, 2: 512, 3: 1024, 4: 2048}

CONV_STAGE_1 = 3 * (256 * 256 + 2 * 256)  # = 198,144
CONV_STAGE_2 = 3 * (512 * 512 + 2 * 512) + 4 * (9 * 256 * 512 + 2 * 512)  # = 5,512,192
CONV_STAGE_3 = (
    3 * (1024 * 1024 + 2 * 1024)  # 3->3
    + 4 * ((9 * 256 * 256 + 2 * 256) + 9 * 256 * 1024 + 2 * 1024)  # 1->3
    + 4 * (9 * 512 * 1024 + 2 * 1024)  # 2->3
)  # = 33,841,152
CONV_STAGE_4 = (
    3 * (2048 * 2048 + 2 * 2048)  # 4->4
    + 4 * (2 * (9 * 256 * 256 + 2 * 256) + 9 * 256 * 2048 + 2 * 2048)  # 1->4
    + 4 * ((9 * 512 * 512 + 2 * 512) + 9 * 512 * 2048 + 2 * 2048)  # 2->4
    + 4 * (9 * 1024 * 2048 + 2 * 2048)  # 3->4
)  # = 158,928,896
CONV_123 = 4 * (CONV_STAGE_1 + CONV_STAGE_2 + CONV_STAGE_3)  # 4 target tasks
CONV_1234 = CONV_123 + 4 * CONV_STAGE_4
LIGHT_123 = 4 * (
    3 * (256 * 256 + 2 * 256)  # stage 1: 1->1
    + 3 * (512 * 512 + 2 * 512)
    + 4 * (256 * 512 + 2 * 512)  # stage 2: 2->2, 1->2
    + 3 * (1024 * 1024 + 2 * 1024)  # stage 3: 3->3
    + 4 * (256 * 1024 + 2 * 1024)  # 1->3
    + 4 * (512 * 1024 + 2 * 1024)  # 2->3
)
# Per-image conv multiply-accumulates at 224x224: C2..C5 are 56, 28, 14, 7 pixels a side.
LIGHT_123_FLOPS = 4 * (
    3 * 256 * 256 * 56 * 56  # 1->1
    + 3 * 512 * 512 * 28 * 28
    + 4 * 256 * 512 * 28 * 28  # 2->2, 1->2 (pooled first)
    + 3 * 1024 * 1024 * 14 * 14
    + 4 * 256 * 1024 * 14 * 14
    + 4 * 512 * 1024 * 14 * 14
)
CONV_123_FLOPS = 4 * (
    3 * 256 * 256 * 56 * 56  # 1->1
    + 3 * 512 * 512 * 28 * 28
    + 4 * 9 * 256 * 512 * 28 * 28  # 2->2, 1->2
    + 3 * 1024 * 1024 * 14 * 14  # 3->3
    + 4 * (9 * 256 * 256 * 28 * 28 + 9 * 256 * 1024 * 14 * 14)  # 1->3
    + 4 * 9 * 512 * 1024 * 14 * 14  # 2->3
)
# ResNet-50 without its classifier: torchvision's count minus fc (2048 x 1000 + 1000).
RESNET50_TRUNK_PARAMS = 25_557_032 - (2048 * 1000 + 1000)  # = 23,508,032


def test_the_hand_computed_counts_are_the_figures_of_the_issue():
    assert CONV_123 == 158_205_952
    assert CONV_1234 == 793_921_536  # "about 794 M"
    assert LIGHT_123 == 31_320_064
    assert 4 * RESNET50_TRUNK_PARAMS == 94_032_128  # "94 M of sub-backbones"


@pytest.fixture(scope="module")
def resnet50_subs() -> dict[str, Backbone]:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return {task: create_backbone("resnet50") for task in TASKS4}


@pytest.mark.parametrize(
    ("gamma", "stages", "expected"),
    [
        ("conv", (1, 2, 3), CONV_123),
        ("light", (1, 2, 3), LIGHT_123),
        ("conv", (1, 2, 3, 4), CONV_1234),
    ],
)
def test_gamma_parameters_of_resnet50_x4_match_the_hand_computed_counts(
    resnet50_subs, gamma, stages, expected
):
    with torch.device("meta"):
        network = ReconciledNetwork(resnet50_subs, receive_stages=stages, gamma=gamma)
    assert network.num_gamma_parameters() == expected
    cost = gamma_cost(network, image_size=224)
    assert cost.gamma_params == expected
    assert cost.backbone_params == 4 * RESNET50_TRUNK_PARAMS
    assert cost.param_ratio == pytest.approx(expected / (4 * RESNET50_TRUNK_PARAMS))
    assert cost.num_gammas == len(network.gammas)
    # priced without building the gammas: the same numbers
    assert estimate_gamma_cost(resnet50_subs, 224, gamma=gamma, receive_stages=stages) == cost


def test_gamma_flops_of_resnet50_x4_match_the_hand_computed_counts(resnet50_subs):
    light = estimate_gamma_cost(resnet50_subs, 224, gamma="light", receive_stages=(1, 2, 3))
    conv = light.with_options(gamma="conv")
    assert light.gamma_flops == LIGHT_123_FLOPS == 11_509_170_176
    assert conv.gamma_flops == CONV_123_FLOPS == 51_791_265_792
    # The sub-backbones: torchvision's ResNet-50 minus its classifier's 2048 x 1000 MACs.
    reference = torchvision.models.resnet50()
    tv_flops = _hooked_conv_macs(reference, torch.zeros(1, 3, 224, 224))
    assert light.backbone_flops == 4 * (tv_flops - 2048 * 1000)
    assert light.flop_ratio == pytest.approx(LIGHT_123_FLOPS / light.backbone_flops)
    assert light.ratio == max(light.param_ratio, light.flop_ratio)


def _hooked_conv_macs(module: nn.Module, x: torch.Tensor, within: nn.Module | None = None) -> int:
    """Conv + linear MACs of a real forward of ``module`` (counted inside ``within``)."""
    total = 0

    def hook(layer, _inputs, output):
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            total += (
                layer.out_channels
                * layer.in_channels
                // layer.groups
                * kh
                * kw
                * output[0, 0].numel()
            )
        else:
            total += layer.in_features * layer.out_features

    layers = [m for m in (within or module).modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            module.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


@pytest.mark.parametrize(("gamma", "size"), [("conv", SIZE), ("light", SIZE), ("light", 72)])
def test_the_meta_pass_counts_what_a_real_forward_computes(gamma, size):
    network = ReconciledNetwork(
        _sub_backbones(wide_det=True), receive_stages=(1, 2, 3, 4), gamma=gamma
    )
    cost = gamma_cost(network, size)
    x = torch.zeros(1, 3, size, size)
    assert cost.gamma_flops == _hooked_conv_macs(network, x, within=network.gammas)
    assert cost.backbone_flops == _hooked_conv_macs(network, x, within=network.sub_backbones)
    assert cost.gamma_params == network.num_gamma_parameters()
    network.train()  # the pass runs in eval mode and leaves every module's mode as it was
    network.sub_backbones["cls"].stem.bn.eval()  # e.g. a frozen BN
    gamma_cost(network, size)
    assert not network.sub_backbones["cls"].stem.bn.training
    assert all(
        m.training for m in network.modules() if m is not network.sub_backbones["cls"].stem.bn
    )


def test_no_gammas_cost_nothing():
    cost = gamma_cost(ReconciledNetwork(_sub_backbones(), mode="none"), SIZE)
    assert (cost.gamma_params, cost.gamma_flops, cost.num_gammas, cost.ratio) == (0, 0, 0, 0.0)
    check_gamma_budget(cost, ReconcileConfig(max_gamma_ratio=0.01))


# --- the budget check -------------------------------------------------------------------


def test_budget_check_passes_without_a_cap_or_under_it(resnet50_subs):
    cost = estimate_gamma_cost(resnet50_subs, 224, receive_stages=(1, 2, 3, 4))
    check_gamma_budget(cost, ReconcileConfig())  # None: no cap
    check_gamma_budget(cost, ReconcileConfig(max_gamma_ratio=9.0))  # ratio 8.44


def test_budget_check_fails_with_the_numbers_and_the_options_that_fit(resnet50_subs):
    cost = estimate_gamma_cost(resnet50_subs, 224, receive_stages=(1, 2, 3, 4))
    cfg = ReconcileConfig(receive_stages=[1, 2, 3, 4], max_gamma_ratio=1.0)
    with pytest.raises(GammaBudgetError) as err:
        check_gamma_budget(cost, cfg)
    assert isinstance(err.value, ValueError)  # a stage exits 2 on it: bad input
    message = str(err.value)
    assert "reconcile.max_gamma_ratio=1.0" in message
    assert "gamma=conv, mode=full, receive_stages=[1, 2, 3, 4]" in message
    assert f"{CONV_1234:,} parameters" in message and f"{4 * RESNET50_TRUNK_PARAMS:,}" in message
    assert "224x224" in message and "parameters 8.44" in message
    options = message.split("options that fit: ")[1]
    # Light gammas into stages 1-3: params 0.33, FLOPs 0.70 -> fits; the first offered.
    assert options.startswith(
        f"reconcile.gamma=light + reconcile.receive_stages=[1, 2, 3] (ratio 0.70: {LIGHT_123:,}"
    )
    assert "reconcile.receive_stages=[1] (ratio 0.15" in options
    assert "reconcile.gamma=light (ratio" not in options  # light into 1-4: 1.50, over the cap
    assert message.endswith("or raise reconcile.max_gamma_ratio to 8.44")


def test_budget_check_says_when_nothing_lighter_fits(resnet50_subs):
    cost = estimate_gamma_cost(resnet50_subs, 224)
    with pytest.raises(GammaBudgetError, match="no lighter layout fits.*mode=none"):
        check_gamma_budget(cost, SimpleNamespace(max_gamma_ratio=0.01))
