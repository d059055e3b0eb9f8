"""Transfer stage: evaluate backbones on the downstream sources and write the report.

Classification: a linear probe on frozen, pooled C5 features (L-BFGS, L2 chosen on a
split of the train set). Detection and segmentation: fine-tune a fresh head. The same
protocol and seed for every backbone; one report row per backbone.
"""

from __future__ import annotations

import sys

import torch

from stages.common import (
    StageOutput,
    already_done,
    base_parser,
    fetch_dir,
    load_config_uri,
    parse_pairs,
    run_stage,
)
from xlearner import tracking
from xlearner.data.shards import ShardDataset, collate_fn
from xlearner.engine import resolve_device
from xlearner.finetune import finetune_score
from xlearner.models.backbones import count_parameters, create_backbone, load_backbone
from xlearner.report import build_report, write_report
from xlearner.transfer import UnseenClassesError, extract_features, fit_linear_probe

RANDOM = "random:"


def open_backbone(uri: str, seed: int) -> torch.nn.Module:
    """A published backbone folder, or ``random:<architecture>`` (the random-init baseline)."""
    if uri.startswith(RANDOM):
        torch.manual_seed(seed)
        return create_backbone(uri.removeprefix(RANDOM))
    return load_backbone(fetch_dir(uri))


def probe_top1(backbone, manifest_uri: str, name: str, cfg, device) -> float:
    loaders = []
    for split in ("train", "val"):
        ds = ShardDataset(manifest_uri, split, cfg.model.image_size)
        loaders.append(
            torch.utils.data.DataLoader(ds, batch_size=128, collate_fn=collate_fn("cls"))
        )
        num_classes = ds.num_classes
    train_x, train_y = extract_features(backbone, loaders[0], device)
    val_x, val_y = extract_features(backbone, loaders[1], device)
    try:
        result = fit_linear_probe(
            train_x,
            train_y,
            val_x,
            val_y,
            num_classes=num_classes,
            l2_grid=cfg.transfer.probe_l2,
            max_iter=cfg.transfer.probe_max_iter,
            seed=cfg.seed,
            device=device,
        )
    except UnseenClassesError as err:
        raise ValueError(f"downstream source {name!r} ({manifest_uri}): {err}") from None
    return result.top1


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("transfer", __doc__)
    parser.add_argument(
        "--backbone", action="append", default=[], metavar="NAME=URI", help="or NAME=random:ARCH"
    )
    parser.add_argument("--train-images", action="append", default=[], metavar="NAME=N")
    parser.add_argument("--downstream", action="append", default=[], metavar="NAME=MANIFEST_URI")
    parser.add_argument("--out", required=True, metavar="URI")
    args = parser.parse_args(argv)

    def body() -> dict:
        cfg = load_config_uri(args.config, args.overrides)
        out = StageOutput(args.out)
        if done := already_done(out, "transfer"):
            return done
        backbones = parse_pairs(args.backbone, "--backbone")
        images = {k: int(v) for k, v in parse_pairs(args.train_images, "--train-images").items()}
        downstream = parse_pairs(args.downstream, "--downstream")
        formats = {d.name: d.format.value for d in cfg.downstream}
        unknown = sorted(set(downstream) - set(formats))
        if unknown:
            raise ValueError(
                f"--downstream {unknown}: not in the config's downstream list {sorted(formats)}"
            )
        device = resolve_device(cfg.engine)
        opened = {name: open_backbone(uri, cfg.seed).to(device) for name, uri in backbones.items()}
        rows = []
        with tracking.stage_run(cfg.tracking, args.mlflow_parent_run_id, "transfer") as tracker:
            for name, backbone in opened.items():
                row = {
                    "name": name,
                    "cls": {},
                    "det": {},
                    "seg": {},
                    "parameters": count_parameters(backbone),
                    "train_images": images.get(name),
                }
                for ds_name, manifest in downstream.items():
                    fmt = formats[ds_name]
                    if fmt == "cls":
                        row["cls"][ds_name] = probe_top1(backbone, manifest, ds_name, cfg, device)
                    else:
                        row[fmt][ds_name] = finetune_score(
                            backbone, manifest, fmt, cfg, f"{name}-{ds_name}"
                        )
                rows.append(row)
            report = build_report(rows)
            for row in report["rows"]:
                metrics = {
                    f"transfer/{row['name']}/{k}": v for k, v in row.items() if isinstance(v, float)
                }
                tracker.log_metrics(metrics)
            paths = write_report(report, out.work / "report")
            for path in paths.values():
                out.publish_file(path)
                tracker.log_artifact(path, "report")
            return out.finish({"report": report, "report_md": out.store.uri("report/report.md")})

    return run_stage("transfer", body)


if __name__ == "__main__":
    sys.exit(main())
