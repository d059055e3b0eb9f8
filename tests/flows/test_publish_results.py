"""The results over seeds on the MLflow parent run and in the Prefect artifact."""

from __future__ import annotations

import json

from flows import publish
from xlearner.transfer.report import build_report
from xlearner.transfer.results import summarize


def results() -> dict:
    reports = {
        seed: build_report(
            [
                {"name": "xlearner", "cls": {"a": 55.0 + seed}},
                {"name": "hard_sharing", "cls": {"a": 50.0 + 2 * seed}},
                {"name": "random_init", "cls": {"a": 40.0}},
            ]
        )  # fmt: skip
        for seed in (0, 1, 2)
    }
    return summarize(reports, "xlearner")


def test_the_parent_run_carries_the_results_and_the_claims(tmp_path):
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:  # an explicit experiment: an earlier test may have left another one active
        experiment = mlflow.MlflowClient().create_experiment("results")
        with mlflow.start_run(experiment_id=experiment) as run:
            publish.log_results(results())
    finally:
        mlflow.set_tracking_uri(previous)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    tracking = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.download_artifacts(run.info.run_id, "report", str(artifacts))
    report = artifacts / "report"
    assert sorted(p.name for p in report.iterdir()) == [
        "claims.json", "results.json", "results.md", "results.png",
    ]  # fmt: skip
    assert json.loads((report / "results.json").read_text())["seeds"] == [0, 1, 2]
    assert "## The paper's claims" in (report / "results.md").read_text()
    claims = json.loads((report / "claims.json").read_text())
    assert "X-Learner > hard sharing" in json.dumps(claims)
