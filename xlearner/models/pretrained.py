"""Initialise a backbone from a local file of pretrained weights.

``model.pretrained_path`` (every sub-backbone of the expansion stage),
``tasks.<task>.pretrained_path`` (one task's sub-backbone) and
``squeeze.student_pretrained_path`` (the distillation student) name such a file;
:func:`init_from_pretrained` loads it, before any training step, and returns what to
record (:class:`PretrainedInfo`: the file's sha256 and what was loaded).

Accepted files (never downloaded, never unpickled as objects):

- ``.safetensors``: tensors under our names (``stem.*``, ``stages.N.*``, as
  ``backbone.safetensors`` written by ``save_backbone``) or torchvision's;
- ``.pth`` / ``.pt``: a torchvision-format state dict, read with
  ``torch.load(..., weights_only=True)``: a full pickled model is refused. A
  ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper and DDP's ``module.`` prefix
  are unwrapped.

torchvision ResNet names map onto ours: ``conv1``/``bn1`` -> ``stem.conv``/``stem.bn``,
``layerN.*`` -> ``stages.{N-1}.*`` (the blocks are torchvision's own ``BasicBlock`` /
``Bottleneck``, so the names inside a block are the same); the classifier ``fc.*`` is
ignored. The load is strict on the trunk: every tensor of the backbone's state dict
(weights and BN statistics) must be in the file with its shape, and the file may hold
nothing else; otherwise :class:`PretrainedError` names the missing, unexpected and
mis-shaped tensors and the file. Only ``num_batches_tracked`` (a BN counter, absent
from old torchvision checkpoints) may be missing; it then keeps its value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from xlearner.models.spec import BackboneError
from xlearner.store import sha256_file

SUFFIXES = (".safetensors", ".pth", ".pt")
IGNORED_PREFIXES = ("fc.",)  # torchvision's classifier
OPTIONAL_SUFFIX = "num_batches_tracked"
WRAPPER_KEYS = ("state_dict", "model")
SHOWN = 8  # names listed per kind of problem


class PretrainedError(BackboneError):
    """A pretrained file that cannot initialise the backbone; names the file and tensors."""


@dataclass(frozen=True)
class PretrainedInfo:
    """What a stage records about the weights it started from."""

    path: str  # absolute
    sha256: str
    layout: str  # "torchvision" or "xlearner": the names the file uses
    tensors_loaded: int
    ignored: tuple[str, ...]  # tensors of the file not used (torchvision's fc.*)

    def params(self, prefix: str = "pretrained") -> dict[str, Any]:
        """Flat fields for MLflow params / result.json, e.g. ``pretrained_sha256``."""
        return {
            f"{prefix}_{key}": list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
        }


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of ``path`` by name (wrappers and ``module.`` unwrapped), or a
    :class:`PretrainedError` saying why the file is not a state dict."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"weights file {path}: no such file")
    if path.suffix not in SUFFIXES:
        raise PretrainedError(
            f"weights file {path}: expected a {' or '.join(SUFFIXES)} file, "
            f"got {path.suffix or 'no suffix'!r}"
        )
    if path.suffix == ".safetensors":
        try:
            state: Any = load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise PretrainedError(
                f"weights file {path}: not a readable safetensors file ({err})"
            ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # every unpickling failure means "not a weights-only file"
            raise PretrainedError(
                f"weights file {path}: not a state dict that torch.load(weights_only=True) "
                f"can read (only tensors are loaded, never a pickled model or code): "
                f"{_load_error(err)}"
            ) from None
    if isinstance(state, Mapping):
        for key in WRAPPER_KEYS:
            if set(state) >= {key} and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise PretrainedError(
            f"weights file {path}: not a state dict: expected a mapping of tensor names "
            f"to tensors, got {_describe(state)}"
        )
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise PretrainedError(
            f"weights file {path}: not a state dict: {len(not_tensors)} entries are not "
            f"tensors, e.g. {_some(not_tensors)}"
        )
    names = [str(k) for k in state]
    if all(n.startswith("module.") for n in names):  # saved from a DDP-wrapped model
        return {n.removeprefix("module."): t for n, t in zip(names, state.values(), strict=True)}
    return dict(zip(names, state.values(), strict=True))


def is_torchvision_layout(state: Mapping[str, Tensor]) -> bool:
    return "conv1.weight" in state and any(k.startswith("layer1.") for k in state)


def torchvision_to_ours(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """torchvision ResNet names -> ours; returns (renamed tensors, ignored names)."""
    renamed: dict[str, Tensor] = {}
    ignored = []
    for key, tensor in state.items():
        if key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
            continue
        if key.startswith("conv1."):
            key = "stem.conv." + key.removeprefix("conv1.")
        elif key.startswith("bn1."):
            key = "stem.bn." + key.removeprefix("bn1.")
        elif key.startswith("layer") and key[5:6].isdigit() and key[6:7] == ".":
            key = f"stages.{int(key[5]) - 1}{key[6:]}"
        renamed[key] = tensor
    return renamed, ignored


def init_from_pretrained(backbone: nn.Module, path: str | Path) -> PretrainedInfo:
    """Start ``backbone`` from the file ``path`` (see :func:`load_weights`); returns what
    a stage records of it, the file's sha256 included."""
    path = Path(path).expanduser().resolve()
    layout, loaded, ignored = load_weights(backbone, path)
    return PretrainedInfo(
        path=str(path),
        sha256=sha256_file(path),
        layout=layout,
        tensors_loaded=loaded,
        ignored=ignored,
    )


