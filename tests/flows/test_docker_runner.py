"""The Docker runner against a real engine (see conftest.py: a busybox image made here)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from flows.operator import DATA_ROOTS_ENV, IMAGE_ENV, NETWORK_ENV, VOLUMES_ENV, DockerSettings
from flows.runners import STAGE_LABEL, DockerRunner, StageFailed, make_runner
from flows.runners.docker import (
    OWNER_HOST_LABEL,
    OWNER_PID_LABEL,
    OWNER_STARTED_LABEL,
    owner_labels,
)
from tests.pipeline_config import tiny_config_dict
from xlearner.config import (
    ConfigError,
    DockerRunnerConfig,
    RunnerConfig,
    StageResources,
    validate_config,
)

pytestmark = pytest.mark.integration  # a real Docker engine (started here if needed)

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def stage_containers(engine, stage: str) -> list:
    return engine.client.containers.list(all=True, filters={"label": f"{STAGE_LABEL}={stage}"})


def engine_runner(
    engine, image: str | None = None, env_passthrough: list[str] | None = None, **config
) -> DockerRunner:
    """A runner of ``config`` (the form's) with the operator's ``image`` and passthrough."""
    settings = DockerSettings(image=image or engine.image)
    if env_passthrough is not None:
        settings = DockerSettings(image=settings.image, env_passthrough=tuple(env_passthrough))
    volumes = [v.split(":")[0] for v in config.get("volumes", [])]
    return DockerRunner(
        DockerRunnerConfig(**config),
        client=engine.client,
        settings=settings,
        data_roots=volumes,
        stop_timeout_s=2,
    )


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
    result = engine_runner(docker_engine).run(
        stage, ["--out", "s3://bucket/run"], log=lines.append, timeout_s=60
    )
    assert lines[0] == f"python -m stages.{stage} --out s3://bucket/run as 10001:10001"
    assert result.returncode == 0
    assert result.result == {"argv": f"-m stages.{stage} --out s3://bucket/run", "uid": 10001}
    assert stage_containers(docker_engine, stage) == []  # removed after success


def test_a_stage_of_two_processes_runs_under_torchrun_in_its_container(docker_engine):
    stage = unique("reconcile")
    lines: list[str] = []
    engine_runner(docker_engine).run(
        stage, ["--out", "s3://b/r"], log=lines.append, gpu_ids=[],
        resources=StageResources(gpus=-1, procs_per_node=2),
    )  # fmt: skip
    assert lines[0] == (
        "python -m torch.distributed.run --nproc-per-node 2 --standalone --max-restarts 0 "
        f"-m stages.{stage} --out s3://b/r as 10001:10001"
    )


def test_lines_stream_as_they_come(docker_engine):
    arrivals: list[tuple[float, str]] = []
    engine_runner(docker_engine).run_command(
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
        engine_runner(docker_engine).run_command(
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
        engine_runner(docker_engine).run_command(
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
        engine_runner(docker_engine).run_command(
            ["sh", "-c", "echo start; sleep 120"], stage=stage, log=interrupt
        )
    assert stage_containers(docker_engine, stage) == []


CANCELLED_CHILD = textwrap.dedent("""
    import signal, sys
    from flows.runners import DockerRunner
    from flows.operator import DockerSettings
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
    runner = DockerRunner(DockerRunnerConfig(), settings=DockerSettings(image), stop_timeout_s=2)
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


def test_the_next_runner_removes_the_containers_of_a_runner_killed_with_sigkill(
    docker_engine, caplog
):
    stage = unique("orphan")
    child = subprocess.Popen(
        [sys.executable, "-c", CANCELLED_CHILD, docker_engine.image, stage],
        env=docker_engine.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "started"
    finally:
        child.kill()  # SIGKILL: nothing of the runner gets to stop its container
        child.wait()
    [orphan] = stage_containers(docker_engine, stage)
    assert orphan.status == "running" and orphan.labels[OWNER_PID_LABEL] == str(child.pid)

    def create(**owner: str):
        labels = {**owner_labels(), STAGE_LABEL: stage, **owner}
        return docker_engine.client.containers.create(
            docker_engine.image, ["sleep", "60"], labels=labels
        )

    reused = create(**{OWNER_STARTED_LABEL: "1"})  # this pid, but an earlier process's
    mine = create()  # this process: running
    elsewhere = create(**{OWNER_HOST_LABEL: "other-host/pid:[1]", OWNER_PID_LABEL: "1"})
    try:
        with caplog.at_level(logging.WARNING, logger="xlearner.stages"):
            engine_runner(docker_engine).run_command(
                ["true"], stage=unique("next"), log=lambda _: None
            )
        left = {c.name for c in stage_containers(docker_engine, stage)}
        assert left == {mine.name, elsewhere.name}
        assert (
            f"removed leftover container {orphan.name} of stage {stage!r}: its runner "
            f"(pid {child.pid} on this host) is gone" in caplog.text
        )
        assert reused.name in caplog.text
    finally:
        for container in stage_containers(docker_engine, stage):
            container.remove(force=True)


@pytest.mark.parametrize("gpu_ids", [None, [], ["1", "3"]])
def test_container_settings_reach_the_engine(docker_engine, tmp_path, gpu_ids):
    # No GPU here: the container is created (not started) and inspected.
    runner = engine_runner(
        docker_engine, shm_size="64m", volumes=[f"{tmp_path}:/data:ro"], labels={"team": "vision"}
    )
    stage = unique("settings")
    resources = StageResources(gpus=len(gpu_ids or []), cpus=1.5, memory="256m")
    container = docker_engine.client.containers.create(
        **runner.container_kwargs(["true"], stage=stage, resources=resources, gpu_ids=gpu_ids)
    )
    try:
        attrs = docker_engine.client.api.inspect_container(container.id)
    finally:
        container.remove(force=True)
    host = attrs["HostConfig"]
    if not gpu_ids:
        assert not host.get("DeviceRequests")
    else:  # these very devices, never a count (the engine's "first N" for every container)
        [request] = host["DeviceRequests"]
        assert request["DeviceIDs"] == gpu_ids and not request["Count"]
        assert request["Capabilities"] == [["gpu"]]
    assert host["NanoCpus"] == 1_500_000_000 and host["Memory"] == 256 * 1024 * 1024
    assert host["ShmSize"] == 64 * 1024 * 1024
    assert host["NetworkMode"] == "host"
    assert host["Binds"] == [f"{tmp_path}:/data:ro"]
    assert host["Init"] is True
    assert attrs["Config"]["User"] == "10001:10001"
    assert attrs["Config"]["Labels"] == {"team": "vision", **owner_labels(), STAGE_LABEL: stage}


def test_only_listed_variables_pass_through(docker_engine, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("XL_NOT_LISTED", "leaked")
    monkeypatch.setenv("MLFLOW_RUN_ID", "exported-run")
    runner = engine_runner(
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
    runner = engine_runner(docker_engine, image="xlearner-no-such-image:0")
    with pytest.raises(RuntimeError, match="docker build -f docker/Dockerfile.stage"):
        runner.run_command(["true"], stage=unique("noimage"), log=lambda _: None)


def test_a_gpu_request_on_a_host_without_gpus_fails_clearly(docker_engine):
    if any(rt == "nvidia" for rt in docker_engine.client.info().get("Runtimes", {})):
        pytest.skip("this engine has the NVIDIA runtime: the request could succeed")
    stage = unique("gpu")
    with pytest.raises(RuntimeError, match=rf"GPUs 0,1 \(resources.{stage}.gpus\): the host needs"):
        engine_runner(docker_engine).run_command(
            ["true"], stage=stage, log=lambda _: None, gpu_ids=["0", "1"]
        )
    assert stage_containers(docker_engine, stage) == []


def test_out_of_memory_is_named(docker_engine):
    if not docker_engine.client.info().get("MemoryLimit"):
        pytest.skip("this engine cannot limit container memory (no memory cgroup)")
    runner = DockerRunner(
        DockerRunnerConfig(),
        settings=DockerSettings(docker_engine.image),
        client=docker_engine.client,
        create_options={"mem_limit": "8m", "memswap_limit": "8m"},
    )
    # One process that grows until the cgroup kills it: with a pipeline (head | tr) the
    # kernel may kill a member first and the shell then logs "Killed" before it dies too.
    hog = "echo start; exec tail /dev/zero"
    with pytest.raises(StageFailed, match="killed by the kernel: out of memory") as info:
        runner.run_command(["sh", "-c", hog], stage=unique("oom"), log=lambda _: None)
    assert info.value.returncode == 137 and info.value.log_tail == "start"


HOSTILE_FORM_VALUES = [
    ({"user": "0:0"}, "runner.docker.user: '0:0': stage containers never run as root"),
    ({"user": "root"}, "runner.docker.user: 'root': expected a numeric uid:gid"),
    ({"volumes": ["/:/host:rw"]}, "runner.docker.volumes: '/:/host:rw': binding / gives"),
    (
        {"volumes": ["/var/run/docker.sock:/var/run/docker.sock"]},
        "binding /var/run/docker.sock gives the container the host",
    ),
    ({"image": "attacker/image:1"}, "runner.docker.image: set by whoever runs the stack"),
    ({"network_mode": "host"}, "in the worker's environment (network_mode: XLEARNER_DOCKER_NET"),
    ({"env_passthrough": ["HOME"]}, "env_passthrough: XLEARNER_DOCKER_ENV_PASSTHROUGH"),
    (
        {"gpus": 2},
        "runner.docker.gpus: replaced by per-stage GPU counts; remove it and set "
        "resources.<stage>.gpus",
    ),
    ({"gpu_ids": ["0", "../x"]}, "runner.docker.gpu_ids: ['../x']: expected GPU indexes"),
    ({"gpu_ids": [0, 0]}, "runner.docker.gpu_ids: ['0', '0']: each GPU once"),
    ({"shm_size": "1e9"}, "runner.docker.shm_size: '1e9': expected a size such as 512m"),
]


@pytest.mark.parametrize("docker, message", HOSTILE_FORM_VALUES)
def test_hostile_form_values_are_refused_with_a_clear_message(docker, message):
    data = tiny_config_dict("/data", "/store", runner={"kind": "docker", "docker": docker})
    with pytest.raises(ConfigError) as info:
        validate_config(data, origin="the Prefect form")
    assert str(info.value).startswith("invalid config the Prefect form:")
    assert message in str(info.value)


def test_operator_settings_are_not_in_the_parameter_form():
    from xlearner.config import PipelineConfig

    form = PipelineConfig.model_json_schema()["$defs"]["DockerRunnerConfig"]["properties"]
    assert set(form) == {"gpu_ids", "shm_size", "user", "timeout_s", "labels", "volumes"}


def test_binds_outside_the_operators_data_roots_are_refused(monkeypatch, tmp_path):
    inside, outside = tmp_path / "data", tmp_path / "elsewhere"
    config = RunnerConfig(kind="docker", docker={"volumes": [f"{outside}:/x:ro"]})
    monkeypatch.delenv(DATA_ROOTS_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"{DATA_ROOTS_ENV} is unset"):
        make_runner(config)
    monkeypatch.setenv(DATA_ROOTS_ENV, str(inside))
    with pytest.raises(ConfigError, match=f"{outside}:/x:ro bind host folders outside"):
        make_runner(config)
    # a symlink under a root that points outside it is resolved first
    inside.mkdir()
    (inside / "link").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the data roots"):
        make_runner(RunnerConfig(kind="docker", docker={"volumes": [f"{inside}/link:/x"]}))
    assert make_runner(RunnerConfig(kind="docker", docker={"volumes": [f"{inside}/a:/a:ro"]}))


def test_the_operators_settings_reach_the_engine(docker_engine, monkeypatch, tmp_path):
    """The image, network and extra binds come from the worker's environment; the form's
    user, binds (under the data roots) and shm size come with them."""
    for key, value in docker_engine.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(IMAGE_ENV, docker_engine.image)
    monkeypatch.setenv(NETWORK_ENV, "none")
    monkeypatch.setenv(VOLUMES_ENV, f"{tmp_path}/cache:/cache")
    monkeypatch.setenv(DATA_ROOTS_ENV, str(tmp_path))
    config = RunnerConfig(
        kind="docker",
        docker={"user": "20002:20002", "volumes": [f"{tmp_path}/data:/data:ro"], "shm_size": "8m"},
    )
    runner = make_runner(config)
    stage = unique("operator")
    container = runner.client.containers.create(**runner.container_kwargs(["true"], stage=stage))
    try:
        attrs = runner.client.api.inspect_container(container.id)
    finally:
        container.remove(force=True)
    assert attrs["Config"]["Image"] == docker_engine.image
    assert attrs["Config"]["User"] == "20002:20002"
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none" and host["ShmSize"] == 8 * 2**20
    assert host["Binds"] == [f"{tmp_path}/cache:/cache", f"{tmp_path}/data:/data:ro"]
