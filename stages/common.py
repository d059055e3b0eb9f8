"""What every stage shares: arguments, config by URI, publishing outputs, exit codes.

A stage writes its files into a local work folder, publishes them one by one under
``--out`` (each publish is atomic), then publishes ``result.json`` last: its presence
means the stage is done. It prints ``XLEARNER_RESULT {json}`` for the runner and exits
non-zero on failure with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xlearner import distributed
from xlearner.config import ConfigError, PipelineConfig, apply_overrides, validate_config
from xlearner.engine import Checkpointer
from xlearner.store import ArtifactStore, StoreError, open_store

RESULT_PREFIX = "XLEARNER_RESULT "
RESULT_FILE = "result.json"

log = logging.getLogger("xlearner.stage")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record comes, not the one of the moment
    it was made: a stage run in-process (tests, with captured and later closed streams)
    must not leave the root logger writing to a closed file."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[_StdoutHandler()],
        force=True,
    )


def base_parser(stage: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"xlearner stage {stage}", description=description)
    parser.add_argument(
        "--config", required=True, help="pipeline config: local YAML/JSON file or s3:// URI"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--mlflow-parent-run-id", default=None, help="log as a nested run of this MLflow run"
    )
    return parser


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    """``["a=uri1", "b=uri2"]`` -> ``{"a": "uri1", "b": "uri2"}``."""
    out = {}
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep or not name or not uri:
            raise ConfigError(f"{flag} {value!r}: expected NAME=URI")
        out[name] = uri
    return out


def load_config_uri(uri: str, overrides: list[str]) -> PipelineConfig:
    """Load a config from a local file or from the store (the flow publishes it there)."""
    import yaml

    if "://" in uri:
        parent, _, name = uri.rpartition("/")
        text = open_store(parent).read_bytes(name).decode()
    else:
        path = Path(uri)
        if not path.is_file():
            raise ConfigError(f"config file {uri} does not exist")
        text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {uri} is not valid YAML/JSON: {err}") from None
    return validate_config(apply_overrides(data, overrides), origin=uri)


class StageOutput:
    """A stage's output folder: local work dir + the store prefix it is published to."""

    def __init__(self, out_uri: str):
        self.uri = out_uri.rstrip("/")
        self.store: ArtifactStore = open_store(self.uri)
        self._tmp = tempfile.TemporaryDirectory(prefix="xlearner-stage-")
        self.work = Path(self._tmp.name)
        self.files: dict[str, str] = {}

    def done(self) -> dict | None:
        return self.store.read_json(RESULT_FILE) if self.store.exists(RESULT_FILE) else None

    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.store, "checkpoints")

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

    def finish(self, result: dict) -> dict:
        result = {**result, "out": self.uri, "files": dict(sorted(self.files.items()))}
        if distributed.is_main_process():
            self.store.write_json(RESULT_FILE, result)
        self._tmp.cleanup()
        return result

    def drop_checkpoints(self) -> None:
        if distributed.is_main_process():
            self.store.delete_prefix("checkpoints")


def emit_result(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)


def run_stage(stage: str, body: Callable[[], dict]) -> int:
    """Run a stage body; print its result; turn errors into a clear message + exit 1."""
    setup_logging()
    t0 = time.perf_counter()
    try:
        distributed.init_from_env()  # under torchrun: join the process group (no-op otherwise)
        result = body()
    except (ConfigError, StoreError, ValueError, FileNotFoundError) as err:
        log.error(f"stage {stage} failed: {err}")
        return 2
    except Exception:  # noqa: BLE001 - a stage reports every failure on its way out
        log.error(f"stage {stage} failed:\n{traceback.format_exc()}")
        return 1
    finally:
        distributed.cleanup()
    result.setdefault("stage", stage)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if distributed.is_main_process():
        emit_result(result)
    return 0


def already_done(out: StageOutput, stage: str) -> dict | None:
    result = out.done()
    if result is not None:
        log.info(f"stage {stage}: {out.uri} already has {RESULT_FILE}; nothing to do")
        return {**result, "skipped": True}
    return None


def fetch_dir(uri: str) -> Path:
    """A local folder with the artifacts under ``uri`` (downloaded once, when remote)."""
    if "://" not in uri:
        path = Path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"{uri} is not a folder of published artifacts")
        return path
    store = open_store(uri)
    keys = store.list()
    if not keys:
        raise FileNotFoundError(f"{uri} has no published artifacts")
    dest = Path(tempfile.mkdtemp(prefix="xlearner-fetch-"))
    for k in keys:
        (dest / k).parent.mkdir(parents=True, exist_ok=True)
        store.download_file(k, dest / k)
    return dest


def publish_trained(
    out: StageOutput, cfg: PipelineConfig, model, metrics: dict, extra: dict, backbone=None
) -> dict:
    """Publish a trained model (and its single backbone), metrics and config; then finish."""
    from xlearner.models.backbones import count_parameters, save_backbone
    from xlearner.models.multitask import save_model

    result = dict(extra)
    if model is not None:
        save_model(model, out.work / "model")
        result["model"] = out.publish_dir(out.work / "model")
    if backbone is not None:
        spec = save_backbone(backbone, out.work / "backbone")
        result["backbone"] = out.publish_dir(out.work / "backbone")
        result["parameters"] = spec.get("num_parameters", count_parameters(backbone))
    result["metrics"] = metrics
    out.publish_json("metrics.json", metrics)
    out.publish_json("config.json", cfg.model_dump(mode="json"))
    out.drop_checkpoints()
    return out.finish(result)
