"""A tiny pipeline config over the synthetic sources: seconds per stage on a CPU, and
its sources ingested for the tests that call stages directly."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from xlearner.config import DownstreamConfig, PipelineConfig, SourceConfig, validate_config
from xlearner.data.ingest import ingest_source
from xlearner.store import ArtifactStore
from xlearner.store_keys import manifest_key

TINY_TRAIN = {"steps": 6, "batch_size": 8, "warmup_steps": 1}


def tiny_config_dict(
    data_root: str,
    store_uri: str,
    tracking_uri: str | None = None,
    *,
    sources: tuple[str, ...] = ("shapes_cls", "shapes_det", "shapes_seg"),
    downstream: tuple[str, ...] = ("down_cls_a", "down_seg"),
    **overrides: Any,
) -> dict:
    formats = {
        "shapes_cls": "cls",
        "shapes_attr": "multilabel",
        "shapes_det": "det",
        "shapes_seg": "seg",
        "shapes_unlabeled": "unlabeled",
        "down_cls_a": "cls",
        "down_cls_b": "cls",
        "down_det": "det",
        "down_seg": "seg",
    }
    data = {
        "name": "tiny",
        "variant": "xlearner",
        "sources": [{"name": n, "format": formats[n], "uri": f"{data_root}/{n}"} for n in sources],
        "downstream": [
            {"name": n, "format": formats[n], "uri": f"{data_root}/{n}"} for n in downstream
        ],
        "model": {"backbone": "tiny_resnet", "image_size": 32},
        "tasks": {},
        "reconcile": {"train": TINY_TRAIN},
        "squeeze": {"train": TINY_TRAIN},
        "transfer": {"finetune": {**TINY_TRAIN, "steps": 3}, "probe_l2": [1e-3, 1e-2]},
        "engine": {"log_every_steps": 2, "checkpoint_every_steps": 3, "eval_max_images": 32},
        "store": {"uri": store_uri},
        "tracking": {"uri": tracking_uri},
    }
    fed = {formats[n] for n in sources} - {"unlabeled"}
    data["tasks"] = {t: TINY_TRAIN for t in fed}
    data.update(overrides)
    return data


def tiny_config(
    data_root: str, store_uri: str, tracking_uri: str | None = None, **kw: Any
) -> PipelineConfig:
    return validate_config(
        tiny_config_dict(data_root, store_uri, tracking_uri, **kw), origin="tiny_config"
    )


def ingest_all(
    sources: Iterable[SourceConfig | DownstreamConfig], store: ArtifactStore, **options: Any
) -> dict[str, str]:
    """Each source published in ``store`` by ``ingest_source``: ``{name: manifest URI}``."""
    manifests = {}
    for source in sources:
        version = ingest_source(source, store, **options)["version"]
        manifests[source.name] = store.uri(manifest_key(source.name, version))
    return manifests
