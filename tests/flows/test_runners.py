"""The process runner against real subprocesses, and the helpers both runners share."""

from __future__ import annotations

import os
import pickle
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.runners import DockerRunner, ProcessRunner, StageFailed, make_runner, stage_command
from xlearner.config import RunnerConfig
from xlearner.secrets import redact, secret_values


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of ours that nobody reaped is a zombie: gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def test_stage_command():
    assert stage_command("train", ["--out", "s3://b/x"]) == [
        "python",
        "-m",
        "stages.train",
        "--out",
        "s3://b/x",
    ]
    assert stage_command("ingest", [], python="/venv/bin/python")[:3] == [
        "/venv/bin/python",
        "-m",
        "stages.ingest",
    ]


def test_lines_stream_as_they_come():
    arrivals: list[tuple[float, str]] = []
    result = ProcessRunner().run_command(
        python_command("""
            import time
            print("first", flush=True)
            time.sleep(1)
            print("second")
        """),
        stage="stream",
        log=lambda line: arrivals.append((time.monotonic(), line)),
    )
    finished = time.monotonic()
    assert [line for _, line in arrivals] == ["first", "second"]
    assert finished - arrivals[0][0] >= 0.8, "the first line only arrived when the process ended"
    assert result.returncode == 0
    assert result.result is None
    assert result.log_tail == "first\nsecond"
    assert result.seconds >= 1.0


def test_run_uses_the_stage_command_and_parses_the_last_result_line(tmp_path):
    # A stand-in interpreter: prints how it was called and two result lines.
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/sh\n"
        'echo "running $*"\n'
        "echo 'XLEARNER_RESULT {\"step\": 1}'\n"
        'echo "XLEARNER_RESULT {\\"argv\\": \\"$*\\", \\"cwd\\": \\"$(pwd)\\"}"\n'
    )
    fake_python.chmod(0o755)
    lines: list[str] = []
    result = ProcessRunner(python=str(fake_python), cwd=tmp_path).run(
        "train", ["--out", "s3://bucket/run"], env={}, log=lines.append, timeout_s=30
    )
    assert lines[0] == "running -m stages.train --out s3://bucket/run"
    assert result.result == {"argv": "-m stages.train --out s3://bucket/run", "cwd": str(tmp_path)}


def test_malformed_result_line_fails():
    with pytest.raises(StageFailed, match="malformed XLEARNER_RESULT"):
        ProcessRunner().run_command(
            python_command("print('XLEARNER_RESULT {not json')"), stage="bad", log=lambda _: None
        )


def test_exit_code_propagates_with_the_log_tail():
    with pytest.raises(StageFailed) as info:
        ProcessRunner().run_command(
            python_command("""
                import sys
                for i in range(80):
                    print(f"line {i}")
                print("boom", file=sys.stderr)
                sys.exit(3)
            """),
            stage="crash",
            log=lambda _: None,
        )
    err = info.value
    assert err.stage == "crash" and err.returncode == 3
    tail = err.log_tail.splitlines()
    assert len(tail) == 50 and tail[-1] == "boom" and tail[0] == "line 31"  # stderr merged
    assert "stage 'crash' failed with exit code 3" in str(err) and "boom" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.returncode == 3


def test_timeout_kills_the_whole_process_group():
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(StageFailed, match="timed out after 3 s") as info:
        ProcessRunner(kill_grace_s=2).run_command(
            # The shell's child `sleep` must die too, not only the shell.
            ["sh", "-c", "sleep 60 & echo $!; wait"],
            stage="slow",
            log=lines.append,
            timeout_s=3,
        )
    assert time.monotonic() - started < 10
    assert info.value.returncode is None
    grandchild = int(lines[0])
    deadline = time.monotonic() + 5
    while process_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(grandchild)


def test_cancellation_kills_the_process_and_reraises():
    pids: list[int] = []

    def interrupt(line: str) -> None:  # Ctrl-C while the stage runs
        pids.append(int(line))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ProcessRunner().run_command(
            ["sh", "-c", "sleep 60 & echo $!; wait"], stage="cancelled", log=interrupt
        )
    deadline = time.monotonic() + 5
    while process_alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(pids[0])


def test_child_environment_overlays_env_and_strips_mlflow_run_id(monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "exported-run")
    monkeypatch.setenv("XL_FROM_PARENT", "inherited")
    result = ProcessRunner().run_command(
        python_command("""
            import json, os
            keys = ["MLFLOW_RUN_ID", "XL_FROM_PARENT", "XL_EXPLICIT"]
            print("XLEARNER_RESULT " + json.dumps({k: os.environ.get(k) for k in keys}))
        """),
        stage="env",
        env={"XL_EXPLICIT": "given", "MLFLOW_RUN_ID": "explicit-run"},
        log=lambda _: None,
    )
    assert result.result == {
        "MLFLOW_RUN_ID": None,
        "XL_FROM_PARENT": "inherited",
        "XL_EXPLICIT": "given",
    }


