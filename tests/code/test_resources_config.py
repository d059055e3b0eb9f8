"""Per-stage resources: their defaults, validation at load, the Prefect form, and how a
stage's share is resolved against the host's GPU inventory (flows/gpus.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows import gpus
from flows.gpus import gpu_inventory, resolve_resources, stage_gpus
from flows.runners import StageFailed
from xlearner.config import ConfigError, StageResources, load_config
from xlearner.contract import ExitCode

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, overrides)
    return str(info.value)


@pytest.fixture
def fresh_detection(monkeypatch):
    """This process has detected nothing yet and said nothing about CPUs."""
    monkeypatch.setattr(gpus, "_once", gpus._Once())


def test_defaults_put_ingest_on_cpu_one_gpu_per_expansion_and_the_joint_stages_on_all():
    resources = load_config(QUICKSTART).resources
    assert resources.ingest.gpus == 0 and resources.expand.gpus == 1
    assert resources.reconcile.gpus == resources.squeeze.gpus == -1
    assert resources.reconcile.procs_per_node == 0  # one process per GPU
    assert resources.transfer.gpus == 1 and resources.expand.procs_per_node == 1


def test_the_old_docker_gpu_count_points_to_the_per_stage_setting():
    message = config_error(["runner.docker.gpus=2"])
    assert message.count("\n") == 1, message  # one error
    assert "runner.docker.gpus: replaced by per-stage GPU counts" in message
    assert "remove it and set resources.<stage>.gpus" in message


@pytest.mark.parametrize(
    "overrides, named",
    [
        (
            ["resources.expand.gpus=1", "resources.expand.procs_per_node=2"],
            "resources.expand: procs_per_node=2 is more than gpus=1",
        ),
        (["resources.reconcile.nodes=2"], "resources.reconcile.nodes=2: runner.kind 'process'"),
        (["runner.docker.gpu_ids=[GPU-1, x y]"], "runner.docker.gpu_ids: ['x y']: expected GPU"),
    ],
)
def test_bad_resources_name_the_field_and_the_fix(overrides, named):
    message = config_error(overrides)
    assert named in message, message
    assert any(fix in message for fix in ("lower", "set nodes: 1", "nvidia-smi")), message


def test_the_deployments_parameter_form_lists_each_stages_resources():
    from flows.deployments import pipeline_options
    from flows.pipeline import xlearner_pipeline

    deployment = xlearner_pipeline.to_deployment(
        **pipeline_options(load_config(QUICKSTART), None, None)
    )
    schema = deployment._parameter_openapi_schema.model_dump()  # what deploying sends
    definitions = schema["definitions"]
    assert schema["properties"]["config"]["$ref"] == "#/definitions/PipelineConfig"
    assert definitions["PipelineConfig"]["properties"]["resources"]["$ref"].endswith(
        "/ResourcesConfig"
    )
    stages = definitions["ResourcesConfig"]["properties"]
    assert set(stages) == {"ingest", "expand", "reconcile", "squeeze", "transfer"}
    fields = definitions["StageResources"]["properties"]
    assert {"gpus", "cpus", "memory", "nodes", "procs_per_node"} <= set(fields)
    assert fields["gpus"]["minimum"] == -1
    assert "gpu_ids" in definitions["DockerRunnerConfig"]["properties"]
    assert deployment.parameters["config"]["resources"]["expand"]["gpus"] == 1


def test_gpus_resolve_against_the_inventory():
    four = ["0", "1", "2", "3"]
    everything = resolve_resources("reconcile", StageResources(gpus=-1, procs_per_node=0), four)
    assert (everything.gpus, everything.procs_per_node) == (4, 4)
    one = resolve_resources("expand", StageResources(gpus=1), four)
    assert (one.gpus, one.procs_per_node) == (1, 1)
    on_cpu = resolve_resources("reconcile", StageResources(gpus=-1, procs_per_node=0), [])
    assert (on_cpu.gpus, on_cpu.procs_per_node) == (0, 1)
    ddp_on_cpu = resolve_resources("reconcile", StageResources(gpus=2, procs_per_node=2), [])
    assert (ddp_on_cpu.gpus, ddp_on_cpu.procs_per_node) == (0, 2)  # gloo


def test_more_gpus_than_the_host_has_is_bad_input():
    with pytest.raises(StageFailed) as info:
        resolve_resources("expand", StageResources(gpus=3), ["0", "1"])
    assert info.value.returncode == ExitCode.BAD_INPUT  # not retried
    assert "resources.expand.gpus=3 is more than the 2 GPU(s) of this host (0,1" in str(info.value)
    with pytest.raises(StageFailed, match=r"resources.squeeze.procs_per_node=4 is more than the 2"):
        resolve_resources("squeeze", StageResources(gpus=-1, procs_per_node=4), ["0", "1"])


def test_the_inventory_is_configured_or_detected(fresh_detection, tmp_path, monkeypatch, caplog):
    assert gpu_inventory(["0", "2"]) == ["0", "2"]
    smi = tmp_path / "nvidia-smi"  # what nvidia-smi --query-gpu=index prints on 2 GPUs
    smi.write_text('#!/bin/sh\n[ "$1" = --query-gpu=index ] && printf "0\\n1\\n"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_inventory(None) == ["0", "1"]
    smi.unlink()
    assert gpu_inventory(None) == ["0", "1"]  # detected once per process
    with caplog.at_level(logging.WARNING, logger="xlearner.gpus"):
        assert gpu_inventory([]) == [] and gpu_inventory([]) == []
    told = [r.message for r in caplog.records if "every stage runs on CPU" in r.message]
    assert told == ["no GPU on this host (runner.docker.gpu_ids is []): every stage runs on CPU"]


def test_no_nvidia_smi_means_no_gpu(fresh_detection, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert gpu_inventory(None) == []


def test_a_stage_on_cpu_gets_no_gpu_and_on_ray_is_not_pinned(fresh_detection):
    cfg = load_config(QUICKSTART, ["runner.docker.gpu_ids=[]"])
    with stage_gpus(cfg, "reconcile", lambda: "h") as (resources, gpu_ids):
        assert (resources.gpus, resources.procs_per_node, gpu_ids) == (0, 1, [])
    ray = load_config(QUICKSTART, ["runner.kind=ray", "resources.reconcile.nodes=2"])
    with stage_gpus(ray, "reconcile", lambda: "h") as (resources, gpu_ids):
        assert gpu_ids is None and resources == ray.resources.reconcile


def test_flow_run_containers_share_the_hosts_gpu_locks():
    from flows.deployments import docker_job_variables

    cfg = load_config(QUICKSTART)
    locks = "/var/lib/xlearner/gpu-locks"
    variables = docker_job_variables(cfg, {gpus.LOCK_DIR_ENV: locks})
    assert f"{locks}:{locks}" in variables["volumes"]
    assert variables["env"][gpus.LOCK_DIR_ENV] == locks
    assert docker_job_variables(cfg, {})["volumes"] == ["/var/run/docker.sock:/var/run/docker.sock"]
