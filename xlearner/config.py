"""The pipeline configuration: pydantic models loaded from YAML, with ``--set`` overrides.

Everything a run needs is in one :class:`PipelineConfig`. It is validated when it is
loaded, so a bad field fails before any data is read or any model is trained, with the
dotted path of the field and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xlearner.tasks import LABEL_TASK_OF_FORMAT, SELF_SUPERVISED, SourceFormat, TaskType

NAME_PATTERN = r"^[a-z0-9][a-z0-9_\-]*$"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the field."""


def _registered_backbone(name: str) -> str:
    """``name`` if the backbone registry has it (imported here: torch loads only when needed)."""
    from xlearner.models.registry import available_backbones

    if name not in available_backbones():
        raise ValueError(f"unknown backbone {name!r}; available: {available_backbones()}")
    return name


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(StrictModel):
    """One labelled (or unlabelled) data set. ``uri`` is a local folder or ``s3://``."""

    name: str = Field(pattern=NAME_PATTERN)
    format: SourceFormat
    uri: str
    tasks: list[TaskType] | None = Field(
        default=None,
        description="Tasks this source feeds; default: the task of its label type "
        "(mim + contrastive for an unlabeled source).",
    )
    val_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    skip_invalid: bool = False
    loss_weight: float = Field(default=1.0, gt=0.0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _check_tasks(self) -> SourceConfig:
        tasks = self.resolved_tasks
        label_task = LABEL_TASK_OF_FORMAT.get(self.format)
        for task in tasks:
            if task not in SELF_SUPERVISED and task != label_task:
                allowed = sorted(
                    {*(t.value for t in SELF_SUPERVISED), *([label_task] if label_task else [])}
                )
                raise ValueError(
                    f"source {self.name!r} has format {self.format.value!r} and cannot feed task "
                    f"{task.value!r}; allowed: {allowed}"
                )
        return self

    @property
    def resolved_tasks(self) -> list[TaskType]:
        if self.tasks is not None:
            return list(self.tasks)
        if self.format == SourceFormat.unlabeled:
            return [TaskType.mim, TaskType.contrastive]
        return [LABEL_TASK_OF_FORMAT[self.format]]


class DownstreamConfig(StrictModel):
    """A held-out data set used only to evaluate transfer."""

    name: str = Field(pattern=NAME_PATTERN)
    format: Literal[SourceFormat.cls, SourceFormat.det, SourceFormat.seg]
    uri: str
    val_fraction: float = Field(default=0.3, gt=0.0, lt=1.0)
    split_seed: int = 0


class TrainConfig(StrictModel):
    """Hyper-parameters of one training run (a task's expansion, reconciliation, squeeze)."""

    steps: int = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=1)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    warmup_steps: int = Field(default=10, ge=0)
    sampling: Literal["round_robin", "proportional"] = Field(
        default="round_robin",
        description="round_robin: every step takes one batch from each source; "
        "proportional: every step takes one batch from a source drawn by its size.",
    )
    grad_accum_steps: int = Field(default=1, ge=1)


PRETRAINED_SUFFIXES = (".safetensors", ".pth", ".pt")
PRETRAINED_HELP = (
    "Local file of backbone weights: a .safetensors file or a torchvision-format ResNet "
    "state dict (.pth/.pt, read with torch.load(weights_only=True): tensors only, never a "
    "pickled model); torchvision names (conv1, bn1, layer1..4) are mapped, fc.* ignored, "
    "and every trunk tensor must be present with its shape (xlearner/models/pretrained.py)."
)


def _pretrained_file(path: str | None) -> str | None:
    if path is not None and not path.endswith(PRETRAINED_SUFFIXES):
        raise ValueError(
            f"{path!r}: expected a local {' or '.join(PRETRAINED_SUFFIXES)} file of weights"
        )
    return path


class TaskTrainConfig(TrainConfig):
    """A task's expansion run (``tasks.<task>``): its hyper-parameters and initialisation."""

    pretrained_path: str | None = Field(
        default=None,
        description="Initialise this task's sub-backbone from this file instead of "
        f"model.pretrained_path. {PRETRAINED_HELP}",
    )

    @field_validator("pretrained_path")
    @classmethod
    def _pretrained_suffix(cls, path: str | None) -> str | None:
        return _pretrained_file(path)


