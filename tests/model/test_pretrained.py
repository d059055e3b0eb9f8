"""Pretrained initialisation from local files: torchvision .pth and safetensors into our
backbones, strict on the trunk, clear failures; and the config fields that name the files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from xlearner.config import ConfigError, load_config
from xlearner.models import create_backbone, save_backbone
from xlearner.models.pretrained import PretrainedError, init_from_pretrained
from xlearner.tasks import TaskType

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def _ours(key: str) -> str:
    """Our name of a torchvision ResNet tensor, written out independently of the loader."""
    if key.startswith("conv1."):
        return "stem.conv." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "stem.bn." + key[len("bn1.") :]
    layer, rest = key.split(".", 1)
    return f"stages.{int(layer.removeprefix('layer')) - 1}.{rest}"


@pytest.fixture(scope="module")
def torchvision_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = torchvision.models.resnet18()  # random init: nothing downloads
    with torch.no_grad():  # BN statistics unlike a fresh backbone's (zeros / ones)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_trunk_matches(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    ours = backbone.state_dict()
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert len(trunk) == len(ours)
    for key, tensor in trunk.items():
        assert torch.equal(ours[_ours(key)], tensor), key  # bit for bit
        assert ours[_ours(key)].dtype == tensor.dtype


def _one_training_step(backbone: nn.Module) -> None:
    backbone.train()
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    loss = sum(f.square().mean() for f in backbone(images))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    after = backbone.state_dict()
    assert not torch.equal(after["stem.conv.weight"], before["stem.conv.weight"])
    assert not torch.equal(after["stages.3.1.conv2.weight"], before["stages.3.1.conv2.weight"])


def test_a_torchvision_pth_loads_into_resnet18_bit_for_bit(tmp_path, torchvision_resnet18):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet18, path)
    backbone = create_backbone("resnet18")
    info = init_from_pretrained(backbone, path)
    _assert_trunk_matches(backbone, torchvision_resnet18)
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.path == str(path.resolve()) and info.layout == "torchvision"
    assert info.tensors_loaded == len(torchvision_resnet18) - 2  # all but fc.weight, fc.bias
    assert info.ignored == ("fc.weight", "fc.bias")
    assert info.params()["pretrained_sha256"] == info.sha256
    _one_training_step(backbone)


def test_the_mapping_is_the_same_network_as_torchvisions(tmp_path, torchvision_resnet18):
    """Our C5 on [0, 1] images = torchvision's layer4 on ImageNet-normalised ones."""
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet18, path)
    backbone = create_backbone("resnet18")
    init_from_pretrained(backbone, path)
    reference = torchvision.models.resnet18()
    reference.load_state_dict(torchvision_resnet18)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        r = reference.eval()
        x = r.maxpool(r.relu(r.bn1(r.conv1((images - mean) / std))))
        expected = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        got = backbone.eval()(images)[3]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_safetensors_file_loads_the_same(tmp_path, torchvision_resnet18):
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision_resnet18.items()}, path)
    backbone = create_backbone("resnet18")
    info = init_from_pretrained(backbone, path)
    _assert_trunk_matches(backbone, torchvision_resnet18)
    assert info.layout == "torchvision"
    _one_training_step(backbone)


def test_our_own_backbone_file_and_wrapped_ddp_checkpoints_load(tmp_path, torchvision_resnet18):
    source = create_backbone("resnet18")
    init_from_pretrained(source, _saved(tmp_path / "a.pth", torchvision_resnet18))
    save_backbone(source, tmp_path / "ours")
    target = create_backbone("resnet18")
    info = init_from_pretrained(target, tmp_path / "ours" / "backbone.safetensors")
    assert info.layout == "xlearner" and info.ignored == ()
    _assert_trunk_matches(target, torchvision_resnet18)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in torchvision_resnet18.items()}}
    target = create_backbone("resnet18")
    init_from_pretrained(target, _saved(tmp_path / "ddp.pt", wrapped))
    _assert_trunk_matches(target, torchvision_resnet18)


def _saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_resnet18_weights_into_resnet50_fail_with_the_tensor_names(tmp_path, torchvision_resnet18):
    path = _saved(tmp_path / "resnet18.pth", torchvision_resnet18)
    backbone = create_backbone("resnet50")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(PretrainedError) as err:
        init_from_pretrained(backbone, path)
    message = str(err.value)
    assert str(path) in message and "'resnet50'" in message
    assert "missing from the file" in message and "stages.0.0.conv3.weight" in message
    # resnet18's layer1.0.conv1 is 3x3 64->64; resnet50's is 1x1 64->64
    assert "stages.0.0.conv1.weight (file [64, 64, 3, 3], resnet50 [64, 64, 1, 1])" in message
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # untouched


