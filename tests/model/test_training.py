"""Expansion and reconciliation on synthetic sources learn for real (CPU, tiny_resnet).

One module-scoped run: ingest, one expand stage per task, then reconcile; validation
metrics must beat chance clearly. The kill test SIGKILLs a real stage process after a
checkpoint and checks that the restarted stage resumes from that step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stages import expand, reconcile
from tests.pipeline_config import ingest_all, tiny_config_dict
from xlearner.config import validate_config
from xlearner.metrics import MeanIoU
from xlearner.store import LocalStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"steps": 60, "batch_size": 16, "lr": 0.003, "warmup_steps": 5}


@pytest.fixture(scope="module")
def setup(synth_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("training")
    data = tiny_config_dict(
        str(synth_data.root),
        str(work / "store"),
        model={"backbone": "tiny_resnet", "image_size": 48},
        engine={"log_every_steps": 10, "checkpoint_every_steps": 10, "eval_max_images": 64},
    )
    data["tasks"] = {t: TRAIN for t in ("cls", "det", "seg")}
    data["reconcile"] = {"train": {**TRAIN, "steps": 20}}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = validate_config(data)
    store = LocalStore(work / "store")
    manifests = ingest_all(cfg.sources, store, image_size=cfg.model.image_size)
    manifest_args = [a for n, uri in manifests.items() for a in ("--manifest", f"{n}={uri}")]
    return work, config, manifest_args


def background_only_miou(mask_dir: Path, size: int, num_classes: int) -> float:
    """The mIoU of a model that predicts background everywhere: the seg chance level."""
    metric = MeanIoU(num_classes)
    for path in sorted(mask_dir.glob("*.png")):
        mask = np.array(Image.open(path).resize((size, size), Image.NEAREST))
        mask = torch.from_numpy(mask).long()[None]
        metric.update(torch.zeros_like(mask), {"mask": mask})
    return metric.compute()["mIoU"]


def run_stage(main, args: list[str], capsys) -> dict:
    assert main(args) == 0, capsys.readouterr().out[-3000:]
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("XLEARNER_RESULT ")][-1]
    return json.loads(line.removeprefix("XLEARNER_RESULT "))


def test_expand_each_task_then_reconcile_beats_chance(setup, synth_data, capsys):
    work, config, manifest_args = setup
    # ~0.16 here: background covers ~80% of the pixels, 4 shape classes score 0
    seg_chance = background_only_miou(Path(synth_data.paths["shapes_seg"]) / "masks", 48, 5)
    subs = {}
    for task in ("cls", "det", "seg"):
        out = str(work / "store" / "runs" / f"expand-{task}")
        subs[task] = run_stage(
            expand.main,
            ["--config", str(config), "--task", task, *manifest_args, "--out", out],
            capsys,
        )
    cls = subs["cls"]["metrics"]["shapes_cls:cls"]["top1"]
    det = subs["det"]["metrics"]["shapes_det:det"]["mAP50"]
    seg = subs["seg"]["metrics"]["shapes_seg:seg"]["mIoU"]
    print(f"expanded: cls top1 {cls:.3f}, det mAP50 {det:.3f}, seg mIoU {seg:.3f}")
    assert cls > 0.4  # 4 shapes: chance is 0.25 (val: ~24 images, so 0.4 is ~5% by luck)
    assert det > 0.15  # chance is ~0
    assert seg > 1.5 * seg_chance

    sub_args = [a for t, r in subs.items() for a in ("--sub-model", f"{t}={r['model']}")]
    out = str(work / "store" / "runs" / "reconcile")
    rec = run_stage(
        reconcile.main, ["--config", str(config), *sub_args, *manifest_args, "--out", out], capsys
    )
    metrics = rec["metrics"]
    print(f"reconciled: {metrics}")
    assert metrics["shapes_cls:cls"]["top1"] > 0.4
    assert metrics["shapes_det:det"]["mAP50"] > 0.15
    assert metrics["shapes_seg:seg"]["mIoU"] > 1.5 * seg_chance
    assert Path(out, "model", "model.safetensors").exists() and Path(out, "result.json").exists()
    assert not list(Path(out).glob("checkpoints/*")), (
        "checkpoints are dropped once the stage is done"
    )


def test_killed_stage_resumes_from_its_last_checkpoint(setup):
    work, config, manifest_args = setup
    out = work / "store" / "runs" / "expand-killed"
    command = [
        sys.executable,
        "-m",
        "stages.expand",
        "--config",
        str(config),
        "--task",
        "cls",
        *manifest_args,
        "--out",
        str(out),
        "--set",
        "tasks.cls.steps=40",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    latest = out / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if not latest.exists():
        proc.kill()
        pytest.fail(
            f"no checkpoint before the deadline; stage output:\n{proc.communicate()[0][-3000:]}"
        )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(latest.read_text())["step"]
    assert 0 < step < 40 and not (out / "result.json").exists()

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    checkpoint_step = step
    assert f"resuming from checkpoint at step {checkpoint_step}/40" in rerun.stdout
    result = json.loads(rerun.stdout.split("XLEARNER_RESULT ")[-1])
    assert result["resumed_from_step"] == checkpoint_step
    assert (out / "result.json").exists()


def test_expand_stage_runs_under_torchrun_with_two_processes(setup):
    """The multi-GPU path (DDP), here on CPU with gloo: both ranks train, rank 0 publishes."""
    work, config, manifest_args = setup
    out = work / "store" / "runs" / "expand-ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "stages.expand", "--config", str(config), "--task", "cls",
        *manifest_args, "--out", str(out), "--steps", "6",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert run.stdout.count("XLEARNER_RESULT ") == 1  # rank 0 reports ...
    result = json.loads((out / "result.json").read_text())  # ... rank 0 publishes
    assert result["metrics"]["shapes_cls:cls"]["top1"] >= 0
    assert (out / "backbone" / "backbone.safetensors").exists()
