"""The KubeRay manifest (deploy/kuberay/raycluster.yaml) is a RayCluster of the stage image,
non-root, whose workers ask Kubernetes for GPUs."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.images import stage_image

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kuberay" / "raycluster.yaml"


def pod_specs(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def test_it_is_a_raycluster_of_the_stage_image_as_non_root():
    cluster = yaml.safe_load(MANIFEST.read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    for pod in pod_specs(cluster):
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["image"] == stage_image()
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_workers_ask_for_gpus_and_the_ray_version_is_the_pinned_one():
    cluster = yaml.safe_load(MANIFEST.read_text())
    workers = [
        c for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]
    ]
    assert workers and all(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for c in workers)
    pinned = Path(MANIFEST.parents[2] / "pyproject.toml").read_text()
    assert f'"ray[default]=={cluster["spec"]["rayVersion"]}"' in pinned
