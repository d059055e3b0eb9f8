"""Every training stage under torchrun with 2 CPU processes (gloo), and across 2 "nodes".

Each case is a real ``python -m torch.distributed.run ... -m stages.<name>`` launch on the
tiny config: it exits 0, prints exactly one result line (rank 0's), opens exactly one
MLflow child run, and publishes an output that verifies. The upstream outputs (ingested
sources, the expanded sub-models) are made once per module, in this process.
:mod:`tests.model.ddp_stage_probe` records the weights every rank ends with, so the
two-node rendezvous (two torchrun launches, ``--nnodes 2``, inside a network namespace
that has only loopback) can show that both ranks hold the published weights.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages import expand
from tests.model.ddp_stage_probe import WEIGHTS_DIR_ENV
from tests.pipeline_config import ingest_all, tiny_config_dict
from xlearner import tracking
from xlearner.config import validate_config
from xlearner.contract import (
    RANDOM_BACKBONE,
    RESULT_PREFIX,
    ExitCode,
    ExpandCall,
    ReconcileCall,
    SqueezeCall,
    StageCall,
    TransferCall,
)
from xlearner.integrity import verified_result
from xlearner.store import LocalStore, open_store

pytestmark = pytest.mark.slow  # every case starts fresh interpreters under torchrun

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def pipeline(synth_data, tmp_path_factory) -> dict:
    """The tiny config (cls + seg sources, a seg downstream set), its ingested manifests,
    the expanded cls and seg sub-models, and an MLflow parent run for the stages."""
    work = tmp_path_factory.mktemp("ddp")
    data = tiny_config_dict(
        str(synth_data.root),
        str(work / "store"),
        f"sqlite:///{work / 'mlflow.db'}",
        sources=("shapes_cls", "shapes_seg"),
        downstream=("down_seg",),
    )
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = validate_config(data)
    store = LocalStore(work / "store")
    manifests = ingest_all([*cfg.sources, *cfg.downstream], store, image_size=cfg.model.image_size)
    training = {k: v for k, v in manifests.items() if k != "down_seg"}
    subs = {}
    for task in ("cls", "seg"):
        out = work / "store" / "runs" / f"expand-{task}"
        call = ExpandCall(config=str(config), out=str(out), task=task, manifests=training)
        assert expand.main(call.to_argv()) == 0
        subs[task] = str(out / "model")
    tracking.configure(cfg.tracking)
    with mlflow.start_run(run_name="ddp-tests") as parent:
        pass
    return {
        "work": work,
        "config": str(config),
        "manifests": training,
        "downstream": {"down_seg": manifests["down_seg"]},
        "subs": subs,
        "parent": parent.info.run_id,
        "tracking": cfg.tracking,
    }


def stage_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def result_lines(text: str) -> list[dict]:
    return [
        json.loads(line.split(RESULT_PREFIX, 1)[1])
        for line in text.splitlines()
        if RESULT_PREFIX in line
    ]


def child_runs(pipeline: dict, stage_tag: str) -> list:
    tracking.configure(pipeline["tracking"])
    found = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{pipeline['parent']}'", output_format="list"
    )
    return [run for run in found if run.data.tags.get("xlearner.stage") == stage_tag]


def calls(p: dict, out: str) -> dict[str, tuple[StageCall, str]]:
    """Each stage's call on the tiny pipeline and its MLflow run name."""
    common = {"config": p["config"], "out": out, "mlflow_parent_run_id": p["parent"]}
    return {
        "expand": (
            ExpandCall(**common, task="cls", manifests=p["manifests"], steps=4),
            "expand-cls",
        ),
        "reconcile": (
            ReconcileCall(**common, sub_models=p["subs"], manifests=p["manifests"]),
            "reconcile",
        ),
        "squeeze-distill": (
            SqueezeCall(**common, sub_models=p["subs"], manifests=p["manifests"]),
            "squeeze-distill",
        ),
        "squeeze-prune": (
            SqueezeCall(
                **common,
                sub_models=p["subs"],
                manifests=p["manifests"],
                overrides=["squeeze.method=prune"],
            ),
            "squeeze-prune",
        ),
        "transfer": (
            TransferCall(
                **common,
                backbones={"random": f"{RANDOM_BACKBONE}tiny_resnet"},
                downstream=p["downstream"],
            ),
            "transfer",
        ),
    }


