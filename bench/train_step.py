"""Training throughput of the engine against a plain reference loop, side by side.

Same model (a backbone + classification head), same batch, same data in memory. The
reference is the torchvision-references style loop (forward, loss, backward, step) in
fp32; the engine runs with its own settings (bf16 + channels_last on CUDA by default).
Rounds alternate reference/engine so that machine noise hits both alike; the median
images/s of each is reported with the ratio.

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
from xlearner.engine import Stream, Trainer
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


def reference_round(model, data: InMemory, batch: int, steps: int, device: torch.device) -> float:
    """The plain loop: fp32, a fixed batch already on the device."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = collate([data[i] for i in range(batch)])
    images, targets = images.to(device), {"label": targets["label"].to(device)}
    model.train()
    for step in range(steps + 2):
        if step == 2:  # warm-up done
            sync(device)
            t0 = time.perf_counter()
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
    args = parser.parse_args()
    device = torch.device(args.device)
    engine = EngineConfig(
        device=args.device,
        precision=args.precision,
        channels_last=args.channels_last,
        log_every_steps=10**6,
        checkpoint_every_steps=10**6,
    )
    data = InMemory(max(args.batch * 4, 64), args.image_size, 10)
    ref_model = make_model(args.arch, args.image_size, 10).to(device)
    eng_model = make_model(args.arch, args.image_size, 10)
    ref, eng = [], []
    for r in range(args.rounds):
        ref.append(reference_round(ref_model, data, args.batch, args.steps, device))
        eng.append(engine_round(eng_model, data, args.batch, args.steps, engine))
        print(
            f"round {r + 1}: reference {ref[-1]:.1f} img/s, engine {eng[-1]:.1f} img/s", flush=True
        )
    ref_m, eng_m = statistics.median(ref), statistics.median(eng)
    name = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU x{torch.get_num_threads()} threads"
    )
    print(f"\n{args.arch} batch {args.batch} at {args.image_size}px on {name}")
    print(f"reference (fp32 plain loop): {ref_m:9.1f} img/s (median of {args.rounds})")
    print(f"engine ({args.precision}, channels_last {args.channels_last}): {eng_m:9.1f} img/s")
    print(f"ratio engine / reference: {eng_m / ref_m:.3f}")


if __name__ == "__main__":
    main()
