"""The training sections: a run's hyper-parameters and how it runs on the hardware."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from xlearner.config.base import PRETRAINED_HELP, StrictModel, pretrained_file

# Upper bounds that no real run reaches and that keep a typo (1e20 steps, a batch of 1e8
# images) from starting a run that cannot finish or allocates the machine away.
MAX_STEPS = 10_000_000
MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 256


class TrainConfig(StrictModel):
    """Hyper-parameters of one training run (a task's expansion, reconciliation, squeeze)."""

    steps: int = Field(default=200, ge=1, le=MAX_STEPS)
    batch_size: int = Field(default=32, ge=1, le=MAX_BATCH_SIZE, description="images per step")
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    warmup_steps: int = Field(default=10, ge=0, le=MAX_STEPS)
    sampling: Literal["round_robin", "proportional"] = Field(
        default="round_robin",
        description="round_robin: every step takes one batch from each source; "
        "proportional: every step takes one batch from a source drawn by its size.",
    )
    grad_accum_steps: int = Field(default=1, ge=1, le=1024)


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
        return pretrained_file(path)


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
        default=4, ge=1, le=64, description="batches each worker loads ahead (with workers only)"
    )
    decode: Literal["auto", "cpu", "gpu"] = Field(
        default="cpu",
        description="where training JPEGs are decoded. gpu: the loader yields the encoded "
        "bytes and the batch is decoded, cropped, flipped and resized on the GPU (nvjpeg); "
        "auto: gpu when CUDA and torchvision's GPU JPEG decoder are available, else cpu",
    )
    log_every_steps: int = Field(default=20, ge=1, le=MAX_STEPS)
    checkpoint_every_steps: int = Field(default=50, ge=1, le=MAX_STEPS)
    eval_max_images: int = Field(default=512, ge=1, le=10_000_000)

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= MAX_WORKERS:
            raise ValueError(
                f"must be 0..{MAX_WORKERS} worker processes per stream or 'auto', got {value}"
            )
        return value
