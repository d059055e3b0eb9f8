"""Scaling of the reconcile stage: 1 process against N under torchrun (DDP), side by side.

The same reconcile stage (synthetic cls + seg sources, ingested and expanded once in this
run) runs as ``python -m stages.reconcile`` (one process, no DDP) and under ``torchrun
--standalone --nproc-per-node N`` (DDP: gloo on CPU, NCCL on GPUs) with the same global
batch (each rank takes 1/N of it) and the same steps. images/s is the global batch times
the steps between the first and the last logged step over the wall time between those
two log lines (start-up, evaluation and publishing left out); scaling efficiency is
``images/s(N) / (N x images/s(1))``. Rounds alternate the variants so that machine noise
hits them alike; the median of each is reported.

On CPU a third row runs one process on one thread: torchrun gives each rank one thread
(``OMP_NUM_THREADS=1``), so the scaling efficiency there is against N x that row (what
DDP itself costs), while ``N procs / 1 proc`` is what the machine gives (one process
with its default threads already uses every core).

    python bench/scaling.py                       # CPU: 1 vs 2 processes (gloo)
    python bench/scaling.py --procs 8 --device cuda --batch 256 --image-size 224 \\
        --arch resnet50                           # a GPU host: 1 vs 8 GPUs (NCCL)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

from stages import expand
from xlearner.config import validate_config
from xlearner.contract import ExpandCall, ReconcileCall
from xlearner.data.ingest import ingest_source
from xlearner.data.synth import synth_source_configs, synthesize
from xlearner.store import LocalStore
from xlearner.store_keys import manifest_key

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("shapes_cls", "shapes_seg")
STEP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*\[reconcile\] step (\d+)/")


def config_dict(root: Path, store: Path, args: argparse.Namespace) -> dict:
    sources, _ = synth_source_configs(root)
    train = {"steps": args.steps, "batch_size": args.batch, "warmup_steps": 1}
    return {
        "name": "scaling",
        "sources": [s for s in sources if s["name"] in SOURCES],
        "downstream": [],
        "model": {"backbone": args.arch, "image_size": args.image_size},
        "tasks": {"cls": {**train, "steps": 2}, "seg": {**train, "steps": 2}},
        "reconcile": {"train": train},
        "engine": {
            "device": args.device,
            "log_every_steps": args.log_every,
            "checkpoint_every_steps": 10 * args.steps,
            "eval_max_images": 8,
        },
        "store": {"uri": str(store)},
    }


def prepare(work: Path, args: argparse.Namespace) -> ReconcileCall:
    """Ingest the sources and expand one sub-model per task; the reconcile stage's args."""
    synthesize(work / "data", seed=0, images_per_source=args.images, log=lambda _: None)
    data = config_dict(work / "data", work / "store", args)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = validate_config(data)
    store = LocalStore(work / "store")
    manifests = {}
    for source in cfg.sources:
        manifest = ingest_source(source, store, image_size=cfg.model.image_size)
        manifests[source.name] = store.uri(manifest_key(source.name, manifest["version"]))
    subs = {}
    for task in ("cls", "seg"):
        out = work / "store" / "runs" / f"expand-{task}"
        call = ExpandCall(config=str(config), out=str(out), task=task, manifests=manifests)
        if expand.main(call.to_argv()) != 0:
            sys.exit(f"the expand stage for {task} failed")
        subs[task] = str(out / "model")
    return ReconcileCall(config=str(config), out="", sub_models=subs, manifests=manifests)


def images_per_s(log: str, batch: int) -> float:
    """Global images/s between the first and the last logged step (max over the ranks)."""
    times: dict[int, datetime] = {}
    for line in log.splitlines():
        if match := STEP_LINE.match(line):
            when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
            step = int(match[2])
            times[step] = max(times.get(step, when), when)
    first, last = min(times), max(times)
    return (last - first) * batch / (times[last] - times[first]).total_seconds()


def run_variant(call: ReconcileCall, out: Path, procs: int, threads: int | None, batch: int):
    argv = call.model_copy(update={"out": str(out)}).to_argv()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if procs == 1:
        command = [sys.executable, "-m", "stages.reconcile", *argv]
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*torchrun, "--nproc-per-node", str(procs), "-m", "stages.reconcile", *argv]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{(run.stdout + run.stderr)[-3000:]}")
    return images_per_s(run.stdout + run.stderr, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2, help="processes of the DDP variant")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--arch", default="tiny_resnet")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--images", type=int, default=120, help="per synthetic source")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    variants = {"1 proc": (1, None), f"{args.procs} procs (DDP)": (args.procs, None)}
    if args.device == "cpu":
        variants["1 proc, 1 thread"] = (1, 1)
    with tempfile.TemporaryDirectory(prefix="xlearner-scaling-") as tmp:
        work = Path(tmp)
        call = prepare(work, args)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for i, (name, (procs, threads)) in enumerate(variants.items()):
                out = work / "store" / "runs" / f"reconcile-{r}-{i}"
                rates[name].append(run_variant(call, out, procs, threads, args.batch))
                print(f"round {r + 1}: {name}: {rates[name][-1]:.1f} images/s", flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    ddp = median[f"{args.procs} procs (DDP)"]
    # On CPU each rank runs one thread: the fair baseline is one process on one thread.
    base_name = "1 proc, 1 thread" if "1 proc, 1 thread" in median else "1 proc"
    print(
        f"reconcile stage, {args.arch} {args.image_size}px, global batch {args.batch}, "
        f"{args.steps} steps, {args.device}, {os.cpu_count()} CPUs, median of {args.rounds}"
    )
    print(f"{'variant':<22} {'images/s':>10}  rounds")
    for name, value in median.items():
        print(f"{name:<22} {value:>10.1f}  " + " ".join(f"{v:.1f}" for v in rates[name]))
    print(f"speed-up {args.procs} procs / 1 proc: {ddp / median['1 proc']:.2f}x")
    efficiency = 100 * ddp / (args.procs * median[base_name])
    print(f"scaling efficiency against {args.procs} x {base_name}: {efficiency:.0f}%")


if __name__ == "__main__":
    main()
