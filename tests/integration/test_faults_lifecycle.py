"""Lifecycle faults (issue 14, items 2 and 3): one writer per output, stopping, exit codes.

- Two stages on one output: the second waits for the first's lease, then fails naming it
  (exit BUSY), or reuses its result when it finishes in time; a killed writer's lease is
  free at once (local) or taken over once expired (S3).
- An unreachable store is TRANSIENT (exit 75), which the flow retries; bad input and a
  requested stop are not retried.
- ``xlearner run`` killed with SIGTERM, SIGINT or SIGKILL mid-stage leaves no process of
  its own (stage, fork server, Prefect's ephemeral server) running for more than
  ``SURVIVAL_S``; the stage's checkpoints stay, and the rerun resumes from them.
- The S3 server killed mid-stage and restarted: the stage fails TRANSIENT, the flow retries
  it, it resumes from its checkpoint and the run completes.

Stages here are :mod:`tests.integration.sleepy_stage` (the real stage main around a body
that sleeps) or the tiny pipeline's real ones with an expand made long enough to kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
import yaml

from devstack import SeaweedFS, ServiceError, find_tool
from flows.plan import _transient
from flows.runners import StageFailed
from stages.main import exit_code
from tests.pipeline_config import tiny_config_dict
from xlearner.config import ConfigError
from xlearner.contract import ExitCode
from xlearner.lease import LeaseHeld, Owner, lease_uri, output_lease
from xlearner.stop import StopRequested
from xlearner.store import StoreError, StoreUnavailable, open_store, resolve, sha256_bytes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SURVIVAL_S = 25.0  # how long a stage may outlive a killed `xlearner run` (stop grace 8-10 s)


# helpers -------------------------------------------------------------------------------
def write_config(tmp_path: Path, data_root: Path, store_uri: str, **overrides) -> Path:
    data = tiny_config_dict(
        str(data_root), store_uri, f"sqlite:///{tmp_path / 'mlflow.db'}",
        sources=("shapes_cls",), downstream=("down_cls_a",), compare=[], name="tiny_life",
        **overrides,
    )  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_sleepy(config: Path, out: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.sleepy_stage"]
        + ["--config", str(config), "--out", out, "--task", "cls"],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_line(process: subprocess.Popen, needle: str, timeout_s: float = 120) -> list[str]:
    """The lines ``process`` printed up to the first one containing ``needle``."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    for line in iter(process.stdout.readline, ""):
        lines.append(line)
        if needle in line:
            return lines
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no {needle!r} in:\n{''.join(lines[-40:])}")


