"""ReconciledNetwork: exact start from the sub-backbones, gamma topology, gradients, detach."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from xlearner.models.backbones import Backbone, create_backbone
from xlearner.models.reconciliation import ReconciledNetwork

SIZE = 64


def _sub_backbones(wide_det: bool = False) -> dict[str, Backbone]:
    torch.manual_seed(0)
    subs = {"cls": create_backbone("tiny_resnet"), "det": create_backbone("tiny_resnet")}
    if wide_det:
        subs["det"] = create_backbone("resnet18")
    subs["seg"] = create_backbone("tiny_resnet")
    return subs


def _images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _last_bns(network: ReconciledNetwork) -> list[nn.BatchNorm2d]:
    return [gamma[-1] for gamma in network.gammas.values()]


@pytest.mark.parametrize("mode", ["full", "same_level", "none"])
@pytest.mark.parametrize("train", [False, True])
def test_zero_init_gives_exactly_the_sub_backbones_features(mode, train):
    subs = _sub_backbones()
    references = copy.deepcopy(subs)
    network = ReconciledNetwork(subs, mode=mode).train(train)
    x = _images()
    with torch.no_grad():
        outputs = network(x)
        for task, reference in references.items():
            for got, expected in zip(outputs[task], reference.train(train)(x), strict=True):
                assert torch.equal(got, expected), (task, mode, train)


def test_full_mode_has_a_gamma_from_every_task_and_lower_or_same_level():
    network = ReconciledNetwork(_sub_backbones(), mode="full")
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


def test_only_the_last_bn_of_each_gamma_starts_at_zero():
    network = ReconciledNetwork(_sub_backbones())
    for key, gamma in network.gammas.items():
        bns = [m for m in gamma if isinstance(m, nn.BatchNorm2d)]
        assert torch.count_nonzero(bns[-1].weight) == 0 and torch.count_nonzero(bns[-1].bias) == 0
        assert all(torch.all(bn.weight == 1) for bn in bns[:-1]), key


def test_same_level_mode_has_only_same_level_gammas_and_none_mode_has_none():
    same = ReconciledNetwork(_sub_backbones(), mode="same_level")
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


@pytest.mark.parametrize(
    ("mode", "wide_det"), [("full", False), ("full", True), ("same_level", True), ("none", True)]
)
def test_output_shapes_follow_each_tasks_own_widths(mode, wide_det):
    network = ReconciledNetwork(_sub_backbones(wide_det), mode=mode)
    with torch.no_grad():
        outputs = network(_images())
    assert set(outputs) == {"cls", "det", "seg"}
    assert network.channels["det"] == ((64, 128, 256, 512) if wide_det else (16, 32, 64, 128))
    for task, features in outputs.items():
        assert [f.shape[1] for f in features] == list(network.channels[task])
        assert [SIZE // f.shape[-1] for f in features] == [4, 8, 16, 32]


def _loss(outputs: dict[str, list[torch.Tensor]], tasks) -> torch.Tensor:
    return sum(f.square().mean() for t in tasks for f in outputs[t])


def test_one_backward_pass_reaches_every_gamma():
    network = ReconciledNetwork(_sub_backbones(wide_det=True)).train()
    _loss(network(_images()), network.tasks).backward()
    for key, gamma in network.gammas.items():
        assert torch.count_nonzero(gamma[-1].weight.grad) > 0, key
        assert torch.count_nonzero(gamma[-1].bias.grad) > 0, key


def test_after_one_step_gradients_reach_the_first_layer_of_every_gamma():
    network = ReconciledNetwork(_sub_backbones()).train()
    optimizer = torch.optim.SGD(network.gammas.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        _loss(network(_images()), network.tasks).backward()
        optimizer.step()
    for key, gamma in network.gammas.items():
        assert torch.count_nonzero(gamma[0].weight.grad) > 0, key


@pytest.mark.parametrize("detach", [True, False])
def test_detach_keeps_a_tasks_loss_out_of_other_sub_backbones(detach):
    network = ReconciledNetwork(_sub_backbones(), detach_other_tasks=detach).train()
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
