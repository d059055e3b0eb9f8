"""Ingest stage: validate sources, split, shard and publish versioned manifests."""

from __future__ import annotations

import sys

from stages.common import StageOutput, base_parser, load_config_uri, run_stage
from xlearner.config import ConfigError
from xlearner.data.ingest import ingest_source
from xlearner.store import open_store


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("ingest", __doc__)
    parser.add_argument(
        "--source", action="append", default=[], help="source name (default: all, downstream too)"
    )
    parser.add_argument("--store", default=None, help="store URI (default: the config's store.uri)")
    parser.add_argument("--out", default=None, metavar="URI", help="also publish result.json here")
    args = parser.parse_args(argv)

    def body() -> dict:
        cfg = load_config_uri(args.config, args.overrides)
        every = {s.name: s for s in [*cfg.sources, *cfg.downstream]}
        unknown = sorted(set(args.source) - set(every))
        if unknown:
            raise ConfigError(f"--source {unknown}: not in the config; sources: {sorted(every)}")
        store = open_store(args.store or cfg.store.uri, cfg.store.endpoint_url)
        manifests, versions = {}, {}
        for name in args.source or list(every):
            manifest = ingest_source(every[name], store, image_size=cfg.model.image_size)
            manifests[name] = store.uri(f"sources/{name}/{manifest['version']}/manifest.json")
            versions[name] = manifest["version"]
        result = {"manifests": manifests, "versions": versions}
        return StageOutput(args.out).finish(result) if args.out else result

    return run_stage("ingest", body)


if __name__ == "__main__":
    sys.exit(main())