@pytest.mark.parametrize(
    "case", ["expand", "reconcile", "squeeze-distill", "squeeze-prune", "transfer"]
)
def test_stage_with_two_processes_publishes_once(pipeline, case):
    out = str(pipeline["work"] / "store" / "runs" / f"ddp-{case}")
    call, run_name = calls(pipeline, out)[case]
    command = [
        *TORCHRUN, "--standalone", "--nproc-per-node", str(WORLD),
        "-m", f"stages.{call.stage.value}", *call.to_argv(),
    ]  # fmt: skip
    run = subprocess.run(
        command, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    lines = result_lines(run.stdout + run.stderr)
    assert len(lines) == 1, f"{len(lines)} result lines"  # rank 0's only
    published = verified_result(open_store(out))  # every file it lists is intact
    assert published is not None and published.out == lines[0]["out"] == out
    runs = child_runs(pipeline, run_name)
    assert len(runs) == 1, f"{len(runs)} MLflow child runs for {run_name}"
    if call.stage.value != "transfer":  # a training stage logs its (all-reduced) losses
        assert "train/loss" in runs[0].data.metrics
        assert "lr" not in runs[0].data.metrics
    else:
        assert published.model_extra["report"]["rows"][0]["name"] == "random"


def test_a_done_output_is_skipped_on_every_rank(pipeline):
    """Rank 0 finds result.json and tells the other rank: nobody waits in the body."""
    out = str(pipeline["work"] / "store" / "runs" / "ddp-skip")
    call, _ = calls(pipeline, out)["expand"]
    command = [
        *TORCHRUN, "--standalone", "--nproc-per-node", str(WORLD),
        "-m", "stages.expand", *call.to_argv(),
    ]  # fmt: skip
    first = subprocess.run(command, cwd=ROOT, env=stage_env(), capture_output=True, text=True)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    again = subprocess.run(
        command, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    lines = result_lines(again.stdout + again.stderr)
    assert len(lines) == 1 and lines[0]["skipped"] is True


def test_a_failure_of_rank_0_before_the_body_ends_every_rank(pipeline):
    """Rank 0 cannot take the output's lease (another writer holds it): both ranks exit
    with BUSY instead of rank 1 training alone and waiting forever for rank 0."""
    from xlearner.lease import output_lease

    out = str(pipeline["work"] / "store" / "runs" / "ddp-busy")
    call, _ = calls(pipeline, out)["expand"]
    command = [
        *TORCHRUN, "--standalone", "--nproc-per-node", str(WORLD),
        "-m", "stages.expand", *call.to_argv(),
    ]  # fmt: skip
    with output_lease(out, None, run="other-writer", wait_s=0):
        run = subprocess.run(
            command,
            cwd=ROOT,
            env=stage_env(XLEARNER_LEASE_WAIT_S="0"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    text = run.stdout + run.stderr
    assert run.returncode != 0 and not result_lines(text)
    assert text.count(f"BUSY, exit {int(ExitCode.BUSY)}") == WORLD, text[-4000:]


def test_stopped_stage_resumes_on_both_ranks_from_the_same_step(pipeline):
    """SIGTERM to the torchrun group after a checkpoint: both ranks stop at the same step
    (checkpointed); the rerun resumes both ranks from that checkpoint."""
    out = Path(pipeline["work"] / "store" / "runs" / "ddp-resume")
    call, _ = calls(pipeline, str(out))["expand"]
    argv = [*call.to_argv(), "--steps", "400"]
    command = [
        *TORCHRUN, "--standalone", "--nproc-per-node", str(WORLD), "-m", "stages.expand", *argv,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    latest = out / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # torchrun's agent passes it on to every worker
    stopped = proc.communicate(timeout=120)[0]
    assert latest.exists(), stopped[-4000:]
    assert stopped.count("stop requested: checkpointed step") == WORLD, stopped[-4000:]
    step = json.loads(latest.read_text())["step"]
    assert 0 < step < 400 and not (out / "result.json").exists()

    rerun = subprocess.run(
        command, cwd=ROOT, env=stage_env(), capture_output=True, text=True, timeout=600
    )
    text = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, text[-4000:]
    assert text.count(f"resuming from checkpoint at step {step}/400") == WORLD, text[-4000:]
    (result,) = result_lines(text)
    assert result["resumed_from_step"] == step


def test_two_node_rendezvous_on_loopback_ends_with_identical_weights(pipeline, tmp_path):
    """Two torchrun launches (--nnodes 2, c10d rendezvous), one process each, inside a
    network namespace with only loopback: one result line, and both ranks end with the
    weights rank 0 published; every connection seen is on 127.0.0.1."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip for a private network namespace")
    out = pipeline["work"] / "store" / "runs" / "ddp-two-nodes"
    call, _ = calls(pipeline, str(out))["reconcile"]
    port = 29531  # the namespace is new: nothing else listens there
    node = [
        *TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ddp-test",
        "--local-addr", "127.0.0.1",
    ]  # fmt: skip
    stage = ["-m", "tests.model.ddp_stage_probe", "reconcile", *call.to_argv()]
    launches = [
        f"{shlex.join([*node, '--node-rank', str(rank), *stage])} > {tmp_path}/node{rank}.log 2>&1"
        f" & pid{rank}=$!"
        for rank in (0, 1)
    ]
    script = "\n".join(
        [
            "ip link set lo up",
            *launches,
            f"while kill -0 $pid0 2>/dev/null || kill -0 $pid1 2>/dev/null; do"
            f" ss -Htn >> {tmp_path}/ss.txt; sleep 0.5; done",
            "wait $pid0; rc0=$?; wait $pid1; rc1=$?",
            "echo rc $rc0 $rc1",
        ]
    )
    env = stage_env(**{WEIGHTS_DIR_ENV: str(tmp_path), "GLOO_SOCKET_IFNAME": "lo"})
    ran = subprocess.run(
        ["unshare", "--net", "--fork", "bash", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert ran.stdout.strip().endswith("rc 0 0"), ran.stdout + ran.stderr + logs[0][-3000:]
    lines = result_lines(logs[0] + logs[1])
    assert len(lines) == 1, f"{len(lines)} result lines across both launches"

    published = load_file(out / "model" / "model.safetensors")
    for rank in (0, 1):
        held = load_file(tmp_path / f"rank{rank}.safetensors")
        assert held.keys() == published.keys()
        differ = [k for k in held if not torch.equal(held[k], published[k])]
        assert not differ, f"rank {rank} ended with other weights than published: {differ[:5]}"

    connections = [  # State Recv-Q Send-Q Local Peer; a dual-stack socket shows ::ffff:
        [addr.replace("[::ffff:127.0.0.1]", "127.0.0.1") for addr in line.split()[3:5]]
        for line in (tmp_path / "ss.txt").read_text().splitlines()
    ]
    assert [f"127.0.0.1:{port}" in pair for pair in connections].count(True), "no rendezvous"
    for pair in connections:
        assert all(addr.startswith("127.0.0.1:") for addr in pair), pair