def processes_with_marker(marker: str) -> list[int]:
    """Pids whose environment holds ``XL_LIFECYCLE_RUN=marker`` (a run and all it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"XL_LIFECYCLE_RUN={marker}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until_gone(marker: str, timeout_s: float, but: int | None = None) -> float:
    """Seconds until no process of the run (``but`` that one) is left; fails after
    ``timeout_s``."""
    t0 = time.monotonic()

    def remaining() -> list[int]:
        return [pid for pid in processes_with_marker(marker) if pid != but]

    while (left := remaining()) and time.monotonic() - t0 < timeout_s:
        time.sleep(0.5)
    assert not left, f"still running {timeout_s:.0f} s later: {describe(left)}"
    return time.monotonic() - t0


def describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            out.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
    return "; ".join(out)


class _State:
    """What the flow's retry condition reads: a finished task run's state."""

    def __init__(self, error: Exception):
        self.error = error

    def result(self):
        raise self.error


# exit codes and retries ----------------------------------------------------------------
def test_exit_codes_say_what_failed():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def wrapped(inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception as err:
                raise RuntimeError("checkpoint upload failed") from err
        except RuntimeError as outer:
            return outer

    slow_down = ClientError({"Error": {"Code": "SlowDown"}}, "PutObject")
    no_bucket = ClientError({"Error": {"Code": "NoSuchBucket"}}, "PutObject")
    cases = {
        ExitCode.TRANSIENT: [
            StoreUnavailable("s3://b/k: cannot reach"),
            wrapped(EndpointConnectionError(endpoint_url="http://127.0.0.1:1")),
            slow_down,
        ],
        ExitCode.BAD_INPUT: [StoreError("s3://b: bucket does not exist"), ConfigError("x: bad")],
        ExitCode.BUSY: [LeaseHeld("/s/out", Owner.here("run-1"), 3.0)],
        ExitCode.STOPPED: [StopRequested(signal.SIGTERM)],
        ExitCode.FAILED: [RuntimeError("a bug"), no_bucket, MemoryError()],
    }
    for code, errors in cases.items():
        for err in errors:
            assert exit_code(err) is code, (err, exit_code(err))


def test_the_flow_retries_transient_failures_but_not_bad_input_or_a_stop():
    def retried(code) -> bool:
        return _transient(None, None, _State(StageFailed("expand", code, "tail")))

    assert retried(ExitCode.TRANSIENT) and retried(ExitCode.FAILED) and retried(ExitCode.BUSY)
    assert not retried(ExitCode.BAD_INPUT) and not retried(ExitCode.STOPPED)
    assert _transient(None, None, _State(ConnectionError("engine unreachable")))


def test_an_unreachable_store_fails_the_stage_as_transient(synth_data, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "AKNONE",
        "AWS_SECRET_ACCESS_KEY": "none",
        "AWS_MAX_ATTEMPTS": "2",
    }
    config = write_config(tmp_path, synth_data.root, str(tmp_path / "store"))
    stage = start_sleepy(config, "s3://xlearner-none/runs/expand/k", env)
    output = stage.communicate(timeout=120)[0]
    assert stage.returncode == ExitCode.TRANSIENT, output
    assert f"127.0.0.1:{port}" in output and "Traceback" not in output


# one writer per output -----------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def out_uri(request, tmp_path, monkeypatch) -> str:
    if request.param == "local":
        return str(tmp_path / "store" / "runs" / "expand" / "k1")
    server = request.getfixturevalue("s3_server")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the first credentials seen
    return server.uri(f"t-{uuid.uuid4().hex[:8]}/runs/expand/k1")


def test_one_writer_per_output(synth_data, tmp_path, out_uri):
    """While a stage writes an output, a second one waits, then fails naming the writer
    (BUSY); a third that waits long enough reuses the writer's result instead of running."""
    config = write_config(tmp_path, synth_data.root, str(tmp_path / "store"))
    release = tmp_path / "release"
    first = start_sleepy(config, out_uri, {"XL_RELEASE": str(release)})
    try:
        wait_for_line(first, "started")
        t0 = time.monotonic()
        second = start_sleepy(config, out_uri, {"XLEARNER_LEASE_WAIT_S": "3"})
        third = start_sleepy(config, out_uri, {"XLEARNER_LEASE_WAIT_S": "300"})
        output = second.communicate(timeout=300)[0]
        assert second.returncode == ExitCode.BUSY, output
        assert time.monotonic() - t0 >= 3  # it waited first
        assert f"pid {first.pid} on {socket.gethostname()}" in output, output
        assert "Traceback" not in output
        release.touch()
        first_output = first.communicate(timeout=120)[0]
        third_output = third.communicate(timeout=300)[0]
    finally:
        release.touch()
        for process in (first, second, third):
            if process.poll() is None:
                process.kill()
    assert first.returncode == 0, first_output
    assert third.returncode == 0 and '"skipped": true' in third_output, third_output
    assert json.loads(open_store(out_uri).read_bytes("started.json"))["pid"] == first.pid


def test_a_killed_writer_leaves_a_lease_that_can_be_taken(out_uri):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a writer that holds the lease until it is killed
        try:
            with output_lease(out_uri, wait_s=10, ttl_s=60):
                os.write(ready_w, b"1")
                time.sleep(300)
        finally:
            os._exit(1)
    os.close(ready_w)  # the child's end only: a child that dies early gives EOF, not a hang
    assert select.select([ready_r], [], [], 60)[0], "the lease-holding child did not start"
    assert os.read(ready_r, 1) == b"1", "the lease-holding child failed before taking it"
    with pytest.raises(LeaseHeld, match=f"pid {pid} "), output_lease(out_uri, wait_s=0):
        pass
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    t0 = time.monotonic()  # local: the OS released the flock; S3: its owner is gone
    with output_lease(out_uri, wait_s=30) as lease:
        assert lease.holder().pid == os.getpid()
    assert time.monotonic() - t0 < 10  # not waiting for its ttl (60 s)
    if out_uri.startswith("s3://"):  # an owner on another host: alive until it expires
        parent, name = resolve(lease_uri(out_uri))
        other = Owner("elsewhere", 1, "run-x", ttl_s=2)
        parent.client.put_object(Bucket=parent.bucket, Key=parent._key(name), Body=other.dump())
        with pytest.raises(LeaseHeld, match="pid 1 on elsewhere"), output_lease(out_uri, wait_s=0):
            pass
        time.sleep(2.5)
        with output_lease(out_uri, wait_s=5) as lease:  # expired: taken over
            assert lease.holder().pid == os.getpid()
    parent, name = resolve(lease_uri(out_uri))
    assert parent.exists(name) is out_uri.startswith("/")  # S3: released, deleted
    with output_lease(out_uri, wait_s=0):  # and free again
        pass


