"""A stage of more than one process runs under torchrun (flows/runners/base.py).

The command the runners build, and a real expand stage of the tiny config launched by
the process runner with ``procs_per_node: 2`` on CPU (gloo): two processes, one result
line (rank 0's), exit 0. What DDP does inside the stage is tests/model/test_ddp_stages.py's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from flows.runners import ProcessRunner, torchrun_command
from flows.runners.base import processes_per_node
from tests.pipeline_config import tiny_config_dict
from xlearner.config import StageResources, validate_config
from xlearner.contract import RESULT_PREFIX, ExpandCall
from xlearner.data.ingest import ingest_source
from xlearner.integrity import verified_result
from xlearner.store import LocalStore, open_store
from xlearner.store_keys import manifest_key


def test_one_node_is_standalone_and_several_meet_at_the_rendezvous():
    assert torchrun_command("stages.expand", ["--task", "cls"], python="py", nproc_per_node=4) == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
        "--max-restarts", "0", "-m", "stages.expand", "--task", "cls",
    ]  # fmt: skip
    assert torchrun_command(
        "stages.reconcile", [], python="py", nproc_per_node=8, nnodes=2, node_rank=1,
        rdzv_endpoint="10.0.0.1:29400", rdzv_id="run-1",
    ) == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node", "8", "--nnodes", "2",
        "--node-rank", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29400",
        "--rdzv-id", "run-1", "--max-restarts", "0", "-m", "stages.reconcile",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="needs rdzv_endpoint and rdzv_id"):
        torchrun_command("stages.reconcile", [], python="py", nproc_per_node=1, nnodes=2)


def test_processes_per_node_is_one_per_allocated_gpu_unless_given():
    assert processes_per_node(None, None) == 1
    assert processes_per_node(StageResources(gpus=-1, procs_per_node=0), ["0", "1", "2"]) == 3
    assert processes_per_node(StageResources(gpus=-1, procs_per_node=0), []) == 1  # CPU
    assert processes_per_node(StageResources(gpus=4, procs_per_node=2), ["0", "1", "2", "3"]) == 2


def test_a_multi_node_stage_is_refused_by_a_one_host_runner():
    from flows.runners import StageFailed

    with pytest.raises(StageFailed, match=r"resources.expand.nodes=2 needs runner.kind: ray"):
        ProcessRunner().run("expand", [], resources=StageResources(nodes=2), log=lambda _: None)


def ingested(synth_data, tmp_path) -> tuple[Path, dict[str, str]]:
    """The tiny config of one source (ingested) and one downstream set: its file, manifests."""
    data = tiny_config_dict(
        str(synth_data.root),
        str(tmp_path / "store"),
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        sources=("shapes_cls",),
        downstream=("down_cls_a",),
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = validate_config(data)
    store = LocalStore(tmp_path / "store")
    manifest = ingest_source(cfg.sources[0], store, image_size=cfg.model.image_size)
    return config, {"shapes_cls": store.uri(manifest_key("shapes_cls", manifest["version"]))}


# a real stage in three fresh interpreters (torchrun's and its two workers): ~20 s
def test_a_two_process_stage_runs_under_torchrun_with_one_result(synth_data, tmp_path, monkeypatch):
    config, manifests = ingested(synth_data, tmp_path)
    out = str(tmp_path / "store" / "runs" / "expand-ddp")
    call = ExpandCall(config=str(config), out=out, task="cls", manifests=manifests, steps=4)
    lines: list[str] = []

    # never forked from the warm-start server: torchrun's processes are torchrun's children
    def no_fork(*args, **kwargs):
        raise AssertionError("torchrun was forked from the warm-start server")

    monkeypatch.setattr("flows.runners.warm_start.ForkedStage", no_fork)
    runner = ProcessRunner(python=sys.executable, warm_start=True)
    run = runner.run(
        "expand",
        call.to_argv(),
        env={"OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO"},
        log=lines.append,
        resources=StageResources(gpus=0, procs_per_node=2),
        gpu_ids=[],
        timeout_s=600,
    )
    log = "\n".join(lines)
    assert run.returncode == 0 and "Traceback" not in log
    # torchrun's own record (LOGLEVEL=INFO): one node, two workers, both done
    assert re.search(r"nproc_per_node\s+: 2", log) and "global_world_sizes=[2, 2]" in log
    assert "WorkerState.SUCCEEDED" in log
    assert sum(line.startswith(RESULT_PREFIX) for line in lines) == 1  # rank 0's only
    assert run.result is not None and run.result["out"] == out
    assert verified_result(open_store(out)) is not None


class _StopNow(Exception):
    """Raised from the log callback: the runner stops the stage as on a cancellation."""


def test_a_stopped_two_process_stage_checkpoints_where_it_stopped(synth_data, tmp_path):
    """The runner's stop (SIGTERM to the stage's process group) reaches torchrun, which
    passes it on to its workers (each in a session of its own): they checkpoint the step
    they are at and exit."""
    config, manifests = ingested(synth_data, tmp_path)
    out = tmp_path / "store" / "runs" / "expand-ddp-stop"
    no_periodic = ["engine.checkpoint_every_steps=100000"]  # only the stop checkpoints
    call = ExpandCall(
        config=str(config), out=str(out), task="cls", manifests=manifests, steps=100000,
        overrides=no_periodic,
    )  # fmt: skip

    def log(line: str) -> None:
        if re.search(r"step 2/100000", line):
            raise _StopNow

    with pytest.raises(_StopNow):
        ProcessRunner(python=sys.executable).run(
            "expand",
            call.to_argv(),
            env={"OMP_NUM_THREADS": "1"},
            log=log,
            resources=StageResources(gpus=0, procs_per_node=2),
            gpu_ids=[],
            timeout_s=600,
        )
    latest = out / "checkpoints" / "latest.json"
    assert latest.exists(), "the stopped stage left no checkpoint"
    assert 2 <= json.loads(latest.read_text())["step"] < 100000
    assert not (out / "result.json").exists()


def test_workers_of_a_killed_torchrun_stop_too(synth_data, tmp_path):
    """SIGKILL of torchrun (its own stop never runs) must not leave its workers training:
    they live in sessions of their own, so they get SIGTERM as torchrun dies."""
    config, manifests = ingested(synth_data, tmp_path)
    out = tmp_path / "store" / "runs" / "expand-ddp-orphans"
    call = ExpandCall(
        config=str(config), out=str(out), task="cls", manifests=manifests, steps=100000
    )
    command = torchrun_command(
        "stages.expand", call.to_argv(), python=sys.executable, nproc_per_node=2
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    workers: list[psutil.Process] = []
    try:
        for line in launcher.stdout:
            if "step 2/100000" in line:
                break
        workers = psutil.Process(launcher.pid).children(recursive=True)
        assert len(workers) >= 2, [w.cmdline() for w in workers]
        launcher.kill()
        launcher.wait(30)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived torchrun: {[w.pid for w in alive]}"
    finally:  # orphans are no children of this process any more
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        launcher.kill()
        launcher.stdout.close()
