"""The ``xlearner`` command: ``run``, ``config``, ``stage``, ``data``, ``stack``, ``sources``,
``deploy``.

``stages``, ``flows`` and ``devstack`` are imported inside the commands that need them.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Annotated

import typer

from xlearner_cli.deploy import deploy_app
from xlearner_cli.options import ConfigOpt, SetOpt, load

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
app.add_typer(deploy_app, name="deploy")

STAGES = ("ingest", "expand", "reconcile", "squeeze", "transfer")


@app.command()
def run(config: ConfigOpt = Path("configs/quickstart.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline (ingest, expand, reconcile, squeeze, transfer)."""
    cfg = load(config, set_)
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

    typer.echo(yaml.safe_dump(load(config, set_).model_dump(mode="json"), sort_keys=False))


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
    from devstack import stack_up as up

    env_file = up(workdir)
    typer.echo(f"stack is up; use it with:  set -a; source {env_file}; set +a")


@stack_app.command("down")
def stack_down(workdir: Annotated[Path, typer.Option()] = Path(".xlearner/stack")) -> None:
    """Stop the services started by ``xlearner stack up``."""
    from devstack import stack_down as down

    down(workdir)


@sources_app.command("add")
def sources_add(
    config: ConfigOpt,
    name: Annotated[str, typer.Option(help="source name (as in the config)")],
    set_: SetOpt = None,
) -> None:
    """Ingest one source into the store and emit the new-source event (retraining trigger)."""
    cfg = load(config, set_)
    from flows.trigger import add_source

    typer.echo(add_source(cfg, name))
