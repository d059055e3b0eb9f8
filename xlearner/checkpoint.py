"""Checkpoints of a training run in the artifact store, for resume.

A :class:`Checkpointer` writes each checkpoint as a ``step-NNNNNNNN`` folder under its
prefix: the model's weights as safetensors and the optimiser, scheduler and RNG state as
a torch file beside them. ``latest.json`` is written last and names the newest complete
checkpoint, so a run killed at any moment resumes from the previous or the new one; only
the newest ``keep`` folders are kept. Loading refuses weights that do not match the model.
"""

from __future__ import annotations

import io

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from xlearner.store import ArtifactStore, join
from xlearner.store_keys import LATEST


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
        self.store.write_json(join(self.prefix, LATEST), {"step": step, "folder": folder, **extra})
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
        key = join(self.prefix, LATEST)
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
