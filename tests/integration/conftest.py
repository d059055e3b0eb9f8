"""The real service stack for the integration tests: SeaweedFS (S3), MLflow and Prefect.

``local_stack`` (session scope) starts :class:`devstack.LocalStack` in a temporary
folder, on free loopback ports, with a random S3 identity, and points this test session
at it; everything is stopped (SIGTERM, then SIGKILL after a timeout) at the end. Its API:

- ``stack.prefect_api_url`` (``http://127.0.0.1:<port>/api``), ``stack.prefect_ui_url``
- ``stack.mlflow_uri`` (tracking URI), ``stack.mlflow_ui_url``
- ``stack.s3``: ``endpoint_url``, ``bucket``, ``access_key``, ``secret_key``, ``region``
  and ``uri(prefix)`` -> ``s3://<bucket>/<prefix>``
- ``stack.store_uri``: a suggested pipeline store (``s3://<bucket>/xlearner``)
- ``stack.env()``: PREFECT_API_URL, PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_URI,
  MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, AWS_ENDPOINT_URL,
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, XLEARNER_STORE
- ``stack.credentials``: the generated Prefect auth string and MLflow user; both servers
  refuse requests without them

While it is up, this process's environment holds ``stack.env()`` and Prefect's settings
point at the stack's server with its auth string (Prefect reads its settings once, at
import: the environment alone would not redirect it). Tests using it are marked
``integration`` and ``slow``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import LocalStack, ServiceError, find_tool
from tests.integration.stack_helpers import StackRun, run_flow
from tests.pipeline_config import tiny_config
from xlearner.store import open_store

S3_DATA_PREFIX = "data"


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory) -> Iterator[LocalStack]:
    """SeaweedFS + MLflow + Prefect servers for the session; this process uses them."""
    try:
        find_tool("weed"), find_tool("mlflow"), find_tool("prefect")
    except ServiceError as err:
        pytest.skip(str(err))
    import boto3
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    stack = LocalStack(tmp_path_factory.mktemp("stack"), bucket="xlearner-it")
    t0 = time.monotonic()
    with stack, pytest.MonkeyPatch.context() as mp:
        print(f"\nlocal stack up in {time.monotonic() - t0:.0f} s: Prefect {stack.prefect_ui_url}, "
              f"MLflow {stack.mlflow_ui_url}, S3 {stack.s3.endpoint_url}")  # fmt: skip
        for key, value in stack.env().items():
            mp.setenv(key, value)
        mp.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the first credentials it saw
        # tiny stages last seconds: sample system metrics each second (MLflow's default: 10)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        prefect_settings = {
            PREFECT_API_URL: stack.prefect_api_url,
            PREFECT_API_AUTH_STRING: stack.credentials.prefect_auth_string,
        }
        with temporary_settings(prefect_settings):
            try:
                yield stack
            finally:  # send the queued run logs while the server still listens
                APILogWorker.drain_all(timeout=30)


@pytest.fixture(scope="session")
def s3_data_root(local_stack: LocalStack, synth_data) -> str:
    """The synthetic sources uploaded to ``s3://<bucket>/data/<name>/...``; returns that root."""
    root = local_stack.s3.uri(S3_DATA_PREFIX)
    store = open_store(root, local_stack.s3.endpoint_url)
    for name, folder in synth_data.paths.items():
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            store.upload_file(f"{name}/{path.relative_to(folder).as_posix()}", path)
    return root


@pytest.fixture(scope="session")
def stack_run(local_stack: LocalStack, s3_data_root: str) -> StackRun:
    """The tiny pipeline run once on the stack (S3 sources and store, MLflow server, Prefect
    server, process runner); the e2e and secrets tests share it."""
    store = local_stack.s3.uri(f"it-{uuid.uuid4().hex[:8]}")
    cfg = tiny_config(s3_data_root, store, local_stack.mlflow_uri, compare=[], name="tiny_e2e")
    return run_flow(cfg)
