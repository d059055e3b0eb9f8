"""The stage contract: how the flow calls a stage and what the stage answers.

A stage is the command ``python -m stages.<name> --config URI --out URI ...``. The flow
builds a typed :class:`StageCall` (one subclass per stage) and turns it into that
command line with :meth:`StageCall.to_argv`; the stage parses the same class back with
:meth:`StageCall.parse`. The stage publishes its files under ``--out``, then
``result.json`` (a :class:`StageResult`) last, prints it on one line after
:data:`RESULT_PREFIX` and exits with an :class:`ExitCode`.
"""

from __future__ import annotations

import argparse
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, Self, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xlearner.config import ConfigError
from xlearner.store_keys import RESULT as RESULT_FILE

__all__ = [
    "RESULT_FILE",
    "RESULT_PREFIX",
    "ExitCode",
    "Stage",
    "StageCall",
    "StageResult",
    "IngestCall",
    "ExpandCall",
    "ReconcileCall",
    "SqueezeCall",
    "TransferCall",
    "CALLS",
]

RESULT_PREFIX = "XLEARNER_RESULT "
# set by the flow in every stage's environment: how many stages run at once, so that a
# stage's data-loading workers take their share of the cores (engine.num_workers: auto)
PARALLEL_STAGES_ENV = "XLEARNER_PARALLEL_STAGES"
HARD_SHARING_TASK = "all"  # ExpandCall.task for the hard-sharing baseline
RANDOM_BACKBONE = "random:"  # TransferCall.backbones value prefix: a randomly initialised one


class ExitCode(IntEnum):
    """What a stage's exit status means, and whether the flow retries it (flows/plan.py)."""

    OK = 0
    FAILED = 1  # anything else (OOM, a bug): retried, it may pass
    BAD_INPUT = 2  # the config or the inputs are wrong: never retried, it fails the same way
    BUSY = 3  # another live stage holds the output's lease (xlearner.lease): retried later
    TRANSIENT = 75  # infrastructure, for now (store unreachable or throttled): retried, backing off
    STOPPED = 143  # stopped by SIGTERM/SIGINT after saving a checkpoint: not retried


class Stage(StrEnum):
    ingest = "ingest"
    expand = "expand"
    reconcile = "reconcile"
    squeeze = "squeeze"
    transfer = "transfer"


def _flag(name: str, field: Any) -> str:
    extra = field.json_schema_extra or {}
    return extra.get("flag", "--" + name.replace("_", "-"))


class StageCall(BaseModel):
    """What one stage run is asked to do: the config it reads, its inputs, its output.

    Fields map to flags: ``dict[str, str]`` to a repeated ``--flag NAME=VALUE``,
    ``list[str]`` to a repeated ``--flag VALUE``, scalars to ``--flag VALUE`` (``None``
    omitted). ``reads`` names the config sections the stage reads: the flow hashes
    exactly those into the stage's cache key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: ClassVar[Stage]
    reads: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    config: str = Field(description="pipeline config: local YAML/JSON file or s3:// URI")
    out: str = Field(description="URI the stage publishes its outputs under")
    overrides: list[str] = Field(
        default_factory=list,
        description="config override KEY=VALUE (repeatable)",
        json_schema_extra={"flag": "--set"},
    )
    mlflow_parent_run_id: str | None = Field(
        default=None, description="log as a nested run of this MLflow run"
    )

    # command line --------------------------------------------------------------------
    def to_argv(self) -> list[str]:
        argv: list[str] = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            flag = _flag(name, field)
            if value is None:
                continue
            if isinstance(value, dict):
                argv += [a for k, v in value.items() for a in (flag, f"{k}={v}")]
            elif isinstance(value, list):
                argv += [a for v in value for a in (flag, str(v))]
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=f"xlearner stage {cls.stage.value}", description=cls.description
        )
        for name, field in cls.model_fields.items():
            origin = get_origin(field.annotation)
            kwargs: dict[str, Any] = {"dest": name, "help": field.description}
            if origin is dict:
                kwargs |= {"action": "append", "default": [], "metavar": "NAME=VALUE"}
            elif origin is list:
                kwargs |= {"action": "append", "default": []}
            else:
                kwargs["required"] = field.is_required()
                kwargs["default"] = None
                kwargs["metavar"] = "URI" if name in ("config", "out") else None
            parser.add_argument(_flag(name, field), **kwargs)
        return parser

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> Self:
        """The call a stage was given on its command line (a ``ConfigError`` if malformed)."""
        args = vars(cls.parser().parse_args(argv))
        for name, field in cls.model_fields.items():
            if get_origin(field.annotation) is dict:
                args[name] = parse_pairs(args[name], _flag(name, field))
            elif args[name] is None:
                del args[name]
        try:
            return cls(**args)
        except ValidationError as err:
            problems = "; ".join(
                f"{_flag(str(e['loc'][0]), cls.model_fields[str(e['loc'][0])])}: {e['msg']}"
                if e["loc"] and str(e["loc"][0]) in cls.model_fields
                else e["msg"]
                for e in err.errors()
            )
            raise ConfigError(f"stage {cls.stage.value}: {problems}") from None

    def check(self) -> None:
        """Raise ``ValueError`` for a call whose flags do not go together (after the config
        is read, before the stage looks at its output)."""


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    """``["a=uri1", "b=uri2"]`` -> ``{"a": "uri1", "b": "uri2"}``."""
    out = {}
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep or not name or not uri:
            raise ConfigError(f"{flag} {value!r}: expected NAME=VALUE")
        out[name] = uri
    return out


def pairs(description: str, flag: str | None = None) -> Any:
    """A repeated ``--flag NAME=VALUE`` field (a ``dict[str, str]``, empty by default);
    ``flag``: when it is not the field's name."""
    extra = {"flag": flag} if flag else None
    return Field(default_factory=dict, description=description, json_schema_extra=extra)


