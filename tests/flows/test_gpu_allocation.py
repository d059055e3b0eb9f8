"""GPU allocation on one host (flows/gpus.py) against a real Docker engine and Prefect.

The engine is ``gpu_docker_engine`` (conftest.py): a private dockerd whose fake NVIDIA
hook stands in for the NVIDIA Container Toolkit, so a container asking for GPU ids
starts on this GPU-less machine and sees them in ``NVIDIA_VISIBLE_DEVICES``. Prefect is
a test harness's temporary server (the global concurrency limit lives there).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid

import pytest

from flows.gpus import LOCK_DIR_ENV, GpuAllocator, limit_name
from flows.operator import DockerSettings
from flows.runners import DockerRunner
from xlearner.config import DockerRunnerConfig, StageResources

pytestmark = pytest.mark.integration  # a dockerd and a Prefect server, started here

INVENTORY = ["0", "1", "2", "3"]
STAGE_S = 2.0


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def read_limit(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def test_concurrent_stages_get_disjoint_gpus_and_the_fifth_waits(
    gpu_docker_engine, prefect_server, tmp_path
):
    host = f"test-{uuid.uuid4().hex[:8]}"
    allocator = GpuAllocator(INVENTORY, host=host, lock_dir=tmp_path / "locks", poll_s=0.1)
    runner = DockerRunner(
        DockerRunnerConfig(gpu_ids=INVENTORY),
        client=gpu_docker_engine.client,
        settings=DockerSettings(image=gpu_docker_engine.image),
        stop_timeout_s=2,
    )
    runs: list[dict] = []
    errors: list[BaseException] = []
    # The first four to get a GPU start their containers together (however slowly the
    # engine starts them), so a fifth can only get one when a container ended.
    first_four = threading.Barrier(4, timeout=60)
    holders = iter(range(4))
    holders_lock = threading.Lock()

    def expansion(n: int) -> None:
        try:
            asked = time.monotonic()
            with allocator.allocate(f"expand-{n}", 1, log=lambda _: None) as ids:
                got = time.monotonic()
                with holders_lock:
                    among_first = next(holders, None) is not None
                if among_first:
                    first_four.wait()
                lines: list[str] = []
                runner.run_command(
                    ["sh", "-c", f'echo "seen=$NVIDIA_VISIBLE_DEVICES"; sleep {STAGE_S}'],
                    stage=f"expand-{n}",
                    log=lines.append,
                    resources=StageResources(gpus=1),
                    gpu_ids=ids,
                    timeout_s=60,
                )
                end = time.monotonic()
                runs.append({"ids": ids, "asked": asked, "start": got, "end": end, "lines": lines})
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=expansion, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(runs) == 5
    for run in runs:  # the container saw exactly the GPU it was given
        assert run["lines"] == [f"seen={run['ids'][0]}"]
    for a in runs:  # no id held by two runs at any moment
        for b in runs:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert not set(a["ids"]) & set(b["ids"]), (a, b)
    last = max(runs, key=lambda r: r["start"])
    others = [r for r in runs if r is not last]
    first_end = min(r["end"] for r in others)
    assert len({i for r in others for i in r["ids"]}) == 4  # four at once, on all four
    assert last["asked"] < first_end <= last["start"], "the fifth did not wait for a GPU"
    limit = read_limit(limit_name(host))  # one slot per GPU, all free again
    assert limit.limit == 4 and limit.active_slots == 0


def test_runs_of_two_prefect_servers_on_one_host_never_share_an_id(prefect_server, tmp_path):
    # Two allocators with their own limits (as two Prefect servers would have) but one
    # lock folder: the lock files alone keep their ids apart.
    locks = tmp_path / "locks"
    mine = GpuAllocator(["0", "1"], host=f"a-{uuid.uuid4().hex[:8]}", lock_dir=locks)
    theirs = GpuAllocator(["0", "1"], host=f"b-{uuid.uuid4().hex[:8]}", lock_dir=locks, poll_s=0.1)
    waited: list[str] = []
    got: list[list[str]] = []
    with mine.allocate("reconcile", 2, log=lambda _: None) as held:
        assert held == ["0", "1"]

        def other() -> None:
            with theirs.allocate("expand", 1, log=waited.append) as ids:
                got.append(ids)

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(1.0)
        assert got == [] and any("waiting for 1 free GPU" in line for line in waited)
    thread.join(timeout=30)
    assert got == [["0"]]


def test_the_flows_stage_tasks_hold_their_gpus_while_they_run(
    prefect_server, synth_data, tmp_path, monkeypatch, caplog
):
    """run_stage (flows/plan.py) as the flow runs it: each ingest, given a GPU here, takes
    GPU 0 in turn and sees only it; on CPU (its default) it takes none."""
    from prefect import flow

    from flows.plan import Plan, publish_config
    from tests.pipeline_config import tiny_config_dict
    from xlearner.config import validate_config

    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    data = tiny_config_dict(
        str(synth_data.root), str(tmp_path / "store"), f"sqlite:///{tmp_path / 'mlflow.db'}",
        sources=("shapes_cls",), downstream=("down_cls_a",),
        runner={"kind": "process", "docker": {"gpu_ids": ["0"]}},
        resources={"ingest": {"gpus": 1}},
    )  # fmt: skip
    cfg = validate_config(data)

    @flow
    def ingest_all() -> dict:
        plan = Plan.start(cfg, publish_config(cfg, str(tmp_path / "store")), None, env={})
        return plan.ingest()

    prefect_logs = logging.getLogger("prefect")  # it does not propagate to the root logger
    prefect_logs.addHandler(caplog.handler)
    try:
        versions = ingest_all()
    finally:
        prefect_logs.removeHandler(caplog.handler)
    assert set(versions) == {"shapes_cls", "down_cls_a"}
    for source in versions:
        assert f"[ingest-{source}] ingest: on GPU(s) 0" in caplog.text
    limit = read_limit(limit_name(socket.gethostname()))
    assert limit.limit == 1 and limit.active_slots == 0
