"""Backbones: shapes and strides, sizes, the safetensors round trip and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xlearner.models.backbone import count_parameters, load_backbone_weights, save_backbone
from xlearner.models.loading import load_backbone
from xlearner.models.registry import available_backbones, create_backbone
from xlearner.models.spec import BackboneError

EXPECTED_CHANNELS = {
    "tiny_resnet": (16, 32, 64, 128),
    "resnet18": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "half_resnet50": (128, 256, 512, 1024),
}


def test_registry_lists_every_backbone_and_rejects_unknown_names():
    assert set(EXPECTED_CHANNELS) <= set(available_backbones())
    with pytest.raises(ValueError, match="unknown backbone 'resnet7'.*tiny_resnet"):
        create_backbone("resnet7")


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
def test_features_have_the_declared_channels_at_strides_4_to_32(name):
    torch.manual_seed(0)
    backbone = create_backbone(name).eval()
    size = 32 if name == "resnet50" else 64
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, size, size))
    assert backbone.name == name
    assert backbone.channels == EXPECTED_CHANNELS[name]
    assert len(backbone.stages) == 4
    assert [f.shape[1] for f in features] == list(EXPECTED_CHANNELS[name])
    assert [size // f.shape[-1] for f in features] == [4, 8, 16, 32]
    assert [size // f.shape[-2] for f in features] == [4, 8, 16, 32]


def test_half_resnet50_has_about_a_quarter_of_resnet50_parameters():
    ratio = count_parameters(create_backbone("half_resnet50")) / count_parameters(
        create_backbone("resnet50")
    )
    assert 0.22 < ratio < 0.28


def test_stem_normalises_0_1_images_with_imagenet_statistics():
    stem = create_backbone("tiny_resnet").stem.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        unnormalised = stem.maxpool(stem.relu(stem.bn(stem.conv((x - mean) / std))))
        assert torch.allclose(stem(x), unnormalised, atol=1e-6)
    # The constants are not checkpoint state.
    assert "stem.mean" not in create_backbone("tiny_resnet").state_dict()


def _trained_like(name: str = "tiny_resnet") -> torch.nn.Module:
    """A backbone whose BN statistics and weights differ from a fresh one."""
    torch.manual_seed(1)
    backbone = create_backbone(name)
    backbone.train()
    backbone(torch.rand(4, 3, 64, 64))  # moves BN running statistics
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return backbone.eval()


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    backbone = _trained_like()
    spec = save_backbone(backbone, tmp_path / "bb")
    assert spec == json.loads((tmp_path / "bb" / "backbone.json").read_text())
    assert spec["format"] == "xlearner-backbone/1"
    assert spec["architecture"] == "tiny_resnet"
    assert spec["channels"] == [16, 32, 64, 128]
    assert spec["num_parameters"] == count_parameters(backbone)
    x = torch.rand(2, 3, 64, 64)
    for path in (tmp_path / "bb", tmp_path / "bb" / "backbone.safetensors"):
        loaded = load_backbone(path).eval()
        with torch.no_grad():
            for a, b in zip(backbone(x), loaded(x), strict=True):
                assert torch.equal(a, b)
    assert not list((tmp_path / "bb").glob(".*tmp*")), "temporary files left behind"


def test_extra_spec_fields_are_written_to_the_json(tmp_path):
    spec = save_backbone(create_backbone("tiny_resnet"), tmp_path, extra_spec={"trunk": {"k": 1}})
    assert (
        json.loads((tmp_path / "backbone.json").read_text())["trunk"] == {"k": 1} == spec["trunk"]
    )
    assert load_backbone(tmp_path).name == "tiny_resnet"


def test_create_backbone_initialises_from_a_local_file(tmp_path):
    backbone = _trained_like()
    save_backbone(backbone, tmp_path)
    fresh = create_backbone("tiny_resnet", weights=tmp_path / "backbone.safetensors")
    for key, value in backbone.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_torchvision_resnet_state_dicts_load_by_renaming(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    reference = resnet18().eval()  # random init; no download
    file = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), file)
    backbone = create_backbone("resnet18", weights=file).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        normalised = (x - backbone.stem.mean) / backbone.stem.std
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(normalised))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(stem))))
        assert torch.allclose(backbone(x)[-1], expected, atol=1e-6)


def test_load_rejects_a_folder_without_backbone_json(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / "backbone.safetensors")
    with pytest.raises(BackboneError, match=r"backbone\.json is missing"):
        load_backbone(tmp_path)


def test_load_rejects_a_json_of_another_format(tmp_path):
    save_backbone(create_backbone("tiny_resnet"), tmp_path)
    (tmp_path / "backbone.json").write_text(json.dumps({"format": "xlearner-model/1"}))
    with pytest.raises(BackboneError, match=r"backbone\.json.*'format' is 'xlearner-model/1'"):
        load_backbone(tmp_path)


def test_load_rejects_an_unknown_architecture(tmp_path):
    save_backbone(create_backbone("tiny_resnet"), tmp_path)
    spec = json.loads((tmp_path / "backbone.json").read_text())
    (tmp_path / "backbone.json").write_text(json.dumps({**spec, "architecture": "vit_b"}))
    with pytest.raises(BackboneError, match="unknown architecture 'vit_b'"):
        load_backbone(tmp_path)


def test_load_rejects_a_safetensors_file_of_something_else(tmp_path):
    file = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3)}, file)
    with pytest.raises(
        BackboneError, match=rf"{file}.*not a tiny_resnet backbone.*encoder\.weight"
    ):
        load_backbone_weights(create_backbone("tiny_resnet"), file)


def test_load_names_the_file_and_the_missing_tensors(tmp_path):
    save_backbone(create_backbone("tiny_resnet"), tmp_path)
    file: Path = tmp_path / "backbone.safetensors"
    tensors = load_file(file)
    del tensors["stages.3.0.conv2.weight"]
    save_file(tensors, file)
    with pytest.raises(
        BackboneError,
        match=rf"{file}.*1 tensors of tiny_resnet missing.*stages\.3\.0\.conv2\.weight",
    ):
        load_backbone(tmp_path)


def test_load_names_the_file_the_tensor_and_both_shapes_on_mismatch(tmp_path):
    save_backbone(create_backbone("tiny_resnet"), tmp_path)
    file = tmp_path / "backbone.safetensors"
    tensors = load_file(file)
    tensors["stem.conv.weight"] = torch.zeros(8, 3, 7, 7)
    save_file(tensors, file)
    with pytest.raises(
        BackboneError,
        match=rf"{file}.*stem\.conv\.weight \(file \[8, 3, 7, 7\], tiny_resnet \[16, 3, 7, 7\]\)",
    ):
        load_backbone(tmp_path)


def test_load_rejects_extra_tensors_and_unreadable_files(tmp_path):
    save_backbone(create_backbone("tiny_resnet"), tmp_path)
    file = tmp_path / "backbone.safetensors"
    save_file({**load_file(file), "head.weight": torch.zeros(2)}, file)
    with pytest.raises(
        BackboneError, match=r"1 tensors of the file not in tiny_resnet: head\.weight"
    ):
        load_backbone(tmp_path)
    file.write_bytes(b"not safetensors")
    with pytest.raises(BackboneError, match=rf"{file}: not a readable safetensors file"):
        load_backbone(tmp_path)
    with pytest.raises(BackboneError, match="not a backbone"):
        load_backbone(tmp_path / "weights.bin")
