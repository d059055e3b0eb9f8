"""Training throughput of the engine against plain reference loops, side by side.

Same model (a backbone + classification head), same batch, same data in memory. The
references are the torchvision-references style loop (forward, loss, backward, step)
on one batch kept on the device:

- ``fp32``: plain fp32, contiguous;
- ``same``: at the engine's precision and memory layout (bf16 autocast + channels_last
  on CUDA by default), so ``engine / same`` is the engine's own cost (sampling, loading
  and collating every batch, the copy to the device, loss bookkeeping, progress), apart
  from what bf16/channels_last buy (``same / fp32``). On CPU both references are one.

The engine loads every batch from the in-memory data set through its DataLoader
(``--workers``, default 0). Rounds alternate the variants so that machine noise hits
them alike; the median images/s of each is reported with the ratios.

    python bench/train_step.py                                     # CPU, tiny_resnet
    python bench/train_step.py --arch resnet50 --batch 256 --image-size 224 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import Dataset

from xlearner.config import EngineConfig, TrainConfig
from xlearner.engine import Precision, Trainer
from xlearner.loaders import Stream
from xlearner.models.multitask import backbone_trunk_spec, build_model


class InMemory(Dataset):
    def __init__(self, n: int, image_size: int, classes: int):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, image_size, image_size, generator=gen)
        self.y = torch.randint(0, classes, (n,), generator=gen)
        self.num_classes = classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], {"label": self.y[i]}


def collate(items):
    return torch.stack([x for x, _ in items]), {
        "label": torch.stack([t["label"] for _, t in items])
    }


def make_model(arch: str, image_size: int, classes: int):
    torch.manual_seed(0)
    spec = {
        "trunk": backbone_trunk_spec(arch),
        "streams": {"bench:cls": {"task": "cls", "num_classes": classes}},
        "image_size": image_size,
    }
    return build_model(spec)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_round(
    model, data: InMemory, batch: int, steps: int, device: torch.device, precision: Precision
) -> float:
    """The plain loop at ``precision`` (dtype, layout): a fixed batch already on the device."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = collate([data[i] for i in range(batch)])
    images, targets = images.to(device), {"label": targets["label"].to(device)}
    if precision.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    model.train()
    for step in range(steps + 2):
        if step == 2:  # warm-up done
            sync(device)
            t0 = time.perf_counter()
        with precision.autocast(device):
            loss = sum(model(images, "bench:cls", targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def engine_round(model, data: InMemory, batch: int, steps: int, engine: EngineConfig) -> float:
    stream = Stream("bench:cls", "cls", data, None, collate)
    warm = Trainer(model, [stream], TrainConfig(steps=2, batch_size=batch, warmup_steps=0), engine)
    warm.fit()
    trainer = Trainer(
        warm.model, [stream], TrainConfig(steps=steps, batch_size=batch, warmup_steps=0), engine
    )
    sync(trainer.device)
    t0 = time.perf_counter()
    trainer.fit()
    sync(trainer.device)
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="tiny_resnet")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--workers", default="0", help="engine.num_workers (an int or auto)")
    parser.add_argument("--compile", action="store_true", help="engine.compile (torch.compile)")
    args = parser.parse_args()
    device = torch.device(args.device)
    engine = EngineConfig(
        device=args.device,
        precision=args.precision,
        channels_last=args.channels_last,
        num_workers=args.workers if args.workers == "auto" else int(args.workers),
        compile=args.compile,
        log_every_steps=10**6,
        checkpoint_every_steps=10**6,
    )
    fp32 = Precision(None, False)
    same = Precision.for_device(engine, device)
    data = InMemory(max(args.batch * 4, 64), args.image_size, 10)
    models = {"fp32": make_model(args.arch, args.image_size, 10).to(device)}
    if same != fp32:  # else the fp32 reference is the same-precision one
        models["same"] = make_model(args.arch, args.image_size, 10).to(device)
        if same.channels_last:
            models["same"] = models["same"].to(memory_format=torch.channels_last)
    eng_model = make_model(args.arch, args.image_size, 10)
    rates: dict[str, list[float]] = {"fp32": [], "same": [], "engine": []}
    for r in range(args.rounds):
        rates["fp32"].append(
            reference_round(models["fp32"], data, args.batch, args.steps, device, fp32)
        )
        if "same" in models:
            rates["same"].append(
                reference_round(models["same"], data, args.batch, args.steps, device, same)
            )
        else:
            rates["same"].append(rates["fp32"][-1])
        rates["engine"].append(engine_round(eng_model, data, args.batch, args.steps, engine))
        print(
            f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()),
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in rates.items()}
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU x{torch.get_num_threads()} threads"
    )
    layout = f"{same.dtype or 'fp32'}, channels_last {'on' if same.channels_last else 'off'}"
    print(f"\n{args.arch} batch {args.batch} at {args.image_size}px on {name}")
    print(f"medians of {args.rounds} rounds, img/s:")
    same_note = "" if "same" in models else "  (= the fp32 reference)"
    rows = {
        "reference, fp32 contiguous": f"{med['fp32']:9.1f}",
        f"reference, the engine's {layout}": f"{med['same']:9.1f}{same_note}",
        f"engine, {layout}, workers {args.workers}": f"{med['engine']:9.1f}",
    }
    width = max(len(k) for k in rows)
    for label, value in rows.items():
        print(f"  {label:<{width}} {value}")
    print(
        f"ratios: engine / same-precision reference {med['engine'] / med['same']:.3f}"
        f" (goal >= 0.97) | engine / fp32 reference {med['engine'] / med['fp32']:.3f}"
        f" | same-precision / fp32 reference {med['same'] / med['fp32']:.3f}"
    )


if __name__ == "__main__":
    main()
