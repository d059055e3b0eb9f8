"""MLflow used as its users expect (issue 15 item 7), on a local SQLite tracking store:
the registered backbone loads with ``mlflow.pyfunc.load_model`` where ``xlearner`` is not
installed, manifests are dataset inputs, stage runs carry system metrics and grouped
metric names."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from flows.publish import report_rows
from xlearner import tracking
from xlearner.config import TrackingConfig
from xlearner.models.backbone import save_backbone
from xlearner.models.registry import create_backbone
from xlearner.serving.features import input_example, pooled_features
from xlearner.store_keys import manifest_key, manifest_version

REPO = Path(__file__).resolve().parents[2]
# Run in a child interpreter: xlearner made unimportable (the editable install's finder
# and the repository dropped from the path) before the model is loaded from its URI.
FRESH_LOAD = textwrap.dedent(
    """
    import json, sys
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
    sys.path = [p for p in sys.path if p not in ("", {repo!r}) and "editable" not in p]
    sys.path_importer_cache.clear()
    try:
        import xlearner  # noqa: F401
        sys.exit("xlearner is importable: the test would not show that the model ships it")
    except ModuleNotFoundError:
        pass
    import mlflow, numpy as np
    mlflow.set_tracking_uri({uri!r})
    model = mlflow.pyfunc.load_model({model_uri!r})
    images = np.load({images!r})
    features = model.predict(images)
    print(json.dumps({{"features": features.tolist(),
                       "code_from": sys.modules["xlearner.models.loading"].__file__}}))
    """
)


@pytest.fixture
def tracking_cfg(tmp_path, monkeypatch) -> TrackingConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="conventions")
    tracking.configure(cfg)
    return cfg


def test_registered_backbone_loads_where_xlearner_is_not_installed(tracking_cfg, tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("tiny_resnet").eval()
    save_backbone(backbone, tmp_path / "backbone")
    with mlflow.start_run() as run:
        registered = tracking.register_backbone(tracking_cfg, tmp_path / "backbone", 0.5, 32)
    info = mlflow.models.get_model_info(registered["model_uri"])
    assert info.run_id == run.info.run_id
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, -1, -1)
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (
        -1,
        backbone.channels[-1],
    )
    assert info.saved_input_example_info is not None
    local = Path(
        mlflow.artifacts.download_artifacts(registered["model_uri"], dst_path=str(tmp_path / "m"))
    )
    requirements = (local / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert not [r for r in requirements if r.startswith("xlearner")]
    assert (local / "code" / "xlearner" / "models" / "loading.py").is_file()

    images = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    script = FRESH_LOAD.format(
        repo=str(REPO),
        uri=tracking_cfg.uri,
        model_uri=registered["model_uri"],
        images=str(tmp_path / "images.npy"),
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/xlearner/" in loaded["code_from"]  # the model's own copy of the code
    np.testing.assert_allclose(
        np.array(loaded["features"]), pooled_features(backbone, images), rtol=1e-5, atol=1e-6
    )
    assert input_example(32).shape == (1, 3, 32, 32)


def test_manifests_are_dataset_inputs_with_their_content_hash(tracking_cfg, tmp_path):
    manifests = {"shapes_cls": "s3://bucket/" + manifest_key("shapes_cls", "0123456789abcdef")}
    with mlflow.start_run() as run:
        tracking.log_source_inputs(manifests, "training")
    (dataset_input,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.digest) == ("shapes_cls", "0123456789abcdef")
    assert json.loads(dataset.source) == {"uri": manifests["shapes_cls"]}
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "training")]


def test_a_stage_run_logs_the_manifests_it_reads_with_the_version_their_uri_names(tracking_cfg):
    uri = "s3://bucket/" + manifest_key("shapes_det", "fedcba9876543210")
    with mlflow.start_run() as parent:
        pass
    with tracking.stage_run(tracking_cfg, parent.info.run_id, "transfer") as tracker:
        tracker.log_source_inputs({"shapes_det": uri}, "evaluation")
    (dataset_input,) = MlflowClient().get_run(tracker.run_id).inputs.dataset_inputs
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == (
        "shapes_det",
        "fedcba9876543210",
    )
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "evaluation")]
    assert manifest_version("s3://bucket/elsewhere/manifest.json") is None


def test_stage_runs_have_system_metrics_and_grouped_metric_names(tracking_cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    with mlflow.start_run() as parent:
        pass
    with tracking.stage_run(tracking_cfg, parent.info.run_id, "squeeze-distill") as tracker:
        tracker.log_metrics({"train/loss": 1.0, "lr": 0.1}, step=3)  # the engine's curves
        tracker.log_metrics({"params_ratio": 0.5, "val/a.cls/top1": 90.0})  # a stage summary
        time.sleep(1.5)  # a few samples of the system metrics monitor
    metrics = MlflowClient().get_run(tracker.run_id).data.metrics
    assert {"train/loss", "train/lr", "squeeze/params_ratio", "val/a.cls/top1"} <= set(metrics)
    assert not [k for k in metrics if "/" not in k], metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), metrics


def test_report_table_has_one_row_per_backbone():
    report = {
        "rows": [
            {"name": "xlearner", "cls": {"a": 80.0, "b": 70.0}, "avg_cls": 75.0},
            {"name": "random_init", "cls": {"a": 10.0}, "avg_cls": None},
        ]
    }
    assert report_rows(report) == {
        "name": ["xlearner", "random_init"],
        "cls.a": [80.0, 10.0],
        "cls.b": [70.0, None],
        "avg_cls": [75.0, None],
    }
