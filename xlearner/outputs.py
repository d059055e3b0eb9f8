"""A stage's output folder: publishing its files and its result; reading published inputs.

A stage writes its files into a local work folder, publishes them one by one under
``--out`` (each publish is atomic), then ``result.json`` last (a
:class:`~xlearner.contract.StageResult`): its presence means the stage is done. Under DDP
every rank trains and rank 0 publishes; :meth:`StageOutput.finish` waits for every rank.
"""

from __future__ import annotations

import logging
import resource
import tempfile
from pathlib import Path
from typing import Any

import torch

from xlearner import distributed
from xlearner.checkpoint import Checkpointer
from xlearner.config import PipelineConfig
from xlearner.contract import StageResult
from xlearner.integrity import (
    IntegrityError,
    recorded_files,
    set_aside,
    verified_result,
    verify_copy,
    verify_folder,
)
from xlearner.models.backbone import count_parameters, save_backbone
from xlearner.models.multitask import save_model
from xlearner.store import ArtifactStore, open_store
from xlearner.store_keys import CHECKPOINTS, RESULT
from xlearner.streams import Trained

log = logging.getLogger(__name__)


class StageOutput:
    """A stage's output folder: local work dir + the store prefix it is published to."""

    def __init__(self, out_uri: str):
        self.uri = out_uri.rstrip("/")
        self.store: ArtifactStore = open_store(self.uri)
        self._tmp = tempfile.TemporaryDirectory(prefix="xlearner-stage-")
        self.work = Path(self._tmp.name)
        self.files: dict[str, str] = {}

    def done(self) -> StageResult | None:
        """The published result, when the stage already ran to the end here and every file
        it lists is intact; a damaged output is named, set aside, and counts as not done.
        (Under DDP rank 0 asks and tells the other ranks: ``stages/main.py``.)"""
        try:
            return verified_result(self.store)
        except IntegrityError as err:
            log.warning(f"{err}")
            set_aside(self.store)
            return None

    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.store, CHECKPOINTS)

    def publish_file(self, path: Path, key: str | None = None) -> str:
        key = key or path.relative_to(self.work).as_posix()
        if distributed.is_main_process():  # under DDP every rank trains, rank 0 publishes
            self.files[key] = self.store.upload_file(key, path)
        return self.store.uri(key)

    def publish_dir(self, folder: Path) -> str:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.publish_file(path)
        return self.store.uri(folder.relative_to(self.work).as_posix())

    def publish_json(self, key: str, value: Any) -> str:
        if distributed.is_main_process():
            self.files[key] = self.store.write_json(key, value)
        return self.store.uri(key)

    def finish(self, result: StageResult) -> StageResult:
        """Publish ``result.json`` (the result, its ``out`` and ``files``) last."""
        result.out = self.uri
        result.files = dict(sorted(self.files.items()))
        result.peak_rss_mb, result.peak_cuda_mb = peak_memory_mb()
        if distributed.is_main_process():
            self.store.write_json(RESULT, result.dump())
        distributed.barrier()  # no rank ends before the output is published
        self.close()
        return result

    def drop_checkpoints(self) -> None:
        if distributed.is_main_process():
            self.store.delete_prefix(CHECKPOINTS)

    def close(self) -> None:
        """Remove the local work folder (again: a no-op)."""
        self._tmp.cleanup()


def fetch_dir(uri: str, endpoint_url: str | None = None) -> Path:
    """A local folder with the artifacts under ``uri`` (downloaded once, when remote),
    checked against the hashes its stage recorded (an :class:`IntegrityError` if not)."""
    if "://" not in uri:
        path = Path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"{uri} is not a folder of published artifacts")
        verify_folder(path)
        return path
    store = open_store(uri, endpoint_url)
    keys = store.list()
    if not keys:
        raise FileNotFoundError(f"{uri} has no published artifacts")
    dest = Path(tempfile.mkdtemp(prefix="xlearner-fetch-"))
    for k in keys:
        (dest / k).parent.mkdir(parents=True, exist_ok=True)
        store.download_file(k, dest / k)
    verify_copy(dest, *recorded_files(uri, endpoint_url), uri)  # what came, as recorded
    return dest


def publish_trained(out: StageOutput, cfg: PipelineConfig, trained: Trained) -> StageResult:
    """Publish a trained model (and its single backbone), metrics and config; then finish."""
    result = StageResult(**trained.extra)
    if trained.model is not None:
        save_model(trained.model, out.work / "model")
        result.model = out.publish_dir(out.work / "model")
    if trained.backbone is not None:
        save = trained.save_backbone or save_backbone
        spec = save(trained.backbone, out.work / "backbone")
        result.backbone = out.publish_dir(out.work / "backbone")
        result.parameters = spec.get("num_parameters", count_parameters(trained.backbone))
    result.metrics = trained.metrics
    out.publish_json("metrics.json", trained.metrics)
    out.publish_json("config.json", cfg.model_dump(mode="json"))
    out.drop_checkpoints()
    return out.finish(result)


def peak_memory_mb() -> tuple[float, float | None]:
    """This process's peak resident memory and, on a GPU, PyTorch's peak CUDA memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
    return round(rss, 1), None if cuda is None else round(cuda, 1)
