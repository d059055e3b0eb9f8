"""The pipeline configuration: pydantic models loaded from YAML, with ``--set`` overrides.

Everything a run needs is in one :class:`PipelineConfig`. It is validated when it is
loaded, so a bad field fails before any data is read or any model is trained, with the
dotted path of the field and what is allowed.

Import from this package (``from xlearner.config import PipelineConfig``); its modules:

- ``base``: the strict base model and the field checks the sections share;
- ``data``: sources, downstream sets, ingest, synthetic data;
- ``training``: a run's hyper-parameters, the engine;
- ``model``: the backbone and the heads' options;
- ``methods``: reconciliation, squeeze, transfer evaluation;
- ``infra``: runners, the artefact store, tracking;
- ``pipeline``: :class:`PipelineConfig` and the variants;
- ``loading``: files, overrides, validation errors, :class:`ConfigError`.

The task vocabulary (``SourceFormat``, ``TaskType``, ...) lives in :mod:`xlearner.tasks`.
"""

from __future__ import annotations

from xlearner.config.base import NAME_PATTERN, PRETRAINED_HELP, PRETRAINED_SUFFIXES, StrictModel
from xlearner.config.data import DownstreamConfig, IngestConfig, SourceConfig, SynthConfig
from xlearner.config.infra import (
    DockerRunnerConfig,
    RayRunnerConfig,
    ResourcesConfig,
    RunnerConfig,
    StageResources,
    StoreConfig,
    TrackingConfig,
)
from xlearner.config.loading import (
    ConfigError,
    apply_overrides,
    format_validation_error,
    hash_json,
    load_config,
    parse_override,
    validate_config,
)
from xlearner.config.methods import ReconcileConfig, SqueezeConfig, TransferConfig
from xlearner.config.model import ContrastiveHeadConfig, HeadsConfig, MIMHeadConfig, ModelConfig
from xlearner.config.pipeline import PipelineConfig, Variant
from xlearner.config.training import EngineConfig, TaskTrainConfig, TrainConfig

__all__ = [
    "NAME_PATTERN",
    "PRETRAINED_HELP",
    "PRETRAINED_SUFFIXES",
    "ConfigError",
    "ContrastiveHeadConfig",
    "DockerRunnerConfig",
    "DownstreamConfig",
    "EngineConfig",
    "HeadsConfig",
    "IngestConfig",
    "MIMHeadConfig",
    "ModelConfig",
    "PipelineConfig",
    "RayRunnerConfig",
    "ReconcileConfig",
    "ResourcesConfig",
    "RunnerConfig",
    "SourceConfig",
    "SqueezeConfig",
    "StageResources",
    "StoreConfig",
    "StrictModel",
    "SynthConfig",
    "TaskTrainConfig",
    "TrackingConfig",
    "TrainConfig",
    "TransferConfig",
    "Variant",
    "apply_overrides",
    "format_validation_error",
    "hash_json",
    "load_config",
    "parse_override",
    "validate_config",
]
