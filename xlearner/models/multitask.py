"""A trunk and one head per stream: the model that every training stage builds.

The trunk is either one backbone (a task's sub-backbone in expansion, the hard-sharing
baseline, a squeeze student) or a :class:`ReconciledNetwork` (the expanded model). A
*stream* is a (source, task) pair named ``"<source>:<task>"``; each has its own head.

A model is saved as ``model.safetensors`` + ``model.json`` (its spec: trunk, streams,
image size; schema :class:`~xlearner.models.spec.ModelSpec`), so any stage can rebuild
it without pickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xlearner.models.head import TaskHead
from xlearner.models.heads import create_head
from xlearner.models.reconciliation import ReconciledNetwork
from xlearner.models.registry import create_backbone
from xlearner.models.spec import MODEL_FORMAT, MODEL_SPEC_FILE, MODEL_WEIGHTS_FILE, read_model_spec
from xlearner.tasks import SELF_SUPERVISED, TaskType


def stream_name(source: str, task: str) -> str:
    return f"{source}:{task}"


class MultiTaskModel(nn.Module):
    def __init__(self, trunk: nn.Module, heads: dict[str, TaskHead], spec: dict[str, Any]):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(heads)
        self.spec = spec

    @property
    def streams(self) -> dict[str, dict]:
        return self.spec["streams"]

    def task_of(self, stream: str) -> str:
        return self.streams[stream]["task"]

    def is_self_supervised(self, stream: str) -> bool:
        return TaskType(self.task_of(stream)) in SELF_SUPERVISED

    def features(self, inputs: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Multi-level features per task (the same list for every task on a single trunk)."""
        out = self.trunk(inputs)
        if isinstance(out, dict):
            return out
        return {task: out for task in {s["task"] for s in self.streams.values()}}

    def forward(self, images: torch.Tensor, stream: str, targets: Any) -> dict[str, torch.Tensor]:
        head = self.heads[stream]
        inputs, ctx = head.prepare_inputs(images)
        feats = self.features(inputs)[self.task_of(stream)]
        return head(feats, images, targets, ctx)

    def predict(self, images: torch.Tensor, stream: str) -> Any:
        return self.heads[stream].predict(self.features(images)[self.task_of(stream)])

    def metric(self, stream: str):
        return self.heads[stream].metric()


def backbone_trunk_spec(architecture: str) -> dict:
    return {"kind": "backbone", "architecture": architecture}


def reconciled_trunk_spec(
    architectures: dict[str, str],
    mode: str,
    detach: bool,
    receive: list[int],
    gamma: str = "conv",
) -> dict:
    return {
        "kind": "reconciled",
        "architectures": architectures,
        "mode": mode,
        "detach_other_tasks": detach,
        "receive_stages": receive,
        "gamma": gamma,
    }


def build_trunk(spec: dict) -> nn.Module:
    if spec["kind"] == "backbone":
        return create_backbone(spec["architecture"])
    if spec["kind"] == "reconciled":
        subs = {task: create_backbone(arch) for task, arch in spec["architectures"].items()}
        return ReconciledNetwork(
            subs,
            mode=spec["mode"],
            detach_other_tasks=spec["detach_other_tasks"],
            receive_stages=tuple(spec["receive_stages"]),
            gamma=spec.get("gamma", "conv"),  # specs written before the gamma kinds: conv
        )
    raise ValueError(f"unknown trunk kind {spec['kind']!r}")


def trunk_channels(trunk: nn.Module, task: str) -> tuple[int, ...]:
    """C2..C5 channels of the features a task's head sees (per task on a reconciled trunk)."""
    channels = trunk.channels
    return tuple(channels[task] if isinstance(channels, dict) else channels)


def build_model(spec: dict) -> MultiTaskModel:
    """``spec`` = {"trunk": ..., "streams": {name: {"task", "num_classes", "options"?}},
    "image_size"}; ``options``: keyword arguments of the head (MIM mask ratio, ...)."""
    trunk = build_trunk(spec["trunk"])
    heads = {
        name: create_head(
            TaskType(s["task"]),
            trunk_channels(trunk, s["task"]),
            s.get("num_classes", 0),
            spec["image_size"],
            **s.get("options", {}),
        )
        for name, s in spec["streams"].items()
    }
    return MultiTaskModel(trunk, heads, spec)


def save_model(model: MultiTaskModel, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, out / MODEL_WEIGHTS_FILE)
    spec = {"format": MODEL_FORMAT, **model.spec}
    (out / MODEL_SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return [out / MODEL_WEIGHTS_FILE, out / MODEL_SPEC_FILE]


def load_model(model_dir: str | Path) -> MultiTaskModel:
    """Rebuild a model saved by :func:`save_model`; its spec is validated first (ValueError)."""
    model_dir = Path(model_dir)
    spec_path, weights_path = model_dir / MODEL_SPEC_FILE, model_dir / MODEL_WEIGHTS_FILE
    spec = read_model_spec(spec_path)
    spec.pop("format")
    model = build_model(spec)
    state = load_file(weights_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match {spec_path}: "
            f"missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}"
        )
    return model
