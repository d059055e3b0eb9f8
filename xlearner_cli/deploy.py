"""``xlearner deploy ...``: the pipeline's Prefect deployments (:mod:`flows.deployments`)."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.deployments import DOCKER_POOL, FLOW_IMAGE, SENSOR_EVERY_S, SERVE_SENSOR_EVERY_S
from xlearner_cli.options import ConfigOpt, SetOpt, config_errors

deploy_app = typer.Typer(help="Deploy the xlearner pipeline to Prefect.", no_args_is_help=True)
CronOpt = Annotated[str | None, typer.Option("--cron", help='schedule, e.g. "0 3 * * *"')]
NameOpt = Annotated[str | None, typer.Option(help="deployment name (default: the config's name)")]


@deploy_app.command("create")
def deploy_command(
    config: ConfigOpt,
    pool: Annotated[str, typer.Option(help="work pool (created when missing)")] = DOCKER_POOL,
    cron: CronOpt = None,
    name: NameOpt = None,
    image: Annotated[str, typer.Option(help="flow-run image on a Docker pool")] = FLOW_IMAGE,
    sensor_every: Annotated[
        int, typer.Option(help="sensor interval in s; 0: none")
    ] = SENSOR_EVERY_S,
    set_: SetOpt = None,
) -> None:
    """Register the pipeline and its source sensor with a work pool."""
    from flows.deployments import deploy

    with config_errors():
        ids = deploy(
            config,
            pool=pool,
            schedule_cron=cron,
            name=name,
            image=image,
            sensor_every_s=sensor_every or None,
            overrides=set_,
        )
    for deployment, deployment_id in ids.items():
        typer.echo(f"{deployment}: {deployment_id}")
    typer.echo(f"start a worker: prefect worker start --pool {pool}")


@deploy_app.command("serve")
def serve_command(
    config: ConfigOpt,
    cron: CronOpt = None,
    name: NameOpt = None,
    sensor_every: Annotated[
        int, typer.Option(help="sensor interval in s; 0: none")
    ] = SERVE_SENSOR_EVERY_S,
    set_: SetOpt = None,
) -> None:
    """Register the pipeline and its sensor and run them in this process."""
    from flows.deployments import serve

    with config_errors():
        serve(
            config,
            schedule_cron=cron,
            name=name,
            sensor_every_s=sensor_every or None,
            overrides=set_,
        )
