"""Data loading throughput: the shard loader per CPU core, PIL against torchvision's decoder,
full-size against pre-resized shards, side by side in one run; on a GPU also the loader
against the model and the GPU decode.

Generates its own data: ``--images`` JPEGs of ``--width`` x ``--height`` (smooth
gradients, shapes and grain, quality 90: about the entropy of a photo), ingested twice,
as they are and with ``ingest.max_side`` (default 320, for 224 px training). Then:

1. per core (one process, one thread, no workers), with the training augmentation:
   ``ShardDataset[i]`` (PIL: decode + crop/resize), PIL decode alone, and the encoded
   path (``encoded_item`` + ``decode_batch`` on the CPU: torchvision's ``decode_jpeg``
   + the same resampling as matrix products), ``decode_jpeg`` alone, and the encoded
   batches alone (what a loader worker does when the GPU decodes);
2. the engine on the CPU (``--train-arch`` at ``--train-size`` px on the pre-resized
   shards) with ``--workers-list`` loader workers: does a worker process pay off when
   it competes with the training threads for the cores (what ``num_workers: auto``
   chooses on CPU);
3. with CUDA: the engine's loader with ``auto`` workers (CPU decode into pinned
   batches) and GPU decode (``decode_batch`` on the GPU, nvjpeg), against a ResNet-50
   bf16 channels_last training step on synthetic tensors (``--model-batch``).

    python bench/data_loading.py                       # CPU: sections 1 and 2
    python bench/data_loading.py --images 512 --cuda   # + section 3
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from xlearner.config import EngineConfig, IngestConfig, SourceConfig, TrainConfig
from xlearner.data.decode import decode_batch, decode_jpegs
from xlearner.data.ingest import ingest_source
from xlearner.data.shards import ShardDataset, collate_fn
from xlearner.engine import Trainer
from xlearner.loaders import Stream, make_loader, resolve_num_workers, stage_cores
from xlearner.store import open_store
from xlearner.store_keys import manifest_key


def write_images(root: Path, count: int, width: int, height: int) -> None:
    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[0:height, 0:width]
    for k in range(count):
        base = rng.uniform(40, 200, 3)
        slope = rng.uniform(-0.3, 0.3, (2, 3))
        pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
        pixels += rng.normal(0, 12, (height, width, 3))  # grain
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(10, min(width, height) / 3)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=colour)
        image.save(folder / f"{k:05d}.jpg", quality=90)


def ingest(root: Path, store_dir: Path, max_side: int | None) -> str:
    store = open_store(str(store_dir))
    source = SourceConfig(name="bench", format="unlabeled", uri=str(root), val_fraction=0.0)
    manifest = ingest_source(
        source, store, options=IngestConfig(max_side=max_side), log=lambda _: None
    )
    return store.uri(manifest_key("bench", manifest["version"]))


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def per_core(ds: ShardDataset, batch: int) -> dict[str, float]:
    """images/s of each way to load ``ds`` in this one thread."""
    n = len(ds)
    blobs = [ds.raw(i)[0] for i in range(n)]
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    collate = collate_fn(ds.format)

    def pil_loader():
        for i in range(n):
            ds[i]

    def pil_decode():
        for b in blobs:
            with Image.open(io.BytesIO(b)) as image:
                image.convert("RGB")

    def tv_loader():
        for s in range(0, n, batch):
            items = [ds.encoded_item(i) for i in range(s, min(s + batch, n))]
            decode_batch(collate(items)[0], "cpu")

    def tv_decode():
        for s in range(0, n, batch):
            decode_jpegs(tensors[s : s + batch], "cpu")

    def encoded_only():
        for s in range(0, n, batch):
            collate([ds.encoded_item(i) for i in range(s, min(s + batch, n))])

    return {
        "PIL loader": rate(pil_loader, n),
        "PIL decode": rate(pil_decode, n),
        "torchvision loader": rate(tv_loader, n),
        "torchvision decode": rate(tv_decode, n),
        "encoded batches (CPU side of GPU decode)": rate(encoded_only, n),
    }


class Unlabeled(torch.nn.Module):
    """A backbone + a classification head on a constant label: a training step's cost."""

    def __init__(self, arch: str, image_size: int):
        super().__init__()
        from xlearner.models.multitask import backbone_trunk_spec, build_model

        torch.manual_seed(0)
        spec = {
            "trunk": backbone_trunk_spec(arch),
            "streams": {"bench:cls": {"task": "cls", "num_classes": 10}},
            "image_size": image_size,
        }
        self.model = build_model(spec)

    def forward(self, images, stream, targets):
        labels = torch.zeros(images.shape[0], dtype=torch.int64, device=images.device)
        return self.model(images, "bench:cls", {"label": labels})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


WARMUP_STEPS = 3  # not timed: worker start-up, first allocations


