"""The Ray runner against a real two-node cluster: run by tests/integration/test_ray_cluster.py
inside a network namespace that has only loopback, where that test started the cluster.

``python -m tests.integration.ray_cluster_checks OUT.json WORK_DIR RAY_ADDRESS WORKER_PORT``
writes what the test asserts on:

- ``reports``: the tiny pipeline's report with the process runner and with the Ray runner
  (same config and seed, each in a store of its own);
- ``expand_nodes``: the nodes Ray's task records (the state API) give for the expansions;
- ``cluster_nodes``: the ids of the cluster's two nodes;
- ``ddp``: a reconcile on 2 nodes x 1 process: its result and the nodes its log names;
- ``cancelled``: a stage that only a signal ends, timed out: how it ended, its Ray task;
- ``lost_node``: a reconcile on the worker node (the head's CPU held by an actor) whose node
  is killed after its first checkpoint: the Prefect task's attempts and its log.
"""

from __future__ import annotations

import os

# Before Prefect is imported (as in tests/conftest.py): no telemetry, time to start.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from prefect import flow
from prefect.testing.utilities import prefect_test_harness
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.util.state import list_tasks

from flows.pipeline import stage_env, xlearner_pipeline
from flows.plan import PipelineContext, publish_config, run_stage
from flows.runners.base import StageFailed
from flows.runners.ray import NODE_PYTHON, RayRunner
from tests.pipeline_config import tiny_config
from xlearner.config import RayRunnerConfig, StageResources
from xlearner.contract import ReconcileCall
from xlearner.data.synth import synthesize
from xlearner.store import open_store

ROOT = Path(__file__).resolve().parents[2]
IMAGES_PER_SOURCE = 120  # tests/conftest.py's synthetic sources


def config(work: Path, kind: str, address: str, **overrides):
    return tiny_config(
        str(work / "data"),
        str(work / f"store-{kind}"),
        f"sqlite:///{work / f'mlflow-{kind}.db'}",
        sources=("shapes_cls", "shapes_seg"),  # two expansions: one per node
        downstream=("down_cls_a",),
        runner={"kind": kind, "ray": {"address": address, "working_dir": str(ROOT)}},
        **overrides,
    )


def reconcile_call(cfg, store_uri: str, out: str, steps: int) -> ReconcileCall:
    """A reconcile of the sub-backbones the pipeline run in ``store_uri`` trained."""
    store = open_store(store_uri)
    subs = {}
    for key in store.list("runs/expand"):
        if key.endswith("/result.json"):
            result = store.read_json(key)
            subs[result["task"]] = result["model"]
    manifests = {}
    for key in store.list("runs/ingest"):
        if key.endswith("/result.json"):
            manifests.update(store.read_json(key)["manifests"])
    sources = {s.name for s in cfg.sources}
    return ReconcileCall(
        config=publish_config(cfg, store_uri),
        out=out,
        sub_models=subs,
        manifests={name: uri for name, uri in manifests.items() if name in sources},
        overrides=[f"reconcile.train.steps={steps}", "engine.checkpoint_every_steps=2"],
    )


def run_pipelines(work: Path, address: str) -> dict:
    reports, seconds = {}, {}
    for kind in ("process", "ray"):
        started = time.monotonic()
        reports[kind] = xlearner_pipeline(config=config(work, kind, address))["report"]
        seconds[kind] = round(time.monotonic() - started, 1)
    return {"reports": reports, "pipeline_seconds": seconds}


def expansion_nodes() -> list[str]:
    tasks = list_tasks(
        filters=[("name", "=", "xlearner-expand")], limit=100, raise_on_missing_output=False
    )
    return sorted({t.node_id for t in tasks if t.state == "FINISHED"})


def ddp_reconcile(work: Path, address: str) -> dict:
    cfg = config(work, "ray", address)
    store_uri = str(work / "store-ray")
    call = reconcile_call(cfg, store_uri, f"{store_uri}/runs/reconcile/ddp-2-nodes", steps=4)
    lines: list[str] = []
    run = RayRunner(cfg.runner.ray).run(
        "reconcile",
        call.to_argv(),
        env=stage_env(cfg),
        log=lines.append,
        resources=StageResources(nodes=2, procs_per_node=1),
    )
    results = [line for line in lines if line.startswith("XLEARNER_RESULT")]
    named = [line.split(" on ")[1].split()[0] for line in lines if line.startswith("[ray] node")]
    return {"result": run.result, "result_lines": len(results), "nodes": named, "log": lines}


