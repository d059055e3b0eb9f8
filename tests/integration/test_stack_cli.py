"""The local stack: the session fixture's servers answer, only with the stack's
credentials, and `xlearner stack up/down` starts detached servers usable through its env
file, then stops every process of them."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import urllib.error
import urllib.request
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from devstack import STACK_ENV, STACK_STATE, find_tool, read_env_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLI_TIMEOUT_S = 400  # three servers starting on a loaded 2-core machine


def get(url: str, user: str | None = None, password: str = "") -> tuple[int, bytes]:
    """Status and body of a GET (error statuses included), with basic auth when ``user``."""
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def assert_servers_require_credentials(env: dict[str, str]) -> None:
    """Prefect's API and MLflow's REST API refuse a request without (or with wrong)
    credentials and answer the stack's own."""
    prefect = f"{env['PREFECT_API_URL']}/flows/filter"
    user, _, password = env["PREFECT_API_AUTH_STRING"].partition(":")
    mlflow = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    mlflow_user, mlflow_password = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    assert len(password) >= 30 and len(mlflow_password) >= 30  # generated, not a default

    def post(url: str, auth: str | None) -> int:
        request = urllib.request.Request(url, data=b"{}", method="POST")
        request.add_header("Content-Type", "application/json")
        if auth is not None:
            request.add_header("Authorization", f"Basic {base64.b64encode(auth.encode()).decode()}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    assert post(prefect, None) == 401
    assert post(prefect, f"{user}:{password}x") == 401
    assert post(prefect, env["PREFECT_API_AUTH_STRING"]) == 200
    assert get(mlflow)[0] == 401
    assert get(mlflow, mlflow_user, mlflow_password + "x")[0] == 401
    assert get(mlflow, mlflow_user, mlflow_password)[0] == 200
    # the events websocket too (it was open with an auth string set in Prefect 3.2, #17687)
    events = env["PREFECT_API_URL"].replace("http://", "ws://") + "/events/in"
    assert websocket_auth(events, None) == "refused: 403"  # no auth handshake at all
    assert websocket_auth(events, env["PREFECT_API_AUTH_STRING"] + "x") == "closed: 1008"
    assert websocket_auth(events, env["PREFECT_API_AUTH_STRING"]) == "auth_success"


def websocket_auth(url: str, token: str | None) -> str:
    """What Prefect's websocket answers to an auth message with ``token`` (None: a client
    without Prefect's subprotocol and no auth message)."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    protocols = None if token is None else ["prefect"]
    try:
        with connect(url, subprotocols=protocols, open_timeout=30) as socket:
            if token is not None:
                socket.send(json.dumps({"type": "auth", "token": token}))
            return json.loads(socket.recv(timeout=30))["type"]
    except InvalidStatus as refused:  # the server closed it before accepting
        return f"refused: {refused.response.status_code}"
    except ConnectionClosed as closed:
        return f"closed: {closed.rcvd.code if closed.rcvd else None}"


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
    assert get(f"{env['PREFECT_API_URL']}/health") == (200, b"true")  # probes need no auth
    assert get(f"{env['MLFLOW_TRACKING_URI']}/health")[0] == 200
    assert b"<html" in get(env["PREFECT_API_URL"].removesuffix("/api"))[1].lower()  # the UI
    bucket = env["XLEARNER_STORE"].removeprefix("s3://").split("/")[0]
    key, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    assert_s3_enforces_identity(env["AWS_ENDPOINT_URL"], bucket, key, secret)
    assert_servers_require_credentials(env)


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
        for name in (
            "AWS_SECRET_ACCESS_KEY",
            "PREFECT_API_AUTH_STRING",
            "MLFLOW_TRACKING_PASSWORD",
        ):
            assert stack_env[name] not in json.dumps(state)
            assert stack_env[name] not in up.stdout + up.stderr  # never printed
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
