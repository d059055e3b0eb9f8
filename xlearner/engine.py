"""The one training loop every stage uses.

A model trained here is any ``nn.Module`` called as ``model(images, stream, targets)``
that returns a dict of named losses; a *stream* is one (source, task) pair with its own
train and val data. Per step the engine takes a batch from every stream (``round_robin``)
or from one stream drawn by size (``proportional``), sums the weighted losses and takes
one optimiser step (after ``grad_accum_steps`` micro-batches).

Batches are a pure function of (seed, stream, step): resuming at step N needs no
sampler state beyond N, so a stage killed after a checkpoint and restarted with the same
arguments continues exactly where it was; a stop signal (:mod:`xlearner.stop`) ends the
loop after the current step, with a checkpoint. Augmentation follows the epoch: every sample is
loaded as ``(epoch, index)``, and a dataset with ``set_epoch(epoch, seed=...)`` gets it
before the sample is read, in whichever worker reads it. On CUDA it uses bf16 autocast
and channels_last, worker processes with pinned memory and, with ``engine.decode: gpu``,
decodes the JPEGs of each batch on the GPU; under ``torchrun`` it wraps the model in
DistributedDataParallel and shards every batch across the ranks; the ranks agree on
every decision (stop, log, checkpoint), logged losses are their mean, rank 0 checkpoints
and evaluates, and all of them end with rank 0's weights. Streams and their
batches are :mod:`xlearner.loaders`', checkpoints :mod:`xlearner.checkpoint`'.

The loop does not wait for the GPU: losses are summed on the device and read at log
steps, and the non-finite check is a device-side flag read then (and before every
checkpoint and at the end). ``XLEARNER_FAIL_FAST=1`` (or ``Trainer(fail_fast=True)``)
reads it after every step instead.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from xlearner import distributed, stop
from xlearner.checkpoint import Checkpointer
from xlearner.config import EngineConfig, TrainConfig
from xlearner.data.decode import EncodedBatch, decode_batch
from xlearner.loaders import (
    EpochFeed,
    Stream,
    make_loader,
    resolve_decode,
    resolve_num_workers,
)
from xlearner.progress import Progress

log = logging.getLogger("xlearner.engine")

MetricsCallback = Callable[[dict[str, float], int], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


class LossWindow:
    """Losses summed on the device between log steps, read with one host sync.

    Also the non-finite flag: the first step whose total loss is not finite (and that
    loss), kept on the device; :meth:`check` reads it and raises.
    """

    def __init__(self, device: torch.device):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def add(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1
        first = (self.bad_step == 0) & ~torch.isfinite(losses["loss"])
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, losses["loss"], self.bad_loss)

    def check(self, name: str) -> None:
        """Raise if a step's loss was not finite (reads the flag: waits for the device).

        Under DDP the flag is reduced over the ranks (every rank calls this at the same
        steps), so all of them stop together instead of the others hanging.
        """
        flag = self.bad_step
        if distributed.is_distributed():
            never = torch.iinfo(torch.int64).max
            flag = torch.where(flag == 0, never, flag)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            flag = torch.where(flag == never, 0, flag)
        step = int(flag)
        if step:
            here = int(self.bad_step) == step
            value = float(self.bad_loss) if here else "not finite (on another rank)"
            raise FloatingPointError(
                f"[{name}] loss is {value} at step {step}; lower the learning rate"
            )

    def read(self) -> dict[str, float]:
        """Mean of each loss over the steps since the last read (one host sync); resets.

        Under DDP also the mean over the ranks (an all-reduce: every rank calls this at
        the same steps, and every rank has the same keys: the streams of a step are a
        function of the step), so the logged loss is the whole batch's, not rank 0's.
        """
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        values = distributed.mean_over_ranks(means).tolist()
        self.sums, self.counts = {}, {}
        return dict(zip(keys, values, strict=True))


class StepForward(nn.Module):
    """The model on every stream of a micro-step in one call: under DDP one forward per
    backward (DDP refuses a parameter made ready twice, as two forwards before one
    backward would do when the trunk sees two streams)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batches: list[tuple[Tensor, str, Any]]) -> list[dict[str, Tensor]]:
        return [self.model(images, stream, targets) for images, stream, targets in batches]


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
        fail_fast: bool | None = None,
    ):
        if not streams:
            raise ValueError(f"[{name}] no data streams to train on")
        self.streams = streams
        self.cfg, self.engine, self.seed, self.name = train_cfg, engine_cfg, seed, name
        self.checkpointer, self.on_metrics = checkpointer, on_metrics
        if fail_fast is None:
            fail_fast = os.environ.get("XLEARNER_FAIL_FAST", "").lower() in ("1", "true", "yes")
        self.fail_fast = fail_fast  # check the loss after every step (a host sync each)
        self.device = resolve_device(engine_cfg)
        self.precision = Precision.for_device(engine_cfg, self.device)
        self.decode_on_device = resolve_decode(engine_cfg, self.device)
        self.num_workers = resolve_num_workers(engine_cfg, self.device, len(streams))
        self.model = model.to(self.device)
        if self.precision.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(parameters or self.model.parameters(), train_cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(train_cfg))
        self.forward = self._wrap(StepForward(self.model))

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
            s.name: make_loader(
                s,
                self.cfg.batch_size,
                self.seed,
                consumed[s.name],
                workers=self.num_workers,
                device=self.device,
                encoded=self.decode_on_device,
                prefetch_factor=self.engine.prefetch_factor,
            )
            for s in self.streams
        }
        log.info(
            f"[{self.name}] {len(self.streams)} streams on {self.device}, "
            f"{self.num_workers} loader workers each, "
            f"decode on {'the GPU' if self.decode_on_device else 'the CPU'}"
        )
        progress = Progress(self.cfg.steps, start)
        window = LossWindow(self.device)
        every = self.engine.log_every_steps
        self.model.train()
        with stop.safe_points():  # a stop signal ends the loop after a step, checkpointed
            for step in range(start + 1, self.cfg.steps + 1):
                losses, images = self._step(step, loaders, schedule, micro)
                window.add(step, losses)
                progress.update(step, images)
                last = step == self.cfg.steps
                # every rank decides alike (a signal reaches the ranks at different steps)
                stopping = distributed.any_rank(stop.requested())
                checkpoint = self.checkpointer is not None and (
                    step % self.engine.checkpoint_every_steps == 0 or last or stopping
                )
                logged = step % every == 0 or last
                if self.fail_fast or logged or checkpoint:  # the same steps on every rank
                    window.check(self.name)  # never log or checkpoint a diverged model
                if logged:
                    self._log(step, window.read(), progress)
                if checkpoint and distributed.is_main_process():
                    self.checkpointer.save(
                        step, self.model, self.optimizer, self.scheduler, {"name": self.name}
                    )
                if stopping:
                    log.warning(f"[{self.name}] stop requested: checkpointed step {step}")
                    stop.check()
        distributed.sync_buffers(self.model)  # every rank ends with the weights rank 0 has
        return start

    def _log(self, step: int, losses: dict[str, float], progress: Progress) -> None:
        loss_text = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        log.info(f"[{self.name}] step {step}/{self.cfg.steps} {loss_text} {progress.line()}")
        if self.on_metrics:
            self.on_metrics(
                {f"train/{k}": v for k, v in losses.items()}
                | {"lr": self.scheduler.get_last_lr()[0]},
                step,
            )

    def _images(self, images: torch.Tensor | EncodedBatch) -> torch.Tensor:
        if isinstance(images, EncodedBatch):
            images = decode_batch(images, self.device)
        return move_to(images, self.device, self.precision.channels_last)

    def _step(
        self, step: int, loaders: dict, schedule, micro: int
    ) -> tuple[dict[str, torch.Tensor], int]:
        """One optimiser step; the losses come back as detached device tensors (no sync)."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        images_in_step = 0
        for m in range(micro):
            streams = schedule((step - 1) * micro + m)
            batches = []
            for stream in streams:
                images, targets = next(loaders[stream.name])
                images = self._images(images)
                batches.append((images, stream.name, move_to(targets, self.device)))
                images_in_step += images.shape[0]
            with self.precision.autocast(self.device):
                outputs = self.forward(batches)
            loss = torch.zeros((), device=self.device)
            for stream, parts in zip(streams, outputs, strict=True):
                stream_loss = sum(parts.values()).float()
                loss = loss + stream.weight * stream_loss
                key = f"{stream.name}/loss"
                share = stream_loss.detach() / micro
                totals[key] = totals[key] + share if key in totals else share
            (loss / micro).backward()
            share = loss.detach() / micro
            totals["loss"] = totals["loss"] + share if "loss" in totals else share
        self.optimizer.step()
        self.scheduler.step()
        return totals, images_in_step * distributed.world_size()


def evaluate(
    model: nn.Module, streams: list[Stream], engine_cfg: EngineConfig, batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """Validation metrics per stream (``model.metric(stream)`` and ``model.predict``).

    Self-supervised streams have no predictions to score: their metric is the mean loss.
    At most ``engine_cfg.eval_max_images`` images per stream. Under DDP rank 0 scores the
    whole set alone and every rank gets its metrics: the metrics (COCO mAP, mIoU) need
    every prediction in one place, and the val set is capped, so sharding the forward
    passes would save little and cost a gather of every prediction.
    """
    metrics = None
    if distributed.is_main_process():
        with distributed.local_only():  # e.g. the contrastive loss gathers no other rank
            metrics = _evaluate(model, streams, engine_cfg, batch_size)
    return distributed.broadcast_object(metrics)


@torch.no_grad()
def _evaluate(
    model: nn.Module, streams: list[Stream], engine_cfg: EngineConfig, batch_size: int
) -> dict[str, dict[str, float]]:
    device = next(model.parameters()).device
    precision = Precision.for_device(engine_cfg, device)
    encoded = device.type == "cuda" and resolve_decode(engine_cfg, device)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, float]] = {}
    for stream in streams:
        if stream.val is None or len(stream.val) == 0:  # type: ignore[arg-type]
            continue
        n = min(len(stream.val), engine_cfg.eval_max_images)  # type: ignore[arg-type]
        loader = DataLoader(
            torch.utils.data.Subset(EpochFeed(stream.val, encoded=encoded), range(n)),
            batch_size=batch_size,
            collate_fn=stream.collate,
            pin_memory=device.type == "cuda",
        )
        metric = model.metric(stream.name)
        for images, targets in loader:
            if isinstance(images, EncodedBatch):
                images = decode_batch(images, device)
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
