"""Streams and the batches they feed: what the engine reads, step by step.

A :class:`Stream` is one (source, task) pair with its own train and val data. Its batches
come from :func:`make_loader`: a :class:`StepBatchSampler` picks the indices of each step
as a pure function of (seed, step), so resuming at step N needs no sampler state beyond
N, and an :class:`EpochFeed` reads every sample as ``(epoch, index)``, telling the dataset
its epoch first so augmentation follows it in whichever worker reads the sample. How
many loader workers a stream gets (``engine.num_workers: auto``, from the cores this stage
may use) and whether JPEGs are left encoded for the GPU to decode (``engine.decode``) are
resolved here too.
"""

from __future__ import annotations

import functools
import inspect
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xlearner import distributed
from xlearner.config import EngineConfig
from xlearner.contract import PARALLEL_STAGES_ENV

log = logging.getLogger("xlearner.loaders")


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


def stream_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(name))) % 2**31


class StepBatchSampler(Sampler[list[int]]):
    """Index batches as a pure function of (seed, step): epoch e is permutation(seed, e).

    Yields the batches of steps ``start_step, start_step + 1, ...`` forever. Under DDP
    each rank takes its slice of every global batch. ``with_epochs=True`` yields
    ``(epoch, index)`` pairs (what :class:`EpochFeed` reads) instead of indices.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        with_epochs: bool = False,
    ):
        if size == 0:
            raise ValueError("cannot sample from an empty data set")
        self.size, self.batch_size, self.seed, self.start_step = size, batch_size, seed, start_step
        self.with_epochs = with_epochs
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:  # a list: indexing it per sample costs nanoseconds
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=gen).tolist()}
        return self._perms[epoch]

    def keyed_batch(self, step: int) -> list[tuple[int, int]]:
        """``(epoch, index)`` of every sample of ``step``'s batch (this rank's slice)."""
        start = step * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            epoch, offset = divmod(pos, self.size)
            out.append((epoch, self._perm(epoch)[offset]))
        return out[self.rank :: self.world]

    def batch(self, step: int) -> list[int]:
        return [index for _, index in self.keyed_batch(step)]

    def __iter__(self) -> Iterator[list[int]] | Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.keyed_batch(step) if self.with_epochs else self.batch(step)
            step += 1


class EpochFeed(Dataset):
    """What a stream's DataLoader reads: ``(epoch, index)`` keys (or plain indices).

    Before reading a keyed sample it calls the dataset's ``set_epoch(epoch, seed=seed)``
    (``set_epoch(epoch)`` if it takes no seed), so per-epoch augmentation works the same
    in the main process and in every worker (each holds its own copy of the dataset), and
    a batch that straddles two epochs augments each sample as its own epoch. With
    ``encoded=True`` a dataset that has ``encoded_item`` (:class:`ShardDataset`) leaves
    its JPEGs encoded for :func:`decode_batch`.
    """

    def __init__(self, dataset: Dataset, seed: int | None = None, encoded: bool = False):
        self.dataset, self.seed = dataset, seed
        self.encoded = encoded and hasattr(dataset, "encoded_item")
        set_epoch = getattr(dataset, "set_epoch", None)
        self._set_epoch = set_epoch is not None
        self._seeded = self._set_epoch and "seed" in inspect.signature(set_epoch).parameters

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            epoch, index = key
            if self._seeded:
                self.dataset.set_epoch(epoch, seed=self.seed)
            elif self._set_epoch:
                self.dataset.set_epoch(epoch)
        else:
            index = key
        return self.dataset.encoded_item(index) if self.encoded else self.dataset[index]


MAX_AUTO_WORKERS = 16


def stage_cores() -> int:
    """CPU cores this process may use for itself.

    ``os.sched_getaffinity`` (what a container or ``taskset`` allows), divided among the
    stages that run at once: ``XLEARNER_PARALLEL_STAGES`` when set (the flow sets it),
    else capped by ``OMP_NUM_THREADS`` when set outside ``torchrun`` (which sets it to 1
    for its own reasons); under ``torchrun`` also divided among the node's ranks.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    parallel = os.environ.get(PARALLEL_STAGES_ENV)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if parallel:
        cores //= max(int(parallel), 1)
    elif os.environ.get("OMP_NUM_THREADS") and "LOCAL_WORLD_SIZE" not in os.environ:
        cores = min(cores, max(int(os.environ["OMP_NUM_THREADS"]), 1))
    return max(cores // max(local_world, 1), 1)


def resolve_num_workers(engine: EngineConfig, device: torch.device, streams: int = 1) -> int:
    """DataLoader workers per stream: ``engine.num_workers``, or for ``auto``:

    0 on CPU (the workers would take cores from the training threads: measured slower,
    docs/benchmarks.md) and when this stage has fewer than 2 cores; else one core for the
    main process and the rest (at most ``MAX_AUTO_WORKERS``) split among the streams.
    """
    if engine.num_workers != "auto":
        return int(engine.num_workers)
    cores = stage_cores()
    if device.type != "cuda" or cores < 2:
        return 0
    return max(1, min(cores - 1, MAX_AUTO_WORKERS) // max(streams, 1))


@functools.cache
def gpu_jpeg_decode_available(device: str = "cuda") -> bool:
    """Whether torchvision decodes JPEGs on ``device`` (its nvjpeg build): one tiny try."""
    if not torch.cuda.is_available():
        return False
    try:
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
        return True
    except Exception as err:  # no nvjpeg in this build, a driver problem: decode on the CPU
        log.info(f"GPU JPEG decoding is not available ({err}); decoding on the CPU")
        return False


def resolve_decode(engine: EngineConfig, device: torch.device) -> bool:
    """True when batches are decoded on the GPU (``engine.decode``: gpu, or auto + nvjpeg)."""
    if engine.decode == "cpu":
        return False
    if device.type != "cuda":
        if engine.decode == "gpu":
            raise RuntimeError(
                f"engine.decode is 'gpu' but training runs on {device}; use 'auto' or 'cpu'"
            )
        return False
    available = gpu_jpeg_decode_available(str(device))
    if engine.decode == "gpu" and not available:
        raise RuntimeError(
            "engine.decode is 'gpu' but torchvision cannot decode JPEGs on the GPU here "
            "(no nvjpeg); use 'auto' or 'cpu'"
        )
    return available


def make_loader(
    stream: Stream,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    *,
    workers: int = 0,
    device: torch.device | None = None,
    encoded: bool = False,
    prefetch_factor: int = 4,
) -> Iterator:
    """The endless batch iterator of a stream from ``start_step`` on.

    Samples are read as ``(epoch, index)`` through :class:`EpochFeed`, augmented with
    ``stream_seed(seed, stream.name)``. On CUDA batches come in pinned memory (copied
    without a host sync); with workers, each prefetches ``prefetch_factor`` batches.
    """
    sseed = stream_seed(seed, stream.name)
    sampler = StepBatchSampler(stream.size, batch_size, sseed, start_step, with_epochs=True)
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers else {}
    return iter(
        DataLoader(
            EpochFeed(stream.train, sseed, encoded),
            batch_sampler=sampler,
            collate_fn=stream.collate,
            num_workers=workers,
            pin_memory=device is not None and device.type == "cuda",
            **extra,
        )
    )
