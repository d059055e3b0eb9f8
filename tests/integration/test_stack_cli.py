"""The local stack: the session fixture's servers answer, and `xlearner stack up/down`
starts detached servers usable through its env file, then stops every process of them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import urllib.request
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from devstack import STACK_ENV, STACK_STATE, find_tool, read_env_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI_TIMEOUT_S = 400  # three servers starting on a loaded 2-core machine


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read()


def s3_client(endpoint: str, key: str, secret: str):
    config = Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"})
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
        region_name="us-east-1", config=config,
    )  # fmt: skip


def assert_s3_enforces_identity(endpoint: str, bucket: str, key: str, secret: str) -> None:
    """The identity can write and read the bucket; a wrong secret is refused."""
    client = s3_client(endpoint, key, secret)
    name = f"probe-{uuid.uuid4().hex[:8]}"
    client.put_object(Bucket=bucket, Key=name, Body=b"hello")
    assert client.get_object(Bucket=bucket, Key=name)["Body"].read() == b"hello"
    with pytest.raises(ClientError):
        s3_client(endpoint, key, secret + "x").get_object(Bucket=bucket, Key=name)


def assert_services_answer(env: dict[str, str]) -> None:
    assert get(f"{env['PREFECT_API_URL']}/health") == (200, b"true")
    assert get(f"{env['MLFLOW_TRACKING_URI']}/health")[0] == 200
    assert b"<html" in get(env["PREFECT_API_URL"].removesuffix("/api"))[1].lower()  # the UI
    bucket = env["XLEARNER_STORE"].removeprefix("s3://").split("/")[0]
    key, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    assert_s3_enforces_identity(env["AWS_ENDPOINT_URL"], bucket, key, secret)


def live_processes(pgids: list[int]) -> list[str]:
    """``ps`` lines of the live (not zombie) processes in the process groups ``pgids``."""
    table = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True)
    rows = [line.split(maxsplit=3) for line in table.stdout.splitlines()]
    return [" ".join(row) for row in rows if int(row[1]) in pgids and not row[2].startswith("Z")]


def test_local_stack_fixture_serves_prefect_mlflow_and_s3(local_stack):
    assert_services_answer(local_stack.env())
    import mlflow

    client = mlflow.MlflowClient(local_stack.mlflow_uri)
    run = client.create_run(client.create_experiment(f"probe-{uuid.uuid4().hex[:8]}"))
    client.log_text(run.info.run_id, "stored through the server", "probe.txt")
    # the client has no S3 access of its own: the server proxies artifacts to the bucket
    s3 = local_stack.s3
    listed = s3_client(s3.endpoint_url, s3.access_key, s3.secret_key).list_objects_v2(
        Bucket=s3.bucket, Prefix="mlartifacts/"
    )
    keys = [obj["Key"] for obj in listed.get("Contents", [])]
    assert any(key.endswith(f"{run.info.run_id}/artifacts/probe.txt") for key in keys), keys


def test_stack_up_and_down_cli(tmp_path):
    workdir = tmp_path / "stack"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_", "MLFLOW_"))}
    xlearner = find_tool("xlearner")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [xlearner, "stack", *args, "--workdir", str(workdir)],
            env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        )  # fmt: skip

    up = cli("up")
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        env_file = workdir / STACK_ENV
        assert str(env_file) in up.stdout
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it holds the S3 secret
        stack_env = read_env_file(env_file)
        assert len(stack_env["AWS_SECRET_ACCESS_KEY"]) >= 30  # generated, not a default
        state = json.loads((workdir / STACK_STATE).read_text())
        assert stack_env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(state)
        assert sorted(state["services"]) == ["mlflow", "prefect", "seaweedfs"]
        pids = [info["pid"] for info in state["services"].values()]
        assert len(live_processes(pids)) >= 3  # they outlived `stack up`
        assert_services_answer(stack_env)

        again = cli("up")
        assert again.returncode != 0 and "stack down" in again.stderr
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr[-3000:]
    assert not (workdir / STACK_STATE).exists()
    # the servers and every child of theirs (uvicorn workers): their process groups are empty
    assert not live_processes(pids)
