"""What every config section shares: the strict base model and the common field checks."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

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


def local_or_s3(uri: str) -> str:
    """``uri`` if it is a local path or ``s3://bucket[/prefix]``, the two kinds of place the
    pipeline reads and writes."""
    scheme, sep, rest = uri.partition("://")
    if sep and scheme != "s3":
        raise ValueError(
            f"{uri!r}: unsupported scheme {scheme}://; use a local folder (a plain path, "
            "not file://) or s3://bucket/prefix"
        )
    if sep and not rest.split("/", 1)[0]:
        raise ValueError(f"{uri!r}: no bucket; use s3://bucket/prefix")
    if not uri.strip():
        raise ValueError("empty; use a local folder or s3://bucket/prefix")
    return uri


LocalOrS3 = Annotated[str, AfterValidator(local_or_s3)]


def pretrained_file(path: str | None) -> str | None:
    if path is not None and not path.endswith(PRETRAINED_SUFFIXES):
        raise ValueError(
            f"{path!r}: expected a local {' or '.join(PRETRAINED_SUFFIXES)} file of weights"
        )
    return path
