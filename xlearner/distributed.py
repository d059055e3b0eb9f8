"""Small helpers for data-parallel training (DDP) launched by ``torchrun``.

Every helper is a no-op (or returns the single-process answer) when no process group
is initialised, so the same code runs on one CPU, one GPU and many GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# The group of the control messages (decisions, flags, small objects): gloo on the CPU,
# so they never queue behind the GPU's work and a rank waiting on one (while rank 0
# evaluates or publishes) is under gloo's timeout, not NCCL's watchdog. ``None``: the
# default group (already gloo on CPU).
_control: Any = None
_local_depth = 0  # > 0: this rank works alone (see local_only)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process (and not
    inside :func:`local_only`)."""
    return (
        _local_depth == 0
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


@contextmanager
def local_only() -> Iterator[None]:
    """Work that one rank does alone (rank 0 evaluating the whole val set): inside, every
    helper here acts as in a single process, so no collective waits for the other ranks."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 writes checkpoints, results and logs."""
    return rank() == 0


def init_from_env(device: str = "auto") -> torch.device:
    """Join the process group described by torchrun's environment; return the local device.

    ``device``: ``auto`` (CUDA when available), ``cuda`` or ``cpu``. Under torchrun
    (``WORLD_SIZE`` > 1) the backend is NCCL on CUDA and gloo on CPU, and each process
    takes the GPU of its ``LOCAL_RANK``. Without torchrun nothing is initialised.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(
            "engine.device is 'cuda' but torch sees no GPU; set engine.device to 'auto' or 'cpu'"
        )
    env_world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world_size <= 1:
        return torch.device("cuda" if use_cuda else "cpu")
    missing = [name for name in TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={env_world_size} but the environment lacks {missing}; "
            "launch distributed training with torchrun"
        )
    local_device = torch.device("cpu")
    kwargs: dict[str, Any] = {"backend": "gloo"}
    if use_cuda:
        local_device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local_device)
        kwargs = {"backend": "nccl", "device_id": local_device}
    if not dist.is_initialized():
        dist.init_process_group(
            rank=int(os.environ["RANK"]), world_size=env_world_size, init_method="env://", **kwargs
        )
    global _control
    _control = dist.new_group(backend="gloo") if use_cuda else None  # gloo: the default group
    return local_device


def barrier() -> None:
    """Wait for every rank (on the control group)."""
    if is_distributed():
        dist.barrier(group=_control)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled: only for objects made by our code)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=_control)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a decision all ranks must share)."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_control)
    return bool(value.item())


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over the ranks (every rank calls it)."""
    if not is_distributed():
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size()


def sync_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank.

    DDP sends rank 0's buffers at the start of each forward, so after the last step each
    rank holds the statistics of its own shard; after this every rank holds what rank 0
    publishes."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def cleanup() -> None:
    """Leave the process group (call once at the end of a distributed run)."""
    global _control
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = None


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns each rank its slice of the summed grad.

    Each rank's loss depends on every rank's rows, so the gradient of a local row is the
    sum over ranks of d(loss_r)/d(row): an all-reduce (sum) of the gathered gradient,
    then the local slice. DDP then averages parameter gradients over ranks, which makes
    the effective objective the mean of the per-rank losses.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.sizes = sizes
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded.contiguous())
        return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: dist.get_rank()])
        return grad[start : start + ctx.sizes[dist.get_rank()]], None


def all_gather_with_offset(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Gather ``[B_r, ...]`` from every rank into ``[sum(B_r), ...]`` (rank order), with grad.

    Returns the gathered tensor and the row where this rank's rows start. Ranks may hold
    different batch sizes (a last, smaller batch). Not distributed: ``(tensor, 0)``.
    """
    if not is_distributed():
        return tensor, 0
    local_size = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_sizes = [torch.empty_like(local_size) for _ in range(world_size())]
    dist.all_gather(all_sizes, local_size)
    sizes = [int(size.item()) for size in all_sizes]
    return _AllGatherWithGrad.apply(tensor, sizes), sum(sizes[: rank()])


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` on every rank -> ``[world * B, ...]``; the local slice keeps its gradient."""
    return all_gather_with_offset(tensor)[0]