class EngineConfig(StrictModel):
    """How training runs on the hardware; the same for every stage."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    num_workers: int | Literal["auto"] = Field(
        default="auto",
        description="DataLoader worker processes per stream. auto: this stage's share of the "
        "cores (os.sched_getaffinity / XLEARNER_PARALLEL_STAGES, else OMP_NUM_THREADS) split "
        "among its streams on CUDA; 0 on CPU, where the workers would compete with the "
        "training threads for the same cores (docs/benchmarks.md, data loading)",
    )
    prefetch_factor: int = Field(
        default=4, ge=1, description="batches each worker loads ahead (with workers only)"
    )
    decode: Literal["auto", "cpu", "gpu"] = Field(
        default="cpu",
        description="where training JPEGs are decoded. gpu: the loader yields the encoded "
        "bytes and the batch is decoded, cropped, flipped and resized on the GPU (nvjpeg); "
        "auto: gpu when CUDA and torchvision's GPU JPEG decoder are available, else cpu",
    )
    log_every_steps: int = Field(default=20, ge=1)
    checkpoint_every_steps: int = Field(default=50, ge=1)
    eval_max_images: int = Field(default=512, ge=1)

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"must be >= 0 or 'auto', got {value}")
        return value


class IngestConfig(StrictModel):
    """How sources are packed into shards (docs/data.md, "Ingest")."""

    max_side: int | None = Field(
        default=None,
        ge=32,
        description="re-encode images whose longer side exceeds this to that side (boxes "
        "scaled, masks NEAREST), so shards decode faster; e.g. 320 for 224 px training. "
        "None: keep the images as they are. Part of the version.",
    )


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
        return _pretrained_file(path)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        return _registered_backbone(name)


class MIMHeadConfig(StrictModel):
    mask_ratio: float = Field(default=0.6, gt=0, lt=1, description="share of patches masked")
    patch_size: int | None = Field(
        default=None, ge=1, description="side of a masked patch in pixels; default image_size // 8"
    )


class ContrastiveHeadConfig(StrictModel):
    projection_dim: int = Field(default=128, ge=1)
    hidden_dim: int | None = Field(
        default=None, ge=1, description="projection MLP width; default: the C5 channels"
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


class ReconcileConfig(StrictModel):
    mode: Literal["full", "same_level", "none"] = Field(
        default="full",
        description="full: gamma from the same and all lower levels of every task; "
        "same_level: only j == i (ablation); none: no reconciliation layers.",
    )
    detach_other_tasks: bool = True
    receive_stages: list[int] = Field(
        default=[1, 2, 3],
        description="Stages i (1..4 = C2..C5) that receive gammas. Default 1-3, as the public "
        "cross-task layers this design follows (gv-benchmark's Cross_Conv_HRNet_Layer): with "
        "ResNet-50 sub-backbones the gammas into stage 4 (2048 channels, 3x3 stride-2 convs "
        "from every task's lower levels) are 80% of the conv gamma parameters (four tasks: "
        "794 M with stage 4, 158 M without, beside 94 M of sub-backbones). 4 stays selectable.",
    )
    gamma: Literal["conv", "light"] = Field(
        default="conv",
        description="conv: a strided 3x3 chain into a higher stage (gv-benchmark, HRNet-style); "
        "light: average-pool to the target stride, then 1x1 conv + BN (about 1/5 of the conv "
        "gamma parameters for ResNet-50 into stages 1-3). Both: 1x1 conv + BN within a stage, "
        "last BN zero-initialised (the expanded model starts as the sub-backbones).",
    )
    max_gamma_ratio: float | None = Field(
        default=None,
        gt=0,
        description="Cap on gamma cost / sub-backbones' cost, the larger of the parameter "
        "and the per-image FLOP ratio (at model.image_size), checked before training; the "
        "error lists the options that fit. None: no cap.",
    )
    train: TrainConfig = TrainConfig(steps=200)

    @field_validator("receive_stages")
    @classmethod
    def _stages_in_range(cls, stages: list[int]) -> list[int]:
        bad = [s for s in stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"receive_stages must be within 1..4 (C2..C5); got {bad}")
        return sorted(set(stages))


class SqueezeConfig(StrictModel):
    method: Literal["distill", "prune"] = "distill"
    student: str | None = Field(
        default=None, description="Student backbone; default: model.backbone"
    )
    student_pretrained_path: str | None = Field(
        default=None,
        description=f"Initialise the distillation student from this file; None: random "
        f"init. {PRETRAINED_HELP}",
    )
    levels: list[int] = Field(default=[4], description="Feature levels matched (1..4 = C2..C5)")
    task_loss_weight: float = Field(default=0.0, ge=0)
    target_weights: dict[TaskType, float] = Field(
        default_factory=dict,
        description="Weight of each task's sub-backbone in the FitNet sum (default 1 each), "
        "e.g. {mim: 0.5, contrastive: 0.5}",
    )
    train: TrainConfig = TrainConfig(steps=200)

    @field_validator("levels")
    @classmethod
    def _levels_in_range(cls, levels: list[int]) -> list[int]:
        bad = [s for s in levels if s not in (1, 2, 3, 4)]
        if bad or not levels:
            raise ValueError(f"levels must be a non-empty subset of 1..4 (C2..C5); got {levels}")
        return sorted(set(levels))

    @field_validator("target_weights")
    @classmethod
    def _non_negative(cls, weights: dict[TaskType, float]) -> dict[TaskType, float]:
        negative = sorted(t.value for t, w in weights.items() if w < 0)
        if negative:
            raise ValueError(f"weights must be >= 0; negative for {negative}")
        return weights

    @field_validator("student_pretrained_path")
    @classmethod
    def _pretrained_suffix(cls, path: str | None) -> str | None:
        return _pretrained_file(path)

    @field_validator("student")
    @classmethod
    def _known_student(cls, name: str | None) -> str | None:
        return None if name is None else _registered_backbone(name)


class TransferConfig(StrictModel):
    probe_l2: list[float] = Field(default=[1e-4, 1e-3, 1e-2, 1e-1])
    probe_max_iter: int = Field(default=200, ge=1)
    finetune: TrainConfig = TrainConfig(steps=100)


class Variant(StrEnum):
    """The paper's comparisons (METHOD.md): what the pipeline trains and squeezes."""

    xlearner = "xlearner"
    hard_sharing = "hard_sharing"
    no_reconciliation = "no_reconciliation"
    squeeze_expansion = "squeeze_expansion"
    xlearner_pp = "xlearner_pp"
    prune = "prune"
    single_task = "single_task"
    no_ssl = "no_ssl"  # X-Learner with the self-supervised tasks left out


