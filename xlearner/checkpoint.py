"""Checkpoints of a training run in the artifact store, for resume.

A :class:`Checkpointer` writes each checkpoint as a ``step-NNNNNNNN`` folder under its
prefix: the model's weights as safetensors and the optimiser, scheduler and RNG state as
a torch file beside them. ``latest.json`` is written last and names the newest complete
checkpoint, so a run killed at any moment resumes from the previous or the new one; only
the newest ``keep`` folders are kept. Each folder's ``files.json`` (written after its
files, also copied into ``latest.json``) records their sha256: a damaged or truncated
checkpoint is named and skipped, and the run resumes from the newest intact one. Loading
refuses weights that do not match the model. Under DDP rank 0 writes them and reads
them back for every rank (:meth:`Checkpointer.load`).
"""

from __future__ import annotations

import io
import logging

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from xlearner import distributed
from xlearner.store import ArtifactStore, StoreError, join, sha256_bytes
from xlearner.store_keys import LATEST

log = logging.getLogger(__name__)

WEIGHTS, TRAINER, FILES = "model.safetensors", "trainer_state.pt", "files.json"


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files are missing, do not match their sha256 or do not parse."""


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
        files = {WEIGHTS: self.store.write_bytes(join(folder, WEIGHTS), save_safetensors(weights))}
        buf = io.BytesIO()
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            buf,
        )
        files[TRAINER] = self.store.write_bytes(join(folder, TRAINER), buf.getvalue())
        self.store.write_json(join(folder, FILES), files)
        latest = {"step": step, "folder": folder, "files": files, **extra}
        self.store.write_json(join(self.prefix, LATEST), latest)
        self._prune(step)

    def _steps(self) -> list[int]:
        """The steps of the checkpoint folders in the store, oldest first."""
        return sorted(
            {
                int(k.split("step-")[1].split("/")[0])
                for k in self.store.list(self.prefix)
                if "step-" in k
            }
        )

    def _prune(self, step: int) -> None:
        for old in self._steps()[: -self.keep]:
            self.store.delete_prefix(join(self.prefix, f"step-{old:08d}"))

    def latest(self) -> dict | None:
        key = join(self.prefix, LATEST)
        return self.store.read_json(key) if self.store.exists(key) else None

    def _read(self, folder: str, recorded: dict | None) -> dict[str, bytes]:
        """The files of one checkpoint folder, checked against the sha256 recorded for
        them (``recorded``, else its ``files.json``) and parsed once."""
        uri = self.store.uri(folder)
        try:
            if recorded is None and self.store.exists(join(folder, FILES)):
                recorded = self.store.read_json(join(folder, FILES))
            data = {name: self.store.read_bytes(join(folder, name)) for name in (WEIGHTS, TRAINER)}
        except StoreError as err:
            raise DamagedCheckpoint(f"checkpoint {uri}: {err}") from None
        for name, expected in (recorded or {}).items():
            if name in data and (actual := sha256_bytes(data[name])) != expected:
                raise DamagedCheckpoint(
                    f"checkpoint {uri}: {name} has sha256 {actual}, recorded {expected}"
                )
        try:
            _parse(data)
        except Exception as err:  # noqa: BLE001 - unhashed (older) checkpoints: any parse error
            raise DamagedCheckpoint(f"checkpoint {uri}: unreadable ({err})") from None
        return data

    def newest_intact(self) -> tuple[int, str, dict[str, bytes]] | None:
        """The step, folder and files of the newest intact checkpoint (None: there is none).

        A damaged one (missing file, wrong sha256, unreadable) is logged by name and the
        next older one is tried."""
        try:
            info = self.latest() or {}
        except StoreError as err:  # the folders' own files.json still say what is intact
            log.warning(f"{err}; looking for checkpoint folders instead")
            info = {}
        steps = sorted({*self._steps(), *([int(info["step"])] if info else [])}, reverse=True)
        for step in steps:
            folder = join(self.prefix, f"step-{step:08d}")
            recorded = info.get("files") if info.get("folder") == folder else None
            try:
                data = self._read(folder, recorded)
            except DamagedCheckpoint as err:
                log.warning(f"{err}; trying the previous checkpoint")
                continue
            if step != steps[0]:
                log.warning(f"resuming from {self.store.uri(folder)}, the newest intact checkpoint")
            return step, folder, data
        if steps:
            log.warning(f"no intact checkpoint under {self.store.uri(self.prefix)}; starting over")
        return None

    def load(self, model: nn.Module, optimizer, scheduler) -> int:
        """Restore the newest intact checkpoint; returns its step (0 when there is none).

        Under DDP rank 0 picks and reads it (the store may be a folder only its node
        sees) and sends its files to every rank, which all load the same bytes."""
        found = self.newest_intact() if distributed.is_main_process() else None
        found = distributed.broadcast_object(found)
        if found is None:
            return 0
        step, folder, data = found
        state, trainer = _parse(data)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {self.store.uri(folder)} does not match the model: "
                f"missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; delete it or rerun with the config that wrote it"
            )
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["rng"])
        return step


def _parse(data: dict[str, bytes]) -> tuple[dict, dict]:
    """A checkpoint's weights (safetensors) and trainer state (tensors only, no pickles)."""
    return load_safetensors(data[WEIGHTS]), torch.load(io.BytesIO(data[TRAINER]), weights_only=True)
