"""The ``xlearner`` command.

It is the top of the stack: ``stage`` and ``run`` import ``stages`` and ``flows`` lazily,
inside the commands, so the library itself never depends on them.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from xlearner.config import ConfigError, load_config

app = typer.Typer(
    help="X-Learner: one universal visual backbone from many labelled sources.",
    no_args_is_help=True,
)
data_app = typer.Typer(help="Data sources.", no_args_is_help=True)
stack_app = typer.Typer(
    help="The local service stack (SeaweedFS S3, MLflow, Prefect) without Docker.",
    no_args_is_help=True,
)
sources_app = typer.Typer(
    help="Register sources with a running pipeline deployment.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(stack_app, name="stack")
app.add_typer(sources_app, name="sources")

STAGES = ("ingest", "expand", "reconcile", "squeeze", "transfer")
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="pipeline config YAML")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override: key.path=value (repeatable)")
]


def _load(config: Path, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


@app.command()
def run(config: ConfigOpt = Path("configs/quickstart.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline (ingest, expand, reconcile, squeeze, transfer)."""
    cfg = _load(config, set_)
    # Prefect's ephemeral server (no PREFECT_API_URL) migrates its database on first start:
    # on a busy 2-core machine that takes longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pipeline import run_pipeline

    run_pipeline(cfg)


@app.command("config")
def show_config(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Validate a config and print it with every default filled in."""
    import yaml

    typer.echo(yaml.safe_dump(_load(config, set_).model_dump(mode="json"), sort_keys=False))


@app.command(
    "stage",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
)
def stage(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help=f"one of {', '.join(STAGES)}")]
) -> None:
    """Run one pipeline stage (what a container runs): ``xlearner stage expand --help``."""
    if name not in STAGES:
        typer.echo(f"unknown stage {name!r}; stages: {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    module = importlib.import_module(f"stages.{name}")
    raise typer.Exit(module.main(list(ctx.args)))


@data_app.command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="folder to write the sources into")],
    seed: int = 0,
    images_per_source: int = 240,
    image_size: int = 64,
) -> None:
    """Write synthetic sources in the real on-disk formats (image folders, COCO, masks)."""
    from xlearner.data.synth import synthesize

    for name, path in synthesize(
        out, seed=seed, images_per_source=images_per_source, image_size=image_size
    ).items():
        typer.echo(f"{name}: {path}")


@stack_app.command("up")
def stack_up(
    workdir: Annotated[Path, typer.Option(help="where the services keep their data")] = Path(
        ".xlearner/stack"
    ),
) -> None:
    """Start SeaweedFS, MLflow and Prefect on loopback ports; writes ``<workdir>/stack.env``."""
    from flows.stack import stack_up as up

    env_file = up(workdir)
    typer.echo(f"stack is up; use it with:  set -a; source {env_file}; set +a")


@stack_app.command("down")
def stack_down(workdir: Annotated[Path, typer.Option()] = Path(".xlearner/stack")) -> None:
    """Stop the services started by ``xlearner stack up``."""
    from flows.stack import stack_down as down

    down(workdir)


@sources_app.command("add")
def sources_add(
    config: ConfigOpt,
    name: Annotated[str, typer.Option(help="source name (as in the config)")],
    set_: SetOpt = None,
) -> None:
    """Ingest one source into the store and emit the new-source event (retraining trigger)."""
    cfg = _load(config, set_)
    from flows.trigger import add_source

    typer.echo(add_source(cfg, name))


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