TRAINING_SECTIONS = ("model", "heads", "engine", "seed", "sources")


class IngestCall(StageCall):
    stage = Stage.ingest
    reads = ("sources", "downstream", "model.image_size", "ingest", "store")
    description = "Ingest stage: validate sources, split, shard and publish versioned manifests."

    out: str | None = Field(default=None, description="also publish result.json here")
    sources: list[str] = Field(
        default_factory=list,
        description="source name (default: all, downstream too)",
        json_schema_extra={"flag": "--source"},
    )
    store: str | None = Field(default=None, description="store URI (default: store.uri)")


class ExpandCall(StageCall):
    stage = Stage.expand
    reads = (*TRAINING_SECTIONS, "tasks")
    description = (
        "Expand stage: train one task's sub-backbone with its heads on all sources of the "
        f"task; --task {HARD_SHARING_TASK} trains the hard-sharing baseline."
    )

    task: str = Field(description=f"task type, or {HARD_SHARING_TASK!r} for hard sharing")
    manifests: dict[str, str] = pairs("SOURCE=URI", "--manifest")
    init_backbone: str | None = Field(
        default=None, description="start the trunk from this published backbone"
    )
    source: str | None = Field(
        default=None, description="train on this source only (single-task baselines)"
    )
    steps: int | None = Field(default=None, gt=0, description="override the optimiser steps")


class ReconcileCall(StageCall):
    stage = Stage.reconcile
    reads = (*TRAINING_SECTIONS, "reconcile")
    description = (
        "Reconcile stage: join the trained sub-backbones with reconciliation layers and "
        "train them jointly."
    )

    sub_models: dict[str, str] = pairs("TASK=URI", "--sub-model")
    manifests: dict[str, str] = pairs("SOURCE=URI", "--manifest")


class SqueezeCall(StageCall):
    stage = Stage.squeeze
    reads = (*TRAINING_SECTIONS, "squeeze")
    description = (
        "Squeeze stage: condense the expanded model (--teacher) or the sub-backbones "
        "(--sub-model) into one backbone; --hint adds extra hint backbones (X-Learner++)."
    )

    teacher: str | None = Field(default=None, description="the expanded model (reconcile's)")
    sub_models: dict[str, str] = pairs("TASK=URI", "--sub-model")
    hints: dict[str, str] = pairs("NAME=URI", "--hint")
    manifests: dict[str, str] = pairs("SOURCE=URI", "--manifest")

    def check(self) -> None:
        if bool(self.teacher) == bool(self.sub_models):
            raise ValueError(
                "give either --teacher (the expanded model) or --sub-model TASK=URI, "
                "not both/neither"
            )


class TransferCall(StageCall):
    stage = Stage.transfer
    reads = ("transfer", "model", "engine", "seed")
    description = "Transfer stage: evaluate backbones on the downstream sources, write the report."

    backbones: dict[str, str] = pairs(f"NAME=URI or NAME={RANDOM_BACKBONE}ARCH", "--backbone")
    train_images: dict[str, str] = pairs("NAME=N", "--train-images")
    downstream: dict[str, str] = pairs("NAME=MANIFEST_URI")


CALLS: dict[Stage, type[StageCall]] = {
    c.stage: c for c in (IngestCall, ExpandCall, ReconcileCall, SqueezeCall, TransferCall)
}


class StageResult(BaseModel):
    """``result.json`` of a stage output, and the line a stage prints after RESULT_PREFIX.

    The common fields are typed; stage-specific ones (``report``, ``manifests``,
    ``squeeze``, ...) are kept as extras.
    """

    model_config = ConfigDict(extra="allow")

    stage: str | None = None
    out: str | None = None
    files: dict[str, str] = Field(default_factory=dict)  # key -> sha256
    seconds: float | None = None
    skipped: bool = False
    model: str | None = None  # URI of the trained model folder
    backbone: str | None = None  # URI of the single backbone folder
    parameters: int | None = None
    train_images: int | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    peak_rss_mb: float | None = None  # the stage process's peak resident memory
    peak_cuda_mb: float | None = None  # peak CUDA memory allocated by PyTorch, on a GPU

    def dump(self) -> dict[str, Any]:
        """The JSON object of ``result.json`` and of the result line: the fields that were
        set (given, or assigned later), extras included; unset defaults are left out."""
        return self.model_dump(mode="json", exclude_unset=True)