def test_secrets_never_reach_the_log_or_the_error(monkeypatch):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    lines: list[str] = []
    with pytest.raises(StageFailed) as info:
        ProcessRunner().run_command(
            python_command("""
                import os, sys
                print("key is", os.environ["AWS_SECRET_ACCESS_KEY"])
                print("token", os.environ["XL_API_TOKEN"])
                print("db postgresql://xl:hunter22@db:5432/mlflow")
                sys.exit(1)
            """),
            stage="leaky",
            env={"XL_API_TOKEN": "tok-123456"},
            log=lines.append,
        )
    shown = "\n".join(lines) + str(info.value) + info.value.log_tail
    for value in (secret, "tok-123456", "hunter22"):
        assert value not in shown
    assert "key is ***" in lines and "token ***" in lines
    assert "db postgresql://xl:***@db:5432/mlflow" in lines


def test_redact_and_secret_values():
    env = {
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "POSTGRES_PASSWORD": "pw-1234",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "SHORT_TOKEN": "ab",
    }
    assert sorted(secret_values(env)) == ["AKIAEXAMPLE", "pw-1234", "s3cr3t-value"]
    text = "s3cr3t-value AKIAEXAMPLE pw-1234 http://mlflow:5000 s3://u:p4ss@host/x ab"
    assert redact(text, secret_values(env)) == "*** *** *** http://mlflow:5000 s3://u:***@host/x ab"


@pytest.mark.parametrize("gpu_ids, seen", [(["2", "3"], "'2,3'"), ([], "''"), (None, "None")])
def test_a_local_stage_sees_only_the_gpus_it_was_given(gpu_ids, seen, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lines: list[str] = []
    show = "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"
    ProcessRunner().run_command(
        [sys.executable, "-c", show], stage="gpus", log=lines.append, gpu_ids=gpu_ids
    )
    assert lines == [seen]


def test_make_runner():
    process_runner = make_runner(RunnerConfig())
    assert isinstance(process_runner, ProcessRunner) and process_runner.warm_start
    assert not make_runner(RunnerConfig(warm_start=False)).warm_start
    docker_runner = make_runner(RunnerConfig(kind="docker", docker={"gpu_ids": [0, 1]}))
    assert isinstance(docker_runner, DockerRunner)
    assert docker_runner.config.gpu_ids == ["0", "1"]
    from flows.runners.ray import RayRunner  # imported by make_runner only for kind ray

    ray_runner = make_runner(RunnerConfig(kind="ray", ray={"address": "127.0.0.1:6379"}))
    assert isinstance(ray_runner, RayRunner) and ray_runner.config.address == "127.0.0.1:6379"


# --- warm start: stages forked from the fork server that imported them -----------------

PROBE = [sys.executable, "-m", "tests.flows.stage_probe"]  # forked under warm start


def test_warm_start_runs_the_module_with_its_own_env_cwd_and_threads(tmp_path, monkeypatch):
    runner = ProcessRunner(cwd=tmp_path, warm_start=True)
    lines: list[str] = []
    result = runner.run_command(
        [*PROBE, "--exit", "0"], stage="probe", env={"XL_PROBE": "given", "OMP_NUM_THREADS": "1"},
        log=lines.append,
    )  # fmt: skip
    assert result.result == {
        "argv": ["--exit", "0"],
        "cwd": str(tmp_path),
        "probe_env": "given",
        "parent_only": None,
        "threads": 1,
        "preloaded": True,  # forked from the server that imported mlflow, not a new interpreter
    }
    assert "to stderr" in lines  # stderr is merged into the log, as with a subprocess
    assert lines[-1] == "atexit handler ran"  # the child exits like an interpreter
    # The environment is this process's at the stage's start, not the server's at its start.
    monkeypatch.setenv("XL_PARENT_ONLY", "later")
    monkeypatch.chdir(tmp_path.parent)
    again = ProcessRunner(warm_start=True).run_command(PROBE, stage="probe", log=lines.append)
    assert again.result["parent_only"] == "later"
    assert again.result["cwd"] == str(tmp_path.parent)


def test_warm_start_propagates_exit_codes_and_kills_the_group_on_timeout():
    runner = ProcessRunner(kill_grace_s=2, warm_start=True)
    with pytest.raises(StageFailed, match="exit code 3") as info:
        runner.run_command([*PROBE, "--exit", "3"], stage="probe", log=lambda _: None)
    assert info.value.returncode == 3 and "to stderr" in info.value.log_tail

    lines: list[str] = []
    with pytest.raises(StageFailed, match="timed out after 3 s"):
        runner.run_command([*PROBE, "--sleep-child"], stage="probe", log=lines.append, timeout_s=3)
    grandchild = int(lines[0])
    deadline = time.monotonic() + 5
    while process_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(grandchild)


def test_warm_start_runs_a_real_stage_and_reports_its_input_errors(tmp_path):
    with pytest.raises(StageFailed) as info:
        ProcessRunner(warm_start=True).run(
            "ingest",
            ["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")],
            log=lambda _: None,
        )
    assert info.value.returncode == 2
    assert "missing.yaml does not exist" in info.value.log_tail
    assert "RuntimeWarning" not in info.value.log_tail  # runpy's, on running a loaded module
