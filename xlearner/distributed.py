"""Small helpers for data-parallel training (DDP) launched by ``torchrun``.

Every helper is a no-op (or returns the single-process answer) when no process group
is initialised, so the same code runs on one CPU, one GPU and many GPUs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    return local_device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of a distributed run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