def engine_cpu(uri: str, args, workers: int) -> float:
    """Training images/s of the engine on the shards, steps after the warm-up."""
    ds = ShardDataset(uri, "train", args.train_size, train=True)
    stream = Stream("bench:unl", "unlabeled", ds, None, collate_fn("unlabeled"))
    engine = EngineConfig(device="cpu", num_workers=workers, log_every_steps=1)
    model = Unlabeled(args.train_arch, args.train_size)
    times: dict[int, float] = {}
    trainer = Trainer(
        model,
        [stream],
        TrainConfig(steps=WARMUP_STEPS + args.train_steps, batch_size=args.train_batch),
        engine,
        on_metrics=lambda _, step: times.__setitem__(step, time.perf_counter()),
    )
    trainer.fit()
    last = WARMUP_STEPS + args.train_steps
    return args.train_steps * args.train_batch / (times[last] - times[WARMUP_STEPS])


def cuda_section(uris: dict[str, str], args, device: torch.device) -> None:
    engine = EngineConfig(device=device.type)
    workers = resolve_num_workers(engine, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
    print(f"\n## {name}: {workers} loader workers (auto), batch {args.batch}")
    print("| shards | loader, CPU decode (img/s) | loader + GPU decode (img/s) |")
    print("|---|---:|---:|")
    for label, uri in uris.items():
        ds = ShardDataset(uri, "train", args.size, train=True)
        stream = Stream("bench:unl", "unlabeled", ds, None, collate_fn("unlabeled"))
        out = []
        for encoded in (False, True):
            loader = make_loader(
                stream, args.batch, 0, workers=workers, device=device, encoded=encoded
            )
            next(loader)  # workers started
            steps = max(2, 4 * len(ds) // args.batch)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                images, _ = next(loader)
                if encoded:
                    images = decode_batch(images, device)
                else:
                    images = images.to(device, non_blocking=True)
            sync(device)
            out.append(steps * args.batch / (time.perf_counter() - t0))
            del loader
        print(f"| {label} | {out[0]:.0f} | {out[1]:.0f} |")
    model = Unlabeled("resnet50", args.size).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(args.model_batch, 3, args.size, args.size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    for step in range(3 + args.model_steps):
        if step == 3:
            sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = sum(model(x, "bench:cls", {}).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    model_rate = args.model_steps * args.model_batch / (time.perf_counter() - t0)
    print(
        f"\nResNet-50 train step (bf16, channels_last, batch {args.model_batch}, "
        f"{args.size} px, synthetic tensors): {model_rate:.0f} img/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--size", type=int, default=224, help="training image size")
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-arch", default="tiny_resnet")
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--workers-list", default="0,1,2")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--cuda", action="store_true", help="also section 3 (needs CUDA)")
    parser.add_argument("--model-batch", type=int, default=256)
    parser.add_argument("--model-steps", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="xlearner-bench-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("XLEARNER_CACHE", str(root / "cache"))
        write_images(root / "src", args.images, args.width, args.height)
        uris = {
            f"full size {args.width}x{args.height}": ingest(root / "src", root / "s1", None),
            f"max_side {args.max_side}": ingest(root / "src", root / "s2", args.max_side),
        }
        sizes = {}
        for label, uri in uris.items():
            ds = ShardDataset(uri, "train", args.size)
            sizes[label] = sum(len(ds.raw(i)[0]) for i in range(len(ds))) / len(ds) / 1024

        torch.set_num_threads(1)
        results: dict[str, list[dict[str, float]]] = {k: [] for k in uris}
        for _ in range(args.rounds):  # alternate the shard sets round by round
            for label, uri in uris.items():
                results[label].append(
                    per_core(ShardDataset(uri, "train", args.size, train=True), args.batch)
                )
        torch.set_num_threads(threads)
        print(
            f"## Per core: {args.images} JPEGs to {args.size} px with the training "
            f"augmentation, 1 thread, median of {args.rounds} rounds (img/s)"
        )
        columns = list(results[next(iter(uris))][0])
        print("| shards | KiB/image | " + " | ".join(columns) + " |")
        print("|---|---:|" + "---:|" * len(columns))
        for label, rounds in results.items():
            cells = [statistics.median(r[c] for r in rounds) for c in columns]
            text = " | ".join(f"{c:.0f}" for c in cells)
            print(f"| {label} | {sizes[label]:.0f} | {text} |")

        if not args.skip_train:
            workers = [int(w) for w in args.workers_list.split(",")]
            train_uri = uris[f"max_side {args.max_side}"]
            rates: dict[int, list[float]] = {w: [] for w in workers}
            for _ in range(args.rounds):
                for w in workers:
                    rates[w].append(engine_cpu(train_uri, args, w))
            print(
                f"\n## Engine on CPU ({stage_cores()} cores, {threads} threads): "
                f"{args.train_arch}, batch {args.train_batch}, {args.train_size} px, "
                f"{args.train_steps} steps on the max_side shards, median of {args.rounds}"
            )
            print("| loader workers | img/s | rounds |")
            print("|---:|---:|---|")
            for w, r in rates.items():
                rounds = " / ".join(f"{x:.0f}" for x in r)
                print(f"| {w} | {statistics.median(r):.0f} | {rounds} |")

        if args.cuda:
            if not torch.cuda.is_available():
                raise SystemExit("--cuda: no CUDA device here")
            cuda_section(uris, args, torch.device("cuda"))


if __name__ == "__main__":
    main()