class DockerRunnerConfig(StrictModel):
    image: str = "xlearner-stage:latest"
    gpus: int = Field(default=0, description="0: no GPU request; -1: all GPUs; N: N GPUs")
    shm_size: str = "2g"
    network_mode: str = "host"
    user: str = Field(default="10001:10001", description="uid:gid in the container (non-root)")
    timeout_s: int = Field(default=24 * 3600, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    volumes: list[str] = Field(default_factory=list, description="host:container[:mode] binds")
    env_passthrough: list[str] = Field(
        default_factory=lambda: [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "MLFLOW_TRACKING_URI",
            "MLFLOW_S3_ENDPOINT_URL",
        ]
    )


class RunnerConfig(StrictModel):
    kind: Literal["process", "docker"] = "process"
    warm_start: bool = Field(
        default=True,
        description="process runner: fork stages from an interpreter that has imported them "
        "(saves seconds of imports per stage); off: a new `python -m stages.<name>` each",
    )
    docker: DockerRunnerConfig = DockerRunnerConfig()


class StoreConfig(StrictModel):
    uri: str = Field(default=".xlearner/store", description="Local folder or s3://bucket/prefix")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint; default: AWS_ENDPOINT_URL or AWS"
    )


class TrackingConfig(StrictModel):
    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; default: MLFLOW_TRACKING_URI or a local SQLite file",
    )
    experiment: str = "xlearner"
    register_model: str = "xlearner-backbone"


class SynthConfig(StrictModel):
    """Synthetic sources generated on first use (the quick start and the tests)."""

    enabled: bool = False
    out: str = ".xlearner/data"
    seed: int = 0
    images_per_source: int = Field(default=240, ge=8)
    image_size: int = Field(default=64, ge=32)


