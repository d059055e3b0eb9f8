"""Thin MLflow helpers: one parent run per pipeline run, one nested run per stage.

Stages run in other processes (or containers): the pipeline creates the parent run and
passes its id, each stage opens a child with ``parent_run_id`` (with MLflow's system
metrics). Every metric is ``<group>/<name>``, the same in every run, so the MLflow compare
view lines runs up: ``train/loss``, ``train/lr``, ``val/<source>.<task>/<metric>``,
``reconcile/gamma_parameters``, ``squeeze/<key>``, ``transfer/avg_cls`` (docs/deploy.md,
"MLflow"). Nothing that looks like a secret is ever logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xlearner import distributed
from xlearner.config import TrackingConfig
from xlearner.secrets import is_secret_name, loggable, redact
from xlearner.store_keys import manifest_version

log = logging.getLogger("xlearner.tracking")

DEFAULT_DB = ".xlearner/mlflow.db"
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def tracking_uri(cfg: TrackingConfig) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else a local SQLite file."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def configure(cfg: TrackingConfig) -> str:
    """Point MLflow at the tracking server and make sure the experiment exists."""
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        artifacts = None
        if uri.startswith("sqlite:///"):  # embedded default: artifacts in a folder beside the db
            artifacts = (
                (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            )
        mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    mlflow.set_experiment(cfg.experiment)
    return uri


def metric_key(name: str) -> str:
    """MLflow allows letters, digits, ``_-./`` and spaces: ``src:cls`` becomes ``src.cls``."""
    return _BAD_CHARS.sub(".", name)


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` with secret-looking keys dropped."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) and "name" in v for v in data):
        for v in data:
            out.update(flatten(v, f"{prefix}{v['name']}."))
    else:
        key = prefix.rstrip(".")
        if not is_secret_name(key):
            out[key] = redact(str(data))[:500]
    return out


def metric_name(name: str, group: str, step: int | None) -> str:
    """``name`` as ``<group>/<name>``: an ungrouped value logged per step is a training
    curve (``lr`` -> ``train/lr``), any other one belongs to the stage (``squeeze/...``)."""
    if "/" in name:
        return metric_key(name)
    return metric_key(f"{'train' if step is not None else group}/{name}")


class StageTracker:
    """Logs a stage's params, metrics and artifacts to its MLflow run (or nowhere).

    ``group``: the stage kind (``expand``, ``squeeze``, ...), the group of its ungrouped
    metric names (:func:`metric_name`).
    """

    def __init__(self, run_id: str | None, group: str = "stage"):
        self.run_id = run_id
        self.group = group

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            import mlflow

            mlflow.log_params({metric_key(k): v for k, v in flatten(params).items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics(
                {metric_name(k, self.group, step): float(v) for k, v in metrics.items()}, step=step
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_source_inputs(self, manifests: dict[str, str], context: str) -> None:
        """The manifests this stage reads as dataset inputs of its run (see the function)."""
        if self.active:
            log_source_inputs(manifests, context)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags(loggable(tags))


@contextlib.contextmanager
def stage_run(
    cfg: TrackingConfig, parent_run_id: str | None, stage: str, tags: dict[str, str] | None = None
) -> Iterator[StageTracker]:
    """A nested MLflow run under ``parent_run_id``; without a parent, tracking is off.

    Every tracked stage trains (or probes) a model: its run records CPU, memory and GPU
    use (MLflow system metrics, ``system/...``). Under DDP only rank 0 opens the run (the
    stage's one child run); the other ranks get a tracker that logs nowhere.
    """
    if not parent_run_id or not distributed.is_main_process():
        yield StageTracker(None)
        return
    import mlflow

    os.environ.pop("MLFLOW_RUN_ID", None)  # an exported run id would override parent_run_id
    configure(cfg)
    with mlflow.start_run(
        run_name=stage,
        parent_run_id=parent_run_id,
        tags={"xlearner.stage": stage, **(tags or {})},
        log_system_metrics=True,
    ) as run:
        yield StageTracker(run.info.run_id, group=stage.split("-")[0])


def flatten_metrics(metrics: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """``{"src:cls": {"top1": 90}}`` -> ``{"val/src:cls/top1": 90}``."""
    return {
        f"{prefix}/{stream}/{k}": v for stream, values in metrics.items() for k, v in values.items()
    }


@contextlib.contextmanager
def pipeline_run(
    cfg: TrackingConfig, name: str, params: dict, tags: dict[str, str]
) -> Iterator[str]:
    """The parent MLflow run of one pipeline run; yields its id for the stages."""
    import mlflow

    os.environ.pop("MLFLOW_RUN_ID", None)
    configure(cfg)
    with mlflow.start_run(run_name=name, tags=loggable(tags)) as run:
        flat = {metric_key(k): v for k, v in flatten(params).items()}
        items = sorted(flat.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[i : i + 100]))
        yield run.info.run_id


# What the shipped code (``code_paths``: xlearner) imports to load and run a backbone.
MODEL_PACKAGES = ("torch", "torchvision", "safetensors", "numpy", "pydantic", "pillow", "tqdm")


def model_requirements() -> list[str]:
    """``MODEL_PACKAGES`` pinned to the versions installed here, without local labels
    (``2.14.1+cpu`` -> ``2.14.1``: the same release from any index)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_PACKAGES]


def log_source_inputs(manifests: dict[str, str], context: str) -> None:
    """Each source's manifest (NAME -> URI) as an MLflow dataset input of the active run,
    its digest the manifest's content hash (the version its URI names), its context
    ``training`` for the training sources, ``evaluation`` for the downstream sets."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for name, uri in sorted(manifests.items()):
        dataset = MetaDataset(resolve_dataset_source(uri), name=name, digest=manifest_version(uri))
        mlflow.log_input(dataset, context=context)


def register_backbone(
    cfg: TrackingConfig, backbone_dir: str | Path, avg_cls: float, image_size: int
) -> dict:
    """Log the backbone as a pyfunc model in the active run and register a version of it.

    The model carries its code (the ``xlearner`` package), pinned requirements, a
    signature and an ``image_size`` input example: ``mlflow.pyfunc.load_model`` works in
    any environment that installs those requirements.

    The alias ``champion`` moves to the new version only if its AVG Cls beats the
    current champion's.
    """
    import mlflow
    from mlflow import MlflowClient

    from xlearner.serving.features import MODEL_CODE, input_example, model_signature

    example = input_example(image_size)
    info = mlflow.pyfunc.log_model(
        name="backbone",
        python_model=str(MODEL_CODE),
        artifacts={"backbone": str(backbone_dir)},
        code_paths=[str(Path(__file__).parent)],  # the xlearner package: load_backbone
        pip_requirements=model_requirements(),
        signature=model_signature(backbone_dir, example),
        input_example=example,
        registered_model_name=cfg.register_model,
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    client.set_model_version_tag(cfg.register_model, version, "avg_cls", f"{avg_cls:.4f}")
    try:
        champion = client.get_model_version_by_alias(cfg.register_model, "champion")
        best = float(champion.tags.get("avg_cls", "-inf"))
    except mlflow.exceptions.MlflowException:
        champion, best = None, float("-inf")
    promoted = avg_cls > best
    if promoted:
        client.set_registered_model_alias(cfg.register_model, "champion", version)
    return {
        "model": cfg.register_model,
        "version": version,
        "champion": promoted,
        "previous_champion": champion.version if champion else None,
        "model_uri": f"models:/{cfg.register_model}/{version}",
    }
