"""A real 2-process CPU DDP run (gloo): the all-gathered NT-Xent equals the full-batch loss;
the engine's logged losses are the mean over the ranks; rank 0's decisions reach every rank.

The workers run under ``torchrun --standalone`` in fresh interpreters (this file is their
script): forking the pytest process, which by then holds Prefect's and MLflow's threads,
made a worker exit with code 1 in full test runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xlearner import distributed
from xlearner.engine import LossWindow
from xlearner.models.ssl import nt_xent_loss

WORLD = 2
BATCH, DIM = 6, 16  # full batch; each rank holds BATCH // WORLD pairs
UNEVEN_SIZES = [4, 2]  # rows per rank for the uneven all-gather check


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(BATCH, DIM, generator=gen)
    return z1, z1 + 0.5 * torch.randn(BATCH, DIM, generator=gen)


def _worker(out_dir: str) -> None:
    """One rank, launched by torchrun (which sets RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    device = distributed.init_from_env("cpu")
    try:
        assert device == torch.device("cpu")
        assert distributed.is_distributed()
        assert (distributed.rank(), distributed.world_size()) == (rank, WORLD)

        half = BATCH // WORLD
        z1, z2 = (
            z[rank * half : (rank + 1) * half].clone().requires_grad_() for z in _embeddings()
        )
        loss = nt_xent_loss(z1, z2, temperature=0.2)
        loss.backward()

        start = sum(UNEVEN_SIZES[:rank])
        rows = torch.arange(sum(UNEVEN_SIZES), dtype=torch.float32)[:, None].repeat(1, 3)
        local = rows[start : start + UNEVEN_SIZES[rank]].clone().requires_grad_()
        gathered, offset = distributed.all_gather_with_offset(local)
        weights = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
        (gathered * weights * (rank + 1)).sum().backward()

        # the engine's logged losses: the mean over the ranks, not rank 0's
        window = LossWindow(device)
        window.add(1, {"loss": torch.tensor(float(rank + 1)), "b": torch.tensor(10.0 * rank)})
        logged = window.read()
        told = distributed.broadcast_object({"from": rank})
        anyone = distributed.any_rank(rank == 1)
        with distributed.local_only():  # rank 0 working alone: no collective waits
            alone = distributed.is_distributed()
            if rank == 0:
                distributed.all_gather_with_grad(torch.ones(2, 1))

        distributed.barrier()
        torch.save(
            {
                "logged": torch.tensor([logged["loss"], logged["b"]]),
                "told": torch.tensor(told["from"]),
                "anyone": torch.tensor(anyone),
                "alone": torch.tensor(alone),
                "loss": loss.detach(),
                "grad_z1": z1.grad,
                "grad_z2": z2.grad,
                "gathered": gathered.detach(),
                "offset": torch.tensor(offset),
                "uneven_grad": local.grad,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        distributed.cleanup()


def test_all_gather_nt_xent_matches_single_process(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(WORLD), __file__, str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    z1, z2 = (z.clone().requires_grad_() for z in _embeddings())
    full_loss = nt_xent_loss(z1, z2, temperature=0.2)
    full_loss.backward()

    # The mean of the per-rank losses is the full-batch loss ...
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    torch.testing.assert_close(mean_loss, full_loss.detach())
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])  # ranks see different pairs
    # ... and each rank's local gradient is that of the SUM of the per-rank losses, so
    # DDP's average over ranks (divide by WORLD) gives the full-batch gradient.
    for name, full_grad in (("grad_z1", z1.grad), ("grad_z2", z2.grad)):
        ddp_grad = torch.cat([r[name] for r in results]) / WORLD
        torch.testing.assert_close(ddp_grad, full_grad)

    for result in results:  # mean over ranks; rank 0's object; one rank's flag for all
        torch.testing.assert_close(result["logged"], torch.tensor([1.5, 5.0]))
        assert int(result["told"]) == 0 and bool(result["anyone"]) and not bool(result["alone"])

    # Uneven batches: every rank sees all rows in rank order; each row's gradient sums
    # the weights it had on every rank: w * (1 + 2).
    rows = torch.arange(sum(UNEVEN_SIZES), dtype=torch.float32)[:, None].repeat(1, 3)
    weights = torch.arange(rows.numel(), dtype=torch.float32).view_as(rows)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["gathered"], rows)
        start = sum(UNEVEN_SIZES[:rank])
        assert int(result["offset"]) == start
        expected = weights[start : start + UNEVEN_SIZES[rank]] * sum(range(1, WORLD + 1))
        torch.testing.assert_close(result["uneven_grad"], expected)


def test_helpers_without_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    assert distributed.is_main_process()
    tensor = torch.randn(3, 4, requires_grad=True)
    assert distributed.all_gather_with_grad(tensor) is tensor
    distributed.barrier()  # no-op
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        distributed.init_from_env("tpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_from_env("cpu")


if __name__ == "__main__":
    _worker(sys.argv[1])
