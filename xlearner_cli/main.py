"""The ``xlearner`` command: ``run``, ``report``, ``config``, ``stage``, ``data``, ``stack``,
``sources``, ``deploy``.

``stages``, ``flows`` and ``devstack`` are imported inside the commands that need them.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from xlearner.config import PipelineConfig
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
def run(
    config: ConfigOpt = Path("configs/quickstart.yaml"),
    set_: SetOpt = None,
    seeds: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="run every variant once per seed (seed, seed+1, ...): means, 95% intervals "
            "and the claims table; same as `--set seeds=[...]`",
        ),
    ] = None,
    no_repair: Annotated[
        bool,
        typer.Option(
            "--no-repair",
            help="fail on a published output whose files do not match their recorded "
            "sha256, instead of re-running its stage",
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="on failure, also print the full traceback")
    ] = False,
) -> None:
    """Run the whole pipeline (ingest, expand, reconcile, squeeze, transfer).

    A failed run ends with the failing stage's error and log tail, and the exit code of
    that stage (2 bad input, 75 store unavailable, ...; docs/reliability.md); SIGINT or
    SIGTERM stops the running stages after their checkpoint (exit 130 or 143).
    """
    cfg = load_seeded(config, set_, seeds)
    # Prefect's ephemeral server (no PREFECT_API_URL) migrates its database on first start:
    # on a busy 2-core machine that takes longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.lifecycle import run_stoppable, start_ephemeral_server
    from flows.pipeline import run_pipeline

    start_ephemeral_server()
    outcome = run_stoppable(lambda: run_pipeline(cfg, no_repair=no_repair))
    if outcome.error is None and not outcome.signals:
        return
    if verbose and outcome.error is not None:
        traceback.print_exception(outcome.error)
    code = run_failed(outcome.error, outcome.signals)
    if outcome.abandoned:  # the flow's thread still runs: exit without waiting for it
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


def load_seeded(config: Path, set_: list[str] | None, seeds: int | None) -> PipelineConfig:
    """The config of ``xlearner run``; ``--seeds N``: seeds ``seed .. seed + N - 1``."""
    cfg = load(config, set_)
    if seeds is None:
        return cfg
    return load(config, [*(set_ or []), f"seeds={[cfg.seed + i for i in range(seeds)]}"])


def run_failed(err: BaseException | None, signals: list[int]) -> int:
    """Print why a pipeline run failed (one message, and the stage's log tail); its exit code."""
    from flows.runners import StageFailed
    from xlearner.config import ConfigError
    from xlearner.contract import ExitCode

    if signals:
        name = signal.Signals(signals[0]).name
        typer.echo(
            f"xlearner run: stopped by {name}; the running stages saved a checkpoint. "
            "Run the same command again to resume.",
            err=True,
        )
        return 128 + signals[0]
    if isinstance(err, StageFailed):
        tail = f"\n--- last lines of its log ---\n{err.log_tail}\n---" if err.log_tail else ""
        what = err.reason or f"failed with exit code {err.returncode}"
        typer.echo(f"xlearner run: stage {err.stage!r} {what}{tail}", err=True)
        typer.echo(
            "The stages that finished are kept: fix the cause and run the same command "
            "again to resume (--verbose: the full traceback).",
            err=True,
        )
        code = err.returncode
        return code if isinstance(code, int) and 0 < code < 256 else 1
    if isinstance(err, KeyboardInterrupt):
        typer.echo("xlearner run: interrupted", err=True)
        return 130
    if isinstance(err, ConfigError):
        typer.echo(f"xlearner run: {err}", err=True)
        return int(ExitCode.BAD_INPUT)
    typer.echo(
        f"xlearner run failed: {type(err).__name__}: {err} (--verbose: the traceback)", err=True
    )
    return 1


@app.command("report")
def report(
    config: ConfigOpt = Path("configs/quickstart.yaml"),
    set_: SetOpt = None,
    out: Annotated[Path, typer.Option(help="folder for results.{md,json,png}")] = Path("results"),
    preamble: Annotated[
        Path | None, typer.Option(help="markdown file written before the tables (your reading)")
    ] = None,
) -> None:
    """Write the results page (means, 95% intervals, paired differences, claims) of the
    config's last run, from the transfer reports in its store."""
    cfg = load(config, set_)
    from xlearner.transfer.results import results_from_store, results_markdown, write_results

    if preamble is not None and not preamble.is_file():
        typer.echo(f"--preamble {preamble}: no such file", err=True)
        raise typer.Exit(2)
    try:
        results = results_from_store(cfg.store.uri, cfg.name, cfg.store.endpoint_url)
    except ValueError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    head = preamble.read_text().rstrip() + "\n\n" if preamble is not None else ""
    seeds = " ".join(map(str, results["seeds"]))
    overrides = "".join(f" --set '{value}'" for value in set_ or [])
    head += (
        f"Written by `xlearner report -c {config}{overrides} --out {out}` from the store "
        f"`{cfg.store.uri}` (seeds {seeds}).\n\n"
    )
    paths = write_results(results, out, preamble=head)
    typer.echo(results_markdown(results))
    typer.echo("written: " + ", ".join(str(p) for p in paths.values()))


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
