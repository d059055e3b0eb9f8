"""The one training loop every stage uses.

A model trained here is any ``nn.Module`` called as ``model(images, stream, targets)``
that returns a dict of named losses; a *stream* is one (source, task) pair with its own
train and val data. Per step the engine takes a batch from every stream (``round_robin``)
or from one stream drawn by size (``proportional``), sums the weighted losses and takes
one optimiser step (after ``grad_accum_steps`` micro-batches).

Batches are a pure function of (seed, stream, step): resuming at step N needs no
sampler state beyond N, so a stage killed after a checkpoint and restarted with the same
arguments continues exactly where it was. On CUDA it uses bf16 autocast and
channels_last; under ``torchrun`` it wraps the model in DistributedDataParallel and
shards every batch across the ranks.
"""

from __future__ import annotations

import io
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from xlearner import distributed
from xlearner.config import EngineConfig, TrainConfig
from xlearner.store import ArtifactStore, join

log = logging.getLogger("xlearner.engine")

MetricsCallback = Callable[[dict[str, float], int], None]


@dataclass
class Stream:
    """One (source, task) pair: the unit of sampling and of evaluation."""

    name: str
    task: str
    train: Dataset
    val: Dataset | None
    collate: Callable
    weight: float = 1.0

    @property
    def size(self) -> int:
        return len(self.train)  # type: ignore[arg-type]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(name))) % 2**31