STOPPABLE = """
import pathlib, signal, sys, time
def stop(*_):
    pathlib.Path(sys.argv[1]).write_text("checkpointed")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("started", flush=True)
time.sleep(300)
"""


def cancelled(work: Path, address: str) -> dict:
    """A stage that only a signal ends, timed out after 20 s: how it ended, and its Ray task.

    20 s, not less: the timeout counts from the Ray task's submission, and the stage must
    have set its SIGTERM handler by then (Python's start alone took over 5 s on a loaded
    CI machine)."""
    marker = work / "stopped"
    runner = RayRunner(RayRunnerConfig(address=address))
    started = time.monotonic()
    try:
        runner.run_command(
            [NODE_PYTHON, "-c", STOPPABLE, str(marker)], stage="stoppable", timeout_s=20
        )
        reason = "it was not stopped"
    except StageFailed as err:
        reason = str(err)
    seconds = time.monotonic() - started
    for _ in range(30):  # the state API lags the cluster by a moment
        states = [t.state for t in list_tasks(filters=[("name", "=", "xlearner-stoppable")])]
        if states and "RUNNING" not in states:
            break
        time.sleep(1)
    stopped = marker.read_text() if marker.exists() else None
    return {"reason": reason, "seconds": round(seconds, 1), "states": states, "marker": stopped}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def kill_worker_node(worker_port: int) -> None:
    """SIGKILL the worker node's raylet (the one started with --node-manager-port)."""
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if (
            "raylet" in (process.info["name"] or "")
            and f"--node_manager_port={worker_port}" in cmdline
        ):
            os.kill(process.pid, signal.SIGKILL)
            return
    raise RuntimeError(f"no raylet with node manager port {worker_port}")


@ray.remote(num_cpus=1)
class _Holder:
    """Holds a node's CPU, so that a stage has to run elsewhere."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def lost_node(work: Path, address: str, worker_port: int, head_node: str) -> dict:
    cfg = config(work, "ray", address)
    store_uri = str(work / "store-ray")
    out = f"{store_uri}/runs/reconcile/lost-node"
    call = reconcile_call(cfg, store_uri, out, steps=40)
    holder = _Holder.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head_node, soft=False)
    ).remote()
    ray.get(holder.node.remote())  # the head's only CPU is taken: the stage runs on node 2
    store = open_store(out)

    def kill_after_checkpoint() -> None:
        while not any("checkpoint" in key for key in store.list("")):
            time.sleep(0.2)
        kill_worker_node(worker_port)
        ray.kill(holder)  # the retry runs on the head, the worker node being gone

    killer = threading.Thread(target=kill_after_checkpoint, daemon=True)
    captured = _Lines()
    logging.getLogger("prefect").addHandler(captured)  # the task runs' loggers propagate

    @flow(name="ray-lost-node")
    def one_stage() -> dict:
        ctx = PipelineContext(cfg, call.config, None, env=stage_env(cfg))
        future = run_stage.submit(ctx, "reconcile-lost-node", call)
        killer.start()
        return future.result()

    started = time.monotonic()
    result = one_stage()
    return {
        "result": result,
        "seconds": round(time.monotonic() - started, 1),
        "log": [
            line for line in captured.lines if "reconcile-lost-node" in line or "Retry" in line
        ],
    }


def main() -> None:
    out, work, address, worker_port = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    synthesize(work / "data", seed=0, images_per_source=IMAGES_PER_SOURCE, log=lambda _: None)
    report: dict = {}
    with prefect_test_harness(server_startup_timeout=180):
        report.update(run_pipelines(work, address))
        ray.init(address=address, ignore_reinit_error=True)
        nodes = ray.nodes()
        report["cluster_nodes"] = sorted(n["NodeID"] for n in nodes if n["Alive"])
        head = next(
            n["NodeID"] for n in nodes if n["Alive"] and n["NodeManagerPort"] != worker_port
        )
        report["head_node"] = head
        report["expand_nodes"] = expansion_nodes()
        Path(out).write_text(json.dumps(report))
        report["ddp"] = ddp_reconcile(work, address)
        report["cancelled"] = cancelled(work, address)
        Path(out).write_text(json.dumps(report))
        report["lost_node"] = lost_node(work, address, worker_port, head)
    Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
