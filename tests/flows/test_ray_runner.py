"""The Ray runner's parts that need no cluster: the connection error, sizes, node commands.
Against a real cluster: tests/integration/test_ray_cluster.py."""

from __future__ import annotations

import pytest

from flows.runners.base import StageFailed
from flows.runners.ray import NODE_PYTHON, NodeLaunch, RayRunner, memory_bytes
from xlearner.config import RayRunnerConfig
from xlearner.contract import ExitCode


def test_without_an_address_the_stage_fails_saying_what_to_set(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(StageFailed) as failed:
        RayRunner(RayRunnerConfig()).run("expand", ["--help"])
    assert failed.value.returncode == ExitCode.BAD_INPUT  # not retried: it fails the same way
    assert "runner.ray.address" in str(failed.value) and "RAY_ADDRESS" in str(failed.value)


def test_memory_sizes_are_bytes():
    assert memory_bytes("64g") == 64 * 1024**3
    assert memory_bytes("512m") == 512 * 1024**2
    assert memory_bytes("100") == 100
    assert memory_bytes(None) is None


def launch(procs: int, nodes: int, rank: int = 0) -> NodeLaunch:
    command = [NODE_PYTHON, "-m", "stages.reconcile", "--out", "s3://b/o"]
    return NodeLaunch(command, {}, None, procs, nodes, rank, "job", None)


def test_one_process_runs_the_stage_command_with_the_nodes_python():
    assert launch(1, 1).node_command("/opt/venv/bin/python", "10.0.0.1:29500") == [
        "/opt/venv/bin/python", "-m", "stages.reconcile", "--out", "s3://b/o",
    ]  # fmt: skip


def test_several_nodes_join_node_0s_rendezvous_under_torchrun():
    command = launch(2, 3, rank=1).node_command("/py", "10.0.0.1:29500")
    assert command[:3] == ["/py", "-m", "torch.distributed.run"]
    text = " ".join(command)
    assert "--nnodes 3 --node-rank 1" in text and "--rdzv-endpoint 10.0.0.1:29500" in text
    assert "--nproc-per-node 2" in text and "--rdzv-id job" in text
    assert command[-4:] == ["-m", "stages.reconcile", "--out", "s3://b/o"]
    assert "--standalone" in launch(2, 1).node_command("/py", "unused:1")


def test_only_a_module_command_runs_under_torchrun():
    bad = NodeLaunch([NODE_PYTHON, "script.py"], {}, None, 2, 1, 0, "job", None)
    with pytest.raises(ValueError, match="python -m"):
        bad.node_command("/py", "h:1")