class StepBatchSampler(Sampler[list[int]]):
    """Index batches as a pure function of (seed, step): epoch e is permutation(seed, e).

    Yields the batches of steps ``start_step, start_step + 1, ...`` forever. Under DDP
    each rank takes its slice of every global batch.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start_step: int = 0):
        if size == 0:
            raise ValueError("cannot sample from an empty data set")
        self.size, self.batch_size, self.seed, self.start_step = size, batch_size, seed, start_step
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=gen)}
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        start = step * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, self.size)
            out.append(int(self._perm(epoch)[offset]))
        return out[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def _loader(stream: Stream, batch_size: int, seed: int, start_step: int, workers: int) -> Iterator:
    sampler = StepBatchSampler(stream.size, batch_size, stream_seed(seed, stream.name), start_step)
    return iter(
        DataLoader(
            stream.train,
            batch_sampler=sampler,
            collate_fn=stream.collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
    )


def resolve_device(engine: EngineConfig) -> torch.device:
    if distributed.is_distributed() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if engine.device == "cuda" or (engine.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "engine.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'"
            )
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class Precision:
    dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def for_device(cls, engine: EngineConfig, device: torch.device) -> Precision:
        cuda = device.type == "cuda"
        bf16 = engine.precision == "bf16" or (engine.precision == "auto" and cuda)
        channels_last = engine.channels_last == "on" or (engine.channels_last == "auto" and cuda)
        return cls(torch.bfloat16 if bf16 else None, channels_last)

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)


def move_to(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        return (
            obj.contiguous(memory_format=torch.channels_last)
            if channels_last and obj.dim() == 4
            else obj
        )
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_cosine(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Checkpointer:
    """Checkpoints in the store: weights as safetensors, optimiser state alongside.

    ``latest.json`` is published last and names the newest complete checkpoint, so a
    kill at any moment leaves either the previous or the new checkpoint usable.
    """

    def __init__(self, store: ArtifactStore, prefix: str, keep: int = 2):
        self.store, self.prefix, self.keep = store, prefix, keep

    def save(self, step: int, model: nn.Module, optimizer, scheduler, extra: dict) -> None:
        folder = join(self.prefix, f"step-{step:08d}")
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        self.store.write_bytes(join(folder, "model.safetensors"), save_safetensors(weights))
        buf = io.BytesIO()
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            buf,
        )
        self.store.write_bytes(join(folder, "trainer_state.pt"), buf.getvalue())
        self.store.write_json(
            join(self.prefix, "latest.json"), {"step": step, "folder": folder, **extra}
        )
        self._prune(step)

    def _prune(self, step: int) -> None:
        steps = sorted(
            {
                int(k.split("step-")[1].split("/")[0])
                for k in self.store.list(self.prefix)
                if "step-" in k
            }
        )
        for old in steps[: -self.keep]:
            self.store.delete_prefix(join(self.prefix, f"step-{old:08d}"))

    def latest(self) -> dict | None:
        key = join(self.prefix, "latest.json")
        return self.store.read_json(key) if self.store.exists(key) else None

    def load(self, model: nn.Module, optimizer, scheduler) -> int:
        """Restore the newest checkpoint; returns its step (0 when there is none)."""
        info = self.latest()
        if info is None:
            return 0
        folder = info["folder"]
        state = load_safetensors(self.store.read_bytes(join(folder, "model.safetensors")))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {self.store.uri(folder)} does not match the model: "
                f"missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; delete it or rerun with the config that wrote it"
            )
        trainer = torch.load(
            io.BytesIO(self.store.read_bytes(join(folder, "trainer_state.pt"))), weights_only=True
        )
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["rng"])
        return int(info["step"])


@dataclass
class Progress:
    """A log line every N steps with loss, images/s and ETA."""

    total: int
    every: int
    name: str
    start_step: int = 0
    t0: float = field(default_factory=time.perf_counter)
    images: int = 0

    def update(self, step: int, images: int, losses: dict[str, float]) -> None:
        self.images += images
        done = step - self.start_step
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        rate = self.images / max(elapsed, 1e-9)
        eta = elapsed / max(done, 1) * (self.total - step)
        loss_text = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        log.info(
            f"[{self.name}] step {step}/{self.total} {loss_text} {rate:.1f} img/s eta {eta:.0f}s"
        )


class Trainer:
    """Trains ``model`` on ``streams`` for ``train_cfg.steps`` optimiser steps."""

    def __init__(
        self,
        model: nn.Module,
        streams: list[Stream],
        train_cfg: TrainConfig,
        engine_cfg: EngineConfig,
        *,
        seed: int = 0,
        name: str = "train",
        checkpointer: Checkpointer | None = None,
        on_metrics: MetricsCallback | None = None,
        parameters: list[nn.Parameter] | None = None,
    ):
        if not streams:
            raise ValueError(f"[{name}] no data streams to train on")
        self.streams = streams
        self.cfg, self.engine, self.seed, self.name = train_cfg, engine_cfg, seed, name
        self.checkpointer, self.on_metrics = checkpointer, on_metrics
        self.device = resolve_device(engine_cfg)
        self.precision = Precision.for_device(engine_cfg, self.device)
        self.model = model.to(self.device)
        if self.precision.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(parameters or self.model.parameters(), train_cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(train_cfg))
        self.forward = self._wrap(self.model)
        self.images_seen = 0

    def _wrap(self, model: nn.Module) -> nn.Module:
        if distributed.is_distributed():
            model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        if self.engine.compile:
            model = torch.compile(model)
        return model

    def _stream_schedule(self) -> Callable[[int], list[Stream]]:
        if self.cfg.sampling == "round_robin":
            return lambda step: self.streams
        sizes = np.array([s.size for s in self.streams], dtype=np.float64)
        probs = sizes / sizes.sum()

        def pick(step: int) -> list[Stream]:
            rng = np.random.default_rng(self.seed * 7919 + step)
            return [self.streams[int(rng.choice(len(self.streams), p=probs))]]

        return pick

    def fit(self) -> int:
        """Train to ``cfg.steps``, resuming from the newest checkpoint; returns the start step."""
        seed_everything(self.seed)
        start = (
            self.checkpointer.load(self.model, self.optimizer, self.scheduler)
            if self.checkpointer
            else 0
        )
        if start:
            log.info(f"[{self.name}] resuming from checkpoint at step {start}/{self.cfg.steps}")
        if start >= self.cfg.steps:
            return start
        micro = self.cfg.grad_accum_steps
        schedule = self._stream_schedule()
        consumed = {s.name: 0 for s in self.streams}
        for micro_step in range(start * micro):  # replay the schedule: where each stream was
            for stream in schedule(micro_step):
                consumed[stream.name] += 1
        loaders = {
            s.name: _loader(
                s, self.cfg.batch_size, self.seed, consumed[s.name], self.engine.num_workers
            )
            for s in self.streams
        }
        progress = Progress(self.cfg.steps, self.engine.log_every_steps, self.name, start)
        self.model.train()
        for step in range(start + 1, self.cfg.steps + 1):
            losses, images = self._step(step, loaders, schedule, micro)
            progress.update(step, images, losses)
            if self.on_metrics and (
                step % self.engine.log_every_steps == 0 or step == self.cfg.steps
            ):
                self.on_metrics(
                    {f"train/{k}": v for k, v in losses.items()}
                    | {"lr": self.scheduler.get_last_lr()[0]},
                    step,
                )
            if (
                self.checkpointer
                and distributed.rank() == 0
                and (step % self.engine.checkpoint_every_steps == 0 or step == self.cfg.steps)
            ):
                self.checkpointer.save(
                    step, self.model, self.optimizer, self.scheduler, {"name": self.name}
                )
        return start

    def _step(self, step: int, loaders: dict, schedule, micro: int) -> tuple[dict[str, float], int]:
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        images_in_step = 0
        for m in range(micro):
            streams = schedule((step - 1) * micro + m)
            loss = torch.zeros((), device=self.device)
            for stream in streams:
                images, targets = next(loaders[stream.name])
                images = move_to(images, self.device, self.precision.channels_last)
                targets = move_to(targets, self.device)
                with self.precision.autocast(self.device):
                    parts = self.forward(images, stream.name, targets)
                stream_loss = sum(parts.values())
                loss = loss + stream.weight * stream_loss.float()
                totals[f"{stream.name}/loss"] = (
                    totals.get(f"{stream.name}/loss", 0.0) + float(stream_loss.detach()) / micro
                )
                images_in_step += images.shape[0]
            (loss / micro).backward()
            totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / micro
        if not math.isfinite(totals["loss"]):
            raise FloatingPointError(
                f"[{self.name}] loss is {totals['loss']} at step {step}; lower the learning rate"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.images_seen += images_in_step * distributed.world_size()
        return totals, images_in_step * distributed.world_size()


@torch.no_grad()
def evaluate(
    model: nn.Module, streams: list[Stream], engine_cfg: EngineConfig, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """Validation metrics per stream (``model.metric(stream)`` and ``model.predict``).

    Self-supervised streams have no predictions to score: their metric is the mean loss.
    At most ``engine_cfg.eval_max_images`` images per stream.
    """
    device = next(model.parameters()).device
    precision = Precision.for_device(engine_cfg, device)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for stream in streams:
        if stream.val is None or len(stream.val) == 0:  # type: ignore[arg-type]
            continue
        n = min(len(stream.val), engine_cfg.eval_max_images)  # type: ignore[arg-type]
        loader = DataLoader(
            torch.utils.data.Subset(stream.val, range(n)),
            batch_size=batch_size,
            collate_fn=stream.collate,
        )
        metric = model.metric(stream.name)
        for images, targets in loader:
            images = move_to(images, device, precision.channels_last)
            targets = move_to(targets, device)
            with precision.autocast(device):
                if model.is_self_supervised(stream.name):
                    seen = sum(model(images, stream.name, targets).values())
                else:
                    seen = model.predict(images, stream.name)
            metric.update(move_to(seen, torch.device("cpu")), move_to(targets, torch.device("cpu")))
        results[stream.name] = {k: float(v) for k, v in metric.compute().items()}
    model.train(was_training)
    return results
