"""Ingest stage: validate sources, split, shard and publish versioned manifests.

Every run ingests (a source whose content is already published is a no-op there);
``--out`` also publishes the result there. Each source version is published under its
own lease (:func:`~xlearner.data.ingest.ingest_source`): a second ingest of the same
version waits for the first (``XLEARNER_LEASE_WAIT_S``), then exits ``BUSY`` naming it.
"""

from __future__ import annotations

import os
import sys

from stages.main import LEASE_WAIT_ENV, stage_main
from xlearner.config import ConfigError, PipelineConfig
from xlearner.contract import IngestCall, StageResult
from xlearner.data.ingest import ingest_source
from xlearner.lease import DEFAULT_WAIT_S
from xlearner.outputs import StageOutput
from xlearner.store import open_store
from xlearner.store_keys import manifest_key


def body(call: IngestCall, cfg: PipelineConfig, out: StageOutput | None) -> StageResult:
    every = {s.name: s for s in [*cfg.sources, *cfg.downstream]}
    unknown = sorted(set(call.sources) - set(every))
    if unknown:
        raise ConfigError(f"--source {unknown}: not in the config; sources: {sorted(every)}")
    store = open_store(call.store or cfg.store.uri, cfg.store.endpoint_url)
    manifests, versions = {}, {}
    lease_wait_s = float(os.environ.get(LEASE_WAIT_ENV, DEFAULT_WAIT_S))
    for name in call.sources or list(every):
        manifest = ingest_source(
            every[name],
            store,
            image_size=cfg.model.image_size,
            options=cfg.ingest,
            lease_wait_s=lease_wait_s,
            run=call.mlflow_parent_run_id,
        )
        manifests[name] = store.uri(manifest_key(name, manifest["version"]))
        versions[name] = manifest["version"]
    result = StageResult(manifests=manifests, versions=versions)
    return out.finish(result) if out else result


def main(argv: list[str] | None = None) -> int:
    return stage_main(IngestCall, body, argv, skip_done=False)


if __name__ == "__main__":
    sys.exit(main())