def load_weights(backbone: nn.Module, path: str | Path) -> tuple[str, int, tuple[str, ...]]:
    """Load the file ``path`` into ``backbone`` (a ``Backbone``: ``stem`` + ``stages``)
    strictly, or raise :class:`PretrainedError` before anything is changed. Returns the
    file's layout (its tensor names), the number of tensors loaded and those ignored."""
    path = Path(path).expanduser().resolve()
    state = read_state_dict(path)
    layout = "torchvision" if is_torchvision_layout(state) else "xlearner"
    ignored: list[str] = []
    if layout == "torchvision":
        state, ignored = torchvision_to_ours(state)
    expected = backbone.state_dict()
    name = getattr(backbone, "name", type(backbone).__name__)
    missing = [k for k in expected if k not in state and not k.endswith(OPTIONAL_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} (file {list(state[k].shape)}, {name} {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{len(items)} {what}: {_some(items)}"
            for what, items in (
                (f"tensors of {name} missing from the file", missing),
                (f"tensors of the file not in {name}", unexpected),
                ("tensors of another shape", misshaped),
            )
            if items
        ]
        hint = ""
        if len(missing) == len([k for k in expected if not k.endswith(OPTIONAL_SUFFIX)]):
            hint = (
                f" (none of the trunk's tensors is in the file, so it is not a {name} backbone "
                f"in torchvision or xlearner names; it holds {_some(list(state), 4)})"
            )
        names = (
            "torchvision names, shown as ours: conv1/bn1 -> stem.conv/stem.bn, layerN -> stages.N-1"
            if layout == "torchvision"
            else "xlearner names"
        )
        raise PretrainedError(
            f"weights file {path} ({names}) do not fit backbone {name!r}: "
            + "; ".join(problems)
            + hint
        )
    backbone.load_state_dict(state, strict=False)  # every key checked above
    return layout, len(state), tuple(ignored)


def _some(names: Sequence[str], limit: int = SHOWN) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an empty mapping"
    if isinstance(value, Tensor):
        return f"a single tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _load_error(err: BaseException) -> str:
    """The reason in a torch.load error: its 'WeightsUnpickler error' (which global a
    pickled object needed), else its first line; never its advice to unpickle anyway."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please|$)", text, re.MULTILINE)
    reason = found.group(1) if found else (text.strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {reason}"
