"""The JSON specs saved beside the weights, and their pydantic schemas.

- ``backbone.json`` (beside ``backbone.safetensors``): :class:`BackboneSpec`,
  ``{"format": "xlearner-backbone/1", "architecture", "channels", "num_parameters"}``;
  a pruned backbone (:class:`PrunedBackboneSpec`) adds its unpruned ``trunk`` and the
  ``shapes`` of its tensors;
- ``model.json`` (beside ``model.safetensors``): :class:`ModelSpec`,
  ``{"format": "xlearner-model/1", "trunk", "streams", "image_size"}``.

A spec is validated where it is read, before any tensor is loaded: a missing or wrong
field fails with the file and the field named (:class:`BackboneError` for a backbone,
``ValueError`` for a model). Fields a loader does not read are kept
(``save_backbone(extra_spec=...)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from xlearner.models.registry import available_backbones
from xlearner.tasks import TaskType

BACKBONE_FORMAT = "xlearner-backbone/1"
WEIGHTS_FILE = "backbone.safetensors"
SPEC_FILE = "backbone.json"
# Written by the squeeze stage (squeeze.method: prune); load_backbone dispatches on it.
PRUNED_ARCHITECTURE = "pruned_reconciled"
MODEL_FORMAT = "xlearner-model/1"
MODEL_WEIGHTS_FILE = "model.safetensors"
MODEL_SPEC_FILE = "model.json"


class BackboneError(ValueError):
    """A backbone file that cannot be used; the message names the file and the tensor."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="allow")


SpecT = TypeVar("SpecT", bound=_Spec)


def _registered(name: str) -> str:
    if name not in available_backbones():
        raise ValueError(f"unknown backbone {name!r}; available: {available_backbones()}")
    return name


class BackboneTrunkSpec(_Spec):
    """One backbone as the trunk (a sub-backbone, hard sharing, a squeeze student)."""

    kind: Literal["backbone"]
    architecture: str

    @field_validator("architecture")
    @classmethod
    def _known(cls, architecture: str) -> str:
        return _registered(architecture)


class ReconciledTrunkSpec(_Spec):
    """The expanded model: one sub-backbone per task and the reconciliation layers."""

    kind: Literal["reconciled"]
    architectures: dict[str, str]  # task -> backbone
    mode: str
    detach_other_tasks: bool
    receive_stages: list[int]

    @field_validator("architectures")
    @classmethod
    def _known(cls, architectures: dict[str, str]) -> dict[str, str]:
        for name in architectures.values():
            _registered(name)
        return architectures


TrunkSpec = Annotated[BackboneTrunkSpec | ReconciledTrunkSpec, Field(discriminator="kind")]
TRUNK_KINDS = ("backbone", "reconciled")


class StreamSpec(_Spec):
    """One (source, task) stream: its head's task, classes and keyword arguments."""

    task: TaskType
    num_classes: int = Field(default=0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(_Spec):
    format: str
    trunk: TrunkSpec
    streams: dict[str, StreamSpec]
    image_size: int = Field(ge=1)


class BackboneSpec(_Spec):
    format: str
    architecture: str
    channels: list[int] = Field(min_length=4, max_length=4, description="C2..C5")
    num_parameters: int | None = None


class PrunedBackboneSpec(BackboneSpec):
    trunk: ReconciledTrunkSpec
    shapes: dict[str, list[int]]


def _problems(err: ValidationError) -> str:
    """``field 'a.b': what (got value)`` for every error, the union's tag left out."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        loc = [
            p for i, p in enumerate(loc) if not (i and loc[i - 1] == "trunk" and p in TRUNK_KINDS)
        ]
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] != "missing":
            shown = repr(e["input"])
            message += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        lines.append(f"field {'.'.join(loc)!r}: {message}")
    return "; ".join(lines)


def validate_spec(
    schema: type[SpecT], data: Any, path: Path, error: type[ValueError] = BackboneError
) -> SpecT:
    """``data`` (read from ``path``) as ``schema``, or ``error`` naming the file and fields."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise error(f"{path}: {_problems(err)}") from None


def _read_json(path: Path, error: type[ValueError], problem: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: {problem} ({err})") from None


def backbone_files(path: str | Path) -> tuple[Path, Path]:
    """(json, safetensors) for a backbone folder or either of its two files."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.is_dir() and path.name not in (WEIGHTS_FILE, SPEC_FILE):
        raise BackboneError(
            f"{path}: not a backbone; pass a folder holding {SPEC_FILE} and {WEIGHTS_FILE} "
            f"(written by save_backbone) or one of those two files"
        )
    return folder / SPEC_FILE, folder / WEIGHTS_FILE


def read_backbone_spec(path: str | Path) -> BackboneSpec:
    """The ``backbone.json`` of a backbone folder (or of one of its files), validated."""
    spec_path, _ = backbone_files(path)
    if not spec_path.is_file():
        raise BackboneError(f"{spec_path} is missing: not a backbone folder (see save_backbone)")
    spec = _read_json(spec_path, BackboneError, "not readable JSON")
    if not isinstance(spec, dict) or spec.get("format") != BACKBONE_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise BackboneError(
            f"{spec_path}: not a backbone spec: field 'format' is {found!r}, "
            f"expected {BACKBONE_FORMAT!r}"
        )
    return validate_spec(BackboneSpec, spec, spec_path)


def read_model_spec(path: str | Path) -> dict[str, Any]:
    """A ``model.json`` validated as :class:`ModelSpec`, as the dict that was saved."""
    path = Path(path)
    spec = _read_json(path, ValueError, "not a readable model spec")
    if not isinstance(spec, dict) or spec.get("format") != MODEL_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(
            f"{path}: not an xlearner model (format {found!r}, expected {MODEL_FORMAT!r})"
        )
    validate_spec(ModelSpec, spec, path, ValueError)
    return spec