# stopping a pipeline run -----------------------------------------------------------------
def long_expand_config(tmp_path: Path, data_root: Path, store_uri: str) -> Path:
    """The tiny pipeline with an expand of many small steps: minutes to finish, checkpoints
    every 10 steps, so a kill always finds it mid-way with checkpoints behind it."""
    return write_config(
        tmp_path, data_root, store_uri,
        tasks={"cls": {"steps": 100000, "batch_size": 4, "warmup_steps": 1}},
        engine={"log_every_steps": 5, "checkpoint_every_steps": 10, "eval_max_images": 16},
    )  # fmt: skip


CODE_VERSION = f"lifecycle-{uuid.uuid4().hex[:8]}"  # reruns reuse outputs while code is edited


def start_run(config: Path, marker: str, extra_env: dict[str, str] | None = None):
    env = {**os.environ, "XL_LIFECYCLE_RUN": marker, "XLEARNER_CODE_VERSION": CODE_VERSION}
    env.update(extra_env or {})
    env.pop("PREFECT_API_URL", None)  # the ephemeral server: it too must stop
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "xlearner"), "run", "-c", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def checkpoint_steps(store_root: Path) -> list[int]:
    return sorted(
        int(p.name[len("step-") :]) for p in store_root.glob("runs/expand/*/checkpoints/step-*")
    )


@pytest.mark.slow
def test_a_killed_run_leaves_nothing_running_and_the_rerun_resumes(synth_data, tmp_path):
    """SIGTERM, then SIGINT, then SIGKILL, each of a rerun of the one before: nothing the
    run started outlives it by SURVIVAL_S, and each rerun resumes expand from the newest
    checkpoint the killed run left."""
    store_root = tmp_path / "store"
    config = long_expand_config(tmp_path, synth_data.root, str(store_root))
    newest = 0
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
        marker = uuid.uuid4().hex
        run = start_run(config, marker)
        try:
            target = (newest + 20) // 5 * 5  # a logged step (every 5th) 20 steps on
            lines = wait_for_line(run, f"step {target}/", timeout_s=400)
            run.send_signal(sig)
            with ThreadPoolExecutor(1) as pool:  # keep reading its output meanwhile
                ended = pool.submit(run.communicate, timeout=180)
                took = wait_until_gone(marker, SURVIVAL_S, but=run.pid)  # its stages, servers
                rest = ended.result()[0]
            wait_until_gone(marker, 10)
        finally:
            if run.poll() is None:
                run.kill()
        print(f"{sig.name}: the stage and the servers gone {took:.1f} s after the signal")
        output = "".join(lines) + rest
        if newest:
            assert f"resuming from checkpoint at step {newest}/" in output, output[-3000:]
        if sig is signal.SIGKILL:
            assert run.returncode == -signal.SIGKILL
        else:
            assert run.returncode == 128 + sig, output[-3000:]
            assert "stop requested: checkpointed step" in output, output[-3000:]
            summary = rest[rest.index("xlearner run: stopped") :]
            assert f"stopped by {sig.name}" in summary and "Traceback" not in summary
        steps = checkpoint_steps(store_root)
        assert steps and steps[-1] > newest, (steps, output[-3000:])
        newest = steps[-1]
    with output_lease(str(next(store_root.glob("runs/expand/*"))), wait_s=0):
        pass  # nobody holds the expand output any more


@pytest.fixture
def own_s3(tmp_path) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this test's own, to kill and restart (same ports and data)."""
    try:
        find_tool("weed")
    except ServiceError as err:
        pytest.skip(str(err))
    server = SeaweedFS(
        tmp_path / "seaweedfs",
        access_key="AK" + uuid.uuid4().hex[:16].upper(),
        secret_key=uuid.uuid4().hex,
        bucket="xlearner-outage",
    )
    with server:
        yield server


