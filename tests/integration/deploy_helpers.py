"""Helpers of the deployment tests: a Prefect worker subprocess, flow-run polling, configs.

The ``local_stack`` fixture (conftest.py) points this process at the stack's servers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun

from devstack import find_tool, tail
from tests.pipeline_config import tiny_config_dict

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 900  # a tiny pipeline on a loaded 2-core machine
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


# One source and one downstream set: every stage runs, in about half the time.
SOURCES = ("shapes_cls",)
DOWNSTREAM = ("down_cls_a",)


def write_config(
    path: Path,
    stack: Any,
    data_root: Path,
    prefix: str,
    uris: dict[str, Path] | None = None,
    **overrides: Any,
) -> Path:
    """A tiny pipeline config on the stack's S3 and MLflow, written as YAML.

    ``uris``: sources read from elsewhere than ``data_root`` (a copy the test changes).
    """
    store_uri = stack.s3.uri(f"{prefix}-{uuid.uuid4().hex[:8]}")
    overrides = {"sources": SOURCES, "downstream": DOWNSTREAM, **overrides}
    data = tiny_config_dict(str(data_root), store_uri, stack.mlflow_uri, **overrides)
    data["store"]["endpoint_url"] = stack.s3.endpoint_url
    for source in [*data["sources"], *data["downstream"]]:
        source["uri"] = str((uris or {}).get(source["name"], source["uri"]))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Background:
    """A long-running command (a worker, ``serve``) as a subprocess of the test."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path):
        self.command, self.env, self.log_path = command, env, log_path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Background:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, cwd=REPO, start_new_session=True,
            )  # fmt: skip
        return self

    def log_tail(self) -> str:
        return tail(self.log_path, 60)

    def __exit__(self, *exc: Any) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # it and the flow runs it started
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


class Worker(Background):
    """``prefect worker start`` for one process work pool."""

    def __init__(self, pool: str, env: dict[str, str], log_path: Path):
        command = [find_tool("prefect"), "worker", "start", "--pool", pool, "--type", "process"]
        super().__init__(command, env, log_path)


class Served(Background):
    """``xlearner deploy serve`` of one config (no sensor)."""

    def __init__(self, config: Path, name: str, env: dict[str, str], log_path: Path):
        command = [find_tool("xlearner"), "deploy", "serve", "--config", str(config),
                   "--name", name, "--sensor-every", "0"]  # fmt: skip
        super().__init__(command, {**env, "PYTHONPATH": str(REPO)}, log_path)

    def wait_for_deployment(self, name: str, timeout_s: float = 300) -> str:
        """The deployment's id once ``serve`` registered it."""
        from prefect.exceptions import ObjectNotFound

        deadline = time.monotonic() + timeout_s
        with get_client(sync_client=True) as client:
            while True:
                try:
                    return str(client.read_deployment_by_name(name).id)
                except ObjectNotFound:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"serve did not register {name}:\n{self.log_tail()}")
                    time.sleep(1)


def worker_env(stack: Any) -> dict[str, str]:
    return {**stack.env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}


def deployment_runs(deployment_id: str) -> list[FlowRun]:
    """Every flow run of a deployment, whatever its state."""
    only = DeploymentFilter(id=DeploymentFilterId(any_=[uuid.UUID(deployment_id)]))
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=only)


def wait_for_runs(deployment_id: str, count: int, timeout_s: float = 60) -> list[FlowRun]:
    """Poll until the deployment has at least ``count`` flow runs; returns them."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = deployment_runs(deployment_id)
        if len(runs) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def wait_for_final(
    flow_run_id: Any, timeout_s: float = RUN_TIMEOUT_S, worker: Background | None = None
) -> FlowRun:
    """Poll a flow run until it is final; fails with the worker's log when it times out."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.type.value in FINAL:
                return run
            if time.monotonic() > deadline:
                state = run.state.name if run.state else None
                log = worker.log_tail() if worker else ""
                pytest.fail(f"flow run {flow_run_id} still {state} after {timeout_s} s\n{log}")
            time.sleep(2)
