"""``runner.kind: ray`` on a real two-node Ray cluster (issue 12, item 4).

Ray replaces 127.0.0.1 by the machine's interface address (``resolve_ip_for_localhost``),
even with ``--node-ip-address=127.0.0.1``, and tests may talk to loopback only: so the
cluster (a head and a second node, one CPU each) and everything that talks to it run in
a network namespace that has only loopback (``unshare --net``, as root). There the
checks of tests/integration/ray_cluster_checks.py run once for the module and write
what the tests below assert on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
GCS_PORT = 6379  # free: the namespace is new
WORKER_NODE_PORT = 6380  # the second node's raylet (the one the lost-node check kills)
CLUSTER = f"""
set -e
ip link set lo up
ray start --head --node-ip-address=127.0.0.1 --port={GCS_PORT} --num-cpus=1 \
    --dashboard-host=127.0.0.1 --temp-dir="$RAY_TMP" --disable-usage-stats
ray start --address=127.0.0.1:{GCS_PORT} --node-ip-address=127.0.0.1 --num-cpus=1 \
    --node-manager-port={WORKER_NODE_PORT} --disable-usage-stats
set +e
"$PYTHON" -m tests.integration.ray_cluster_checks "$OUT" "$WORK" 127.0.0.1:{GCS_PORT} \
    {WORKER_NODE_PORT}
rc=$?
ray stop --force
exit $rc
"""


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip: the cluster runs in a loopback-only namespace")
    work = tmp_path_factory.mktemp("ray")
    ray_tmp = tempfile.mkdtemp(prefix="xlr-", dir="/tmp")  # short: Ray's unix socket paths
    out = work / "checks.json"
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "WORK": str(work),
        "RAY_TMP": ray_tmp,
        # the same thread count for both runners (a Ray worker gets its num_cpus)
        "OMP_NUM_THREADS": "1",
        # a lost node is declared dead after ~3 s instead of ~15 s
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    try:
        done = subprocess.run(
            ["unshare", "--net", "--fork", "bash", "-c", CLUSTER],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"ray cluster checks: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0 and out.exists(), done.stdout[-6000:] + done.stderr[-6000:]
    return json.loads(out.read_text())


def rows(report: dict) -> dict:
    return {row["name"]: row for row in report["rows"]}


def test_the_pipeline_on_ray_gives_the_process_runners_report(checks):
    process, on_ray = checks["reports"]["process"], checks["reports"]["ray"]
    assert rows(on_ray).keys() == rows(process).keys() and rows(process)
    assert rows(on_ray) == rows(process)


def test_the_expansions_ran_on_both_nodes(checks):
    assert len(checks["cluster_nodes"]) == 2
    assert checks["expand_nodes"] == checks["cluster_nodes"]


def test_a_two_node_reconcile_trains_across_the_nodes_with_one_result(checks):
    ddp = checks["ddp"]
    assert sorted(ddp["nodes"]) == checks["cluster_nodes"]
    assert ddp["result_lines"] == 1
    assert ddp["result"]["model"].endswith("runs/reconcile/ddp-2-nodes/model")
    assert any(line.startswith("[node 1] ") for line in ddp["log"])


def test_a_timeout_cancels_the_ray_task_and_the_stage_gets_sigterm(checks):
    cancelled = checks["cancelled"]
    assert "timed out after 20 s and was cancelled on the Ray cluster" in cancelled["reason"]
    assert cancelled["marker"] == "checkpointed"  # its SIGTERM handler ran
    assert cancelled["seconds"] < 60  # not the 300 s it sleeps
    assert cancelled["states"] and "RUNNING" not in cancelled["states"], cancelled["states"]


def test_a_lost_node_fails_the_attempt_and_the_retry_resumes(checks):
    lost = checks["lost_node"]
    log = "\n".join(lost["log"])
    assert "Ray node was lost" in log and "exit code 75" in log, log[-4000:]
    assert "Retry 1/2" in log, log[-4000:]
    assert "resuming from checkpoint at step" in log, log[-4000:]
    assert lost["result"]["resumed_from_step"] > 0
    # the first attempt ran on the worker node (the head's CPU was held), the retry on the head
    # (Prefect's loggers may hand a line to the capturing handler twice: in order, once each)
    placed = [line.split(" on ")[1].split()[0] for line in lost["log"] if "[ray] node 0 " in line]
    worker = next(node for node in checks["cluster_nodes"] if node != checks["head_node"])
    assert list(dict.fromkeys(placed)) == [worker, checks["head_node"]], placed