@pytest.mark.slow
def test_an_s3_outage_mid_stage_is_retried_and_resumed(synth_data, tmp_path, own_s3):
    """The store's server is killed while expand trains and restarted: the stage fails as
    TRANSIENT, the flow retries it, it resumes from its checkpoint and the run completes
    with every stage's outputs intact."""
    store_uri = f"s3://{own_s3.bucket}/outage"
    config = write_config(
        tmp_path, synth_data.root, store_uri,
        store={"uri": store_uri, "endpoint_url": own_s3.endpoint_url},
        tasks={"cls": {"steps": 80, "batch_size": 4, "warmup_steps": 1}},
        engine={"log_every_steps": 5, "checkpoint_every_steps": 10, "eval_max_images": 16},
    )  # fmt: skip
    aws = {
        "AWS_ACCESS_KEY_ID": own_s3.access_key,
        "AWS_SECRET_ACCESS_KEY": own_s3.secret_key,
        "AWS_ENDPOINT_URL": own_s3.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    marker = uuid.uuid4().hex
    run = start_run(config, marker, aws)
    try:
        lines = wait_for_line(run, "[expand-cls]", timeout_s=400)
        lines += wait_for_line(run, "step 15/", timeout_s=400)  # a checkpoint is behind it
        own_s3.process.kill()  # the store is gone, all at once
        own_s3.process.wait()
        own_s3.process = None
        # down until the stage gave up on it (boto3's own retries exhausted), then back
        lines += wait_for_line(run, "TRANSIENT, exit 75", timeout_s=300)
        own_s3.start()  # same ports, same data folder
        rest = run.communicate(timeout=900)[0]
    finally:
        if run.poll() is None:
            run.kill()
    output = "".join(lines) + rest
    assert run.returncode == 0, output[-4000:]
    assert "TRANSIENT, exit 75" in output, output[-4000:]
    assert "resuming from checkpoint at step" in output
    with pytest.MonkeyPatch.context() as mp:
        for key, value in aws.items():
            mp.setenv(key, value)
        mp.setattr(boto3, "DEFAULT_SESSION", None)  # it caches the first credentials seen
        store = open_store(store_uri, own_s3.endpoint_url)
        done = {k.split("/")[1] for k in store.list("runs") if k.endswith("/result.json")}
        assert {"ingest", "expand", "reconcile", "squeeze", "transfer"} <= done
        for key in (k for k in store.list("runs") if k.endswith("/result.json")):
            folder = key.rsplit("/", 1)[0]
            for name, sha in store.read_json(key).get("files", {}).items():
                assert sha256_bytes(store.read_bytes(f"{folder}/{name}")) == sha, (folder, name)


@pytest.mark.slow
def test_a_failed_run_ends_with_the_stage_error_and_its_log_tail(synth_data, tmp_path):
    """Bad input found by a stage: one message naming it, the stage's log tail, exit 2 (not
    retried), and no traceback after it (the traceback only with --verbose)."""
    empty = tmp_path / "data" / "shapes_cls"
    empty.mkdir(parents=True)
    (tmp_path / "data" / "down_cls_a").symlink_to(synth_data.root / "down_cls_a")
    config = write_config(tmp_path, tmp_path / "data", str(tmp_path / "store"))
    run = start_run(config, uuid.uuid4().hex)
    output = run.communicate(timeout=600)[0]
    assert run.returncode == ExitCode.BAD_INPUT, output[-3000:]
    summary = output[output.index("xlearner run: stage 'ingest'") :]
    assert "--- last lines of its log ---" in summary and str(empty) in summary, summary
    assert "Traceback" not in summary, summary
    assert output.count("Task run 'ingest-shapes_cls' - Finished in state Failed") == 1  # no retry


def test_a_subprocess_stage_dies_with_its_runner():
    """The process runner without warm start (a new interpreter per stage): SIGKILL of the
    process that runs it ends the stage too (parent-death signal), within the stop grace."""
    marker = uuid.uuid4().hex
    stage = "import time; print('up', flush=True); time.sleep(300)"
    supervisor = (
        "import sys; from flows.runners import ProcessRunner; "
        "ProcessRunner(warm_start=False).run_command("
        f"[sys.executable, '-c', {stage!r}], stage='sleeper', log=print)"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", supervisor],
        cwd=REPO,
        env={**os.environ, "XL_LIFECYCLE_RUN": marker, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_line(runner, "up")
    assert len(processes_with_marker(marker)) == 2  # the runner and its stage
    runner.kill()
    runner.communicate()
    wait_until_gone(marker, 5)
