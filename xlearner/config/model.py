"""The model sections: the backbone every sub-backbone is built from, and the heads' options."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from xlearner.config.base import PRETRAINED_HELP, StrictModel, pretrained_file, registered_backbone


class ModelConfig(StrictModel):
    backbone: str = "tiny_resnet"
    image_size: int = Field(default=64, ge=32, le=1024)
    pretrained_path: str | None = Field(
        default=None,
        description="Initialise every sub-backbone of the expansion stage from this file "
        f"(tasks.<task>.pretrained_path overrides it per task); None: random init. "
        f"{PRETRAINED_HELP}",
    )

    @field_validator("pretrained_path")
    @classmethod
    def _pretrained_suffix(cls, path: str | None) -> str | None:
        return pretrained_file(path)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        return registered_backbone(name)


class MIMHeadConfig(StrictModel):
    mask_ratio: float = Field(default=0.6, gt=0, lt=1, description="share of patches masked")
    patch_size: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="side of a masked patch in pixels; default image_size // 8",
    )


class ContrastiveHeadConfig(StrictModel):
    projection_dim: int = Field(default=128, ge=1, le=65_536)
    hidden_dim: int | None = Field(
        default=None, ge=1, le=65_536, description="projection MLP width; default: the C5 channels"
    )
    temperature: float = Field(default=0.2, gt=0, description="NT-Xent temperature")


class HeadsConfig(StrictModel):
    """Options of the self-supervised heads (docs/ssl.md); supervised heads have none."""

    mim: MIMHeadConfig = MIMHeadConfig()
    contrastive: ContrastiveHeadConfig = ContrastiveHeadConfig()

    def options(self, task: str) -> dict[str, Any]:
        """Keyword arguments of ``create_head`` for ``task`` ({} for supervised tasks)."""
        section = getattr(self, str(task), None)
        return section.model_dump() if isinstance(section, BaseModel) else {}
