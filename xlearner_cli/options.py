"""What the commands share: the config options and how a config error ends a command."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from xlearner.config import ConfigError, PipelineConfig, load_config

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="pipeline config YAML")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override: key.path=value (repeatable)")
]


@contextmanager
def config_errors() -> Iterator[None]:
    """A :class:`ConfigError` inside ends the command: its message, exit code 2."""
    try:
        yield
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None


def load(config: Path, overrides: list[str] | None) -> PipelineConfig:
    with config_errors():
        return load_config(config, overrides or [])
