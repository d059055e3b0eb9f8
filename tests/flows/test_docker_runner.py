"""The Docker runner against a real engine (see conftest.py: a busybox image made here)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from flows.runners import STAGE_LABEL, DockerRunner, StageFailed
from xlearner.config import DockerRunnerConfig

pytestmark = pytest.mark.integration  # a real Docker engine (started here if needed)

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def stage_containers(engine, stage: str) -> list:
    return engine.client.containers.list(all=True, filters={"label": f"{STAGE_LABEL}={stage}"})


def make_runner(engine, **config) -> DockerRunner:
    config.setdefault("image", engine.image)
    return DockerRunner(DockerRunnerConfig(**config), client=engine.client, stop_timeout_s=2)


def wait_until(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_stage_runs_as_non_root_under_the_stage_protocol(docker_engine):
    stage = unique("train")
    lines: list[str] = []
    result = make_runner(docker_engine).run(
        stage, ["--out", "s3://bucket/run"], log=lines.append, timeout_s=60
    )
    assert lines[0] == f"python -m stages.{stage} --out s3://bucket/run as 10001:10001"
    assert result.returncode == 0
    assert result.result == {"argv": f"-m stages.{stage} --out s3://bucket/run", "uid": 10001}
    assert stage_containers(docker_engine, stage) == []  # removed after success


def test_lines_stream_as_they_come(docker_engine):
    arrivals: list[tuple[float, str]] = []
    make_runner(docker_engine).run_command(
        ["sh", "-c", "echo one; sleep 1; echo two"],
        stage=unique("stream"),
        log=lambda line: arrivals.append((time.monotonic(), line)),
    )
    finished = time.monotonic()
    assert [line for _, line in arrivals] == ["one", "two"]
    assert finished - arrivals[0][0] >= 0.8, "the first line only arrived when the container ended"


def test_exit_code_propagates_and_the_container_is_removed(docker_engine, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    stage = unique("crash")
    lines: list[str] = []
    with pytest.raises(StageFailed) as info:
        make_runner(docker_engine).run_command(
            ["sh", "-c", 'echo "key=$AWS_SECRET_ACCESS_KEY"; echo boom >&2; exit 7'],
            stage=stage,
            log=lines.append,
        )
    err = info.value
    assert err.returncode == 7 and err.stage == stage
    assert f"stage '{stage}' failed with exit code 7" in str(err)
    # stderr too (Docker keeps no order between the two streams), the secret masked
    assert sorted(err.log_tail.splitlines()) == ["boom", "key=***"]
    assert SECRET not in str(err) and SECRET not in "\n".join(lines)
    assert stage_containers(docker_engine, stage) == []


def test_timeout_stops_and_removes_the_container(docker_engine):
    stage = unique("slow")
    started = time.monotonic()
    with pytest.raises(StageFailed, match="timed out after 5 s and was stopped") as info:
        make_runner(docker_engine).run_command(
            ["sh", "-c", "echo start; sleep 120"], stage=stage, log=lambda _: None, timeout_s=5
        )
    assert time.monotonic() - started < 20
    assert info.value.returncode is None and info.value.log_tail == "start"
    assert stage_containers(docker_engine, stage) == []


def test_exception_in_the_caller_stops_and_removes_the_container(docker_engine):
    stage = unique("interrupted")

    def interrupt(line: str) -> None:
        assert [c.status for c in stage_containers(docker_engine, stage)] == ["running"]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_runner(docker_engine).run_command(
            ["sh", "-c", "echo start; sleep 120"], stage=stage, log=interrupt
        )
    assert stage_containers(docker_engine, stage) == []


CANCELLED_CHILD = textwrap.dedent("""
    import signal, sys
    from flows.runners import DockerRunner
    from xlearner.config import DockerRunnerConfig

    class TerminationSignal(BaseException):
        '''What Prefect raises in a worker process on SIGTERM.'''

    def terminate(signum, frame):
        raise TerminationSignal(signum)

    signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C raises KeyboardInterrupt even where this test runs as a background job
    # (`cmd &` starts with SIGINT ignored, and Python then installs no handler for it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    image, stage = sys.argv[1:]
    runner = DockerRunner(DockerRunnerConfig(image=image), stop_timeout_s=2)
    command = ["sh", "-c", "echo started; sleep 120"]
    runner.run_command(command, stage=stage, log=lambda line: print(line, flush=True))
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cancelled_run_stops_and_removes_the_container(docker_engine, sig):
    stage = unique("cancelled")
    child = subprocess.Popen(
        [sys.executable, "-c", CANCELLED_CHILD, docker_engine.image, stage],
        env=docker_engine.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "started", child.stderr.read()
        assert [c.status for c in stage_containers(docker_engine, stage)] == ["running"]
        child.send_signal(sig)
        _, stderr = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode != 0
    assert ("KeyboardInterrupt" if sig == signal.SIGINT else "TerminationSignal") in stderr
    assert wait_until(lambda: stage_containers(docker_engine, stage) == [], timeout_s=5)


@pytest.mark.parametrize("gpus", [0, -1, 2])
def test_container_settings_reach_the_engine(docker_engine, tmp_path, gpus):
    # No GPU here: the container is created (not started) and inspected.
    runner = make_runner(
        docker_engine,
        gpus=gpus,
        shm_size="64m",
        volumes=[f"{tmp_path}:/data:ro"],
        labels={"team": "vision"},
    )
    stage = unique("settings")
    container = docker_engine.client.containers.create(
        **runner.container_kwargs(["true"], stage=stage)
    )
    try:
        attrs = docker_engine.client.api.inspect_container(container.id)
    finally:
        container.remove(force=True)
    host = attrs["HostConfig"]
    if gpus == 0:
        assert not host.get("DeviceRequests")
    else:
        [request] = host["DeviceRequests"]
        assert request["Count"] == gpus and request["Capabilities"] == [["gpu"]]
    assert host["ShmSize"] == 64 * 1024 * 1024
    assert host["NetworkMode"] == "host"
    assert host["Binds"] == [f"{tmp_path}:/data:ro"]
    assert host["Init"] is True
    assert attrs["Config"]["User"] == "10001:10001"
    assert attrs["Config"]["Labels"] == {"team": "vision", STAGE_LABEL: stage}


def test_only_listed_variables_pass_through(docker_engine, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("XL_NOT_LISTED", "leaked")
    monkeypatch.setenv("MLFLOW_RUN_ID", "exported-run")
    runner = make_runner(
        docker_engine, env_passthrough=["AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "XL_UNSET"]
    )
    lines: list[str] = []
    runner.run_command(
        ["sh", "-c", "env | sort"],
        stage=unique("env"),
        env={"XL_EXPLICIT": "given", "MLFLOW_RUN_ID": "explicit-run"},
        log=lines.append,
    )
    names = {line.split("=", 1)[0] for line in lines}
    assert {"AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "XL_EXPLICIT"} <= names
    assert not names & {"XL_NOT_LISTED", "XL_UNSET", "MLFLOW_RUN_ID"}
    assert "AWS_DEFAULT_REGION=eu-west-1" in lines and "XL_EXPLICIT=given" in lines
    assert "AWS_SECRET_ACCESS_KEY=***" in lines and SECRET not in "\n".join(lines)


def test_missing_image_says_how_to_build_it(docker_engine):
    runner = make_runner(docker_engine, image="xlearner-no-such-image:0")
    with pytest.raises(RuntimeError, match="docker build -f docker/Dockerfile.stage"):
        runner.run_command(["true"], stage=unique("noimage"), log=lambda _: None)


def test_a_gpu_request_on_a_host_without_gpus_fails_clearly(docker_engine):
    if any(rt == "nvidia" for rt in docker_engine.client.info().get("Runtimes", {})):
        pytest.skip("this engine has the NVIDIA runtime: the request could succeed")
    stage = unique("gpu")
    with pytest.raises(RuntimeError, match=r"runner.docker.gpus=-1\): the host needs"):
        make_runner(docker_engine, gpus=-1).run_command(["true"], stage=stage, log=lambda _: None)
    assert stage_containers(docker_engine, stage) == []


def test_out_of_memory_is_named(docker_engine):
    if not docker_engine.client.info().get("MemoryLimit"):
        pytest.skip("this engine cannot limit container memory (no memory cgroup)")
    runner = DockerRunner(
        DockerRunnerConfig(image=docker_engine.image),
        client=docker_engine.client,
        create_options={"mem_limit": "8m", "memswap_limit": "8m"},
    )
    # One process that grows until the cgroup kills it: with a pipeline (head | tr) the
    # kernel may kill a member first and the shell then logs "Killed" before it dies too.
    hog = "echo start; exec tail /dev/zero"
    with pytest.raises(StageFailed, match="killed by the kernel: out of memory") as info:
        runner.run_command(["sh", "-c", hog], stage=unique("oom"), log=lambda _: None)
    assert info.value.returncode == 137 and info.value.log_tail == "start"
