"""Shared fixtures: a real S3 server (SeaweedFS), stores on both backends, synthetic data."""

from __future__ import annotations

import os

# Before Prefect is imported (it reads its settings once): no telemetry from the test
# servers (nothing outside is reachable here), and ephemeral servers get time to start
# on a loaded 2-core machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# `import prefect` below, at collection: Prefect sets up its logging handlers on import,
# bound to the sys.stderr of that moment. Here that is pytest's session-long capture;
# imported first inside a test using capsys, it would be that test's stream, closed
# when the test ends, and every later flow run would fail ("I/O operation on closed file").

import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import prefect  # noqa: F401  (see above)
import pytest

from devstack import SeaweedFS, ServiceError, find_tool
from xlearner.data.synth import synth_source_configs, synthesize
from xlearner.store import ArtifactStore, open_store

SYNTH_IMAGES_PER_SOURCE = 120


@dataclass
class S3Server:
    """A running S3 endpoint with one bucket and one enforced identity."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @contextmanager
    def environ(self) -> Iterator[dict[str, str]]:
        """Set the AWS_* variables for this server (restored afterwards)."""
        with pytest.MonkeyPatch.context() as mp:
            for key, value in self.env().items():
                mp.setenv(key, value)
            yield self.env()

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory) -> Iterator[None]:
    """Shard downloads go to a per-session cache, never to ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLEARNER_CACHE", str(tmp_path_factory.mktemp("xlearner-cache")))
        yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """SeaweedFS on free ports with random credentials, for the whole session."""
    try:
        find_tool("weed")
    except ServiceError as err:
        pytest.skip(str(err))
    server = SeaweedFS(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key="AK" + secrets.token_hex(8).upper(),
        secret_key=secrets.token_urlsafe(24),
        bucket="xlearner-test",
    )
    with server:
        yield S3Server(server.endpoint_url, server.bucket, server.access_key, server.secret_key)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch) -> ArtifactStore:
    """An empty store on each backend (S3: a fresh prefix, AWS_* set for the test)."""
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    server: S3Server = request.getfixturevalue("s3_server")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the first credentials seen
    return open_store(server.uri(f"t-{uuid.uuid4().hex[:12]}"), endpoint_url=server.endpoint_url)


@dataclass
class SynthData:
    root: Path
    paths: dict[str, Path]
    sources: list[dict] = field(default_factory=list)  # SourceConfig dicts
    downstream: list[dict] = field(default_factory=list)  # DownstreamConfig dicts

    def source(self, name: str) -> dict:
        return next(s for s in self.sources + self.downstream if s["name"] == name)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> SynthData:
    """All synthetic sources, small (read-only: copy a source before modifying it)."""
    root = tmp_path_factory.mktemp("synth")
    paths = synthesize(root, seed=0, images_per_source=SYNTH_IMAGES_PER_SOURCE, log=lambda _: None)
    sources, downstream = synth_source_configs(root)
    return SynthData(root, paths, sources, downstream)
