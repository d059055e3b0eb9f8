"""What every config section shares: the strict base model and the common field checks."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

NAME_PATTERN = r"^[a-z0-9][a-z0-9_\-]*$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def registered_backbone(name: str) -> str:
    """``name`` if the backbone registry has it (imported here: torch loads only when needed)."""
    from xlearner.models.registry import available_backbones

    if name not in available_backbones():
        raise ValueError(f"unknown backbone {name!r}; available: {available_backbones()}")
    return name


PRETRAINED_SUFFIXES = (".safetensors", ".pth", ".pt")
PRETRAINED_HELP = (
    "Local file of backbone weights: a .safetensors file or a torchvision-format ResNet "
    "state dict (.pth/.pt, read with torch.load(weights_only=True): tensors only, never a "
    "pickled model); torchvision names (conv1, bn1, layer1..4) are mapped, fc.* ignored, "
    "and every trunk tensor must be present with its shape (xlearner/models/pretrained.py)."
)


def pretrained_file(path: str | None) -> str | None:
    if path is not None and not path.endswith(PRETRAINED_SUFFIXES):
        raise ValueError(
            f"{path!r}: expected a local {' or '.join(PRETRAINED_SUFFIXES)} file of weights"
        )
    return path