class PipelineConfig(StrictModel):
    name: str = Field(default="xlearner", pattern=NAME_PATTERN)
    seed: int = 0
    variant: Variant = Variant.xlearner
    compare: list[Variant] = Field(
        default_factory=list,
        description="Extra variants trained and evaluated beside `variant` for the report.",
    )
    sources: list[SourceConfig]
    downstream: list[DownstreamConfig] = Field(default_factory=list)
    model: ModelConfig = ModelConfig()
    heads: HeadsConfig = HeadsConfig()
    tasks: dict[TaskType, TaskTrainConfig] = Field(
        default_factory=dict,
        description="Per-task hyper-parameters (and pretrained_path) of the expansion stage.",
    )
    reconcile: ReconcileConfig = ReconcileConfig()
    squeeze: SqueezeConfig = SqueezeConfig()
    transfer: TransferConfig = TransferConfig()
    engine: EngineConfig = EngineConfig()
    ingest: IngestConfig = IngestConfig()
    store: StoreConfig = StoreConfig()
    tracking: TrackingConfig = TrackingConfig()
    runner: RunnerConfig = RunnerConfig()
    synth: SynthConfig = SynthConfig()

    @model_validator(mode="after")
    def _check_pipeline(self) -> PipelineConfig:
        if not self.sources:
            raise ValueError("sources: at least one source is needed")
        names = [s.name for s in self.sources] + [d.name for d in self.downstream]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique across sources and downstream: {dupes}")
        fed = set(self.task_types)
        orphan = sorted(t.value for t in self.tasks if t not in fed)
        if orphan:
            raise ValueError(
                f"tasks: {orphan} have hyper-parameters but no source feeds them; "
                f"tasks fed by the sources: {sorted(t.value for t in fed)}"
            )
        unweighed = sorted(t.value for t in self.squeeze.target_weights if t not in fed)
        if unweighed:
            raise ValueError(
                f"squeeze.target_weights: {unweighed} are not tasks of this pipeline; "
                f"tasks fed by the sources: {sorted(t.value for t in fed)}"
            )
        ssl_variants = [v for v in (self.variant, *self.compare) if v == Variant.no_ssl]
        if ssl_variants and not fed & SELF_SUPERVISED:
            raise ValueError(
                "variant no_ssl compares X-Learner with and without the self-supervised tasks, "
                "but no source feeds mim or contrastive; add an unlabeled source or "
                "`tasks: [<label task>, contrastive]` to a source"
            )
        if ssl_variants and not set(self.without_ssl().task_types):
            raise ValueError("variant no_ssl: every source feeds only self-supervised tasks")
        return self

    def without_ssl(self) -> PipelineConfig:
        """This config minus the self-supervised tasks (and the sources that fed only them)."""

        def supervised(per_task: dict[TaskType, Any]) -> dict[TaskType, Any]:
            return {t: v for t, v in per_task.items() if t not in SELF_SUPERVISED}

        sources = []
        for source in self.sources:
            tasks = [t for t in source.resolved_tasks if t not in SELF_SUPERVISED]
            if tasks:
                sources.append(source.model_copy(update={"tasks": tasks}))
        weights = supervised(self.squeeze.target_weights)
        return self.model_copy(
            update={
                "sources": sources,
                "tasks": supervised(self.tasks),
                "squeeze": self.squeeze.model_copy(update={"target_weights": weights}),
                "variant": Variant.xlearner,
                "compare": [],
            }
        )

    @property
    def task_types(self) -> list[TaskType]:
        """Tasks fed by the sources, in a stable order: one sub-backbone each."""
        seen: list[TaskType] = []
        for source in self.sources:
            for task in source.resolved_tasks:
                if task not in seen:
                    seen.append(task)
        return sorted(seen, key=list(TaskType).index)

    def sources_for(self, task: TaskType) -> list[SourceConfig]:
        return [s for s in self.sources if task in s.resolved_tasks]

    def train_config(self, task: TaskType) -> TaskTrainConfig:
        return self.tasks.get(task, TaskTrainConfig())

    def pretrained_path_for(self, task: TaskType) -> str | None:
        """The file task ``task``'s sub-backbone starts from (None: random init)."""
        return self.train_config(task).pretrained_path or self.model.pretrained_path

    @property
    def student_backbone(self) -> str:
        return self.squeeze.student or self.model.backbone


def hash_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set squeeze.method=prune")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, path[: i + 1])]
            else:
                node = node.setdefault(part, {})
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(node, last, path)] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, part: str, path: list[str]) -> int:
    """List items are addressed by index or by their ``name`` (``sources.shapes.val_fraction``)."""
    if part.isdigit():
        return int(part)
    for i, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise ConfigError(f"--set {'.'.join(path)}: no list item named {part!r}")


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], origin: str = "<dict>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML (or JSON) config file, apply ``key=value`` overrides, validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: top level must be a mapping, got {type(data).__name__}"
        )
    data = apply_overrides(data, overrides or [])
    return validate_config(data, origin=str(path))