def test_an_extra_or_missing_trunk_tensor_fails(tmp_path, torchvision_resnet18):
    extra = dict(torchvision_resnet18, **{"layer5.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(PretrainedError, match=r"1 tensors of the file not in resnet18: stages\.4"):
        init_from_pretrained(create_backbone("resnet18"), _saved(tmp_path / "x.pth", extra))
    missing = {k: v for k, v in torchvision_resnet18.items() if k != "layer4.1.bn2.running_var"}
    with pytest.raises(
        PretrainedError, match=r"missing from the file: stages\.3\.1\.bn2\.running_var"
    ):
        init_from_pretrained(create_backbone("resnet18"), _saved(tmp_path / "m.pth", missing))
    # Old torchvision checkpoints lack the BN counters: allowed.
    old = {k: v for k, v in torchvision_resnet18.items() if not k.endswith("num_batches_tracked")}
    init_from_pretrained(create_backbone("resnet18"), _saved(tmp_path / "old.pth", old))


@pytest.mark.parametrize(
    ("name", "content", "hint"),
    [
        ("notes.pth", b"hello, not a checkpoint", "weights_only=True"),
        ("list.pth", [torch.zeros(2)], "not a state dict: expected a mapping"),
        ("tensor.pt", torch.zeros(3), "a single tensor of shape [3]"),
        ("mixed.pt", {"conv1.weight": torch.zeros(1), "epoch": 3}, "1 entries are not tensors"),
        ("model.pth", "module", "Unsupported global"),  # a pickled nn.Module: refused
        ("broken.safetensors", b"\x00\x01garbage", "not a readable safetensors file"),
        ("weights.bin", b"", "expected a .safetensors or .pth or .pt file"),
        ("random.safetensors", {"a.weight": torch.zeros(2)}, "none of the trunk's tensors"),
    ],
)
def test_a_file_that_is_not_a_state_dict_fails_clearly(tmp_path, name, content, hint):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "module":
        torch.save(nn.Linear(2, 2), path)
    elif path.suffix == ".safetensors":
        save_file(content, path)
    else:
        torch.save(content, path)
    with pytest.raises(PretrainedError) as err:
        init_from_pretrained(create_backbone("tiny_resnet"), path)
    assert str(path) in str(err.value) and hint in str(err.value)
    assert "arbitrary code" not in str(err.value)  # torch's advice to unpickle is not passed on


def test_a_missing_file_fails(tmp_path):
    with pytest.raises(PretrainedError, match="no such file"):
        init_from_pretrained(create_backbone("tiny_resnet"), tmp_path / "nowhere.pth")
    assert issubclass(PretrainedError, ValueError)  # a stage maps it to a config/input error


# --- config -------------------------------------------------------------------------------


def test_pretrained_paths_in_the_config():
    cfg = load_config(
        QUICKSTART,
        [
            "model.pretrained_path=/w/all.safetensors",
            "tasks.det.pretrained_path=/w/det.pth",
            "squeeze.student_pretrained_path=/w/student.pt",
        ],
    )
    assert cfg.pretrained_path_for(TaskType.det) == "/w/det.pth"
    assert cfg.pretrained_path_for(TaskType.cls) == "/w/all.safetensors"
    assert cfg.pretrained_path_for(None) == "/w/all.safetensors"  # hard sharing: the model's
    assert cfg.squeeze.student_pretrained_path == "/w/student.pt"
    assert cfg.tasks[TaskType.cls].steps == 160  # the quickstart's own per-task fields stay
    assert load_config(QUICKSTART).pretrained_path_for(TaskType.cls) is None


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ("reconcile.train.pretrained_path=/w/a.pth", "reconcile.train.pretrained_path", "Extra"),
        ("squeeze.train.pretrained_path=/w/a.pth", "squeeze.train.pretrained_path", "Extra"),
        ("tasks.cls.pretrained_path=/w/a.bin", "tasks.cls.pretrained_path", ".safetensors"),
        ("model.pretrained_path=/w/a.txt", "model.pretrained_path", ".pth"),
    ],
)
def test_pretrained_path_is_only_valid_where_it_is_read(override, field, hint):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert field in str(err.value) and hint in str(err.value)
