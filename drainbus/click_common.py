"""What the local command groups share: ``--config``, loading settings, failing in one line.

Every failure a person can cause or fix ends as one line on stderr and a sysexits code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from drainbus.config import Settings, load_settings
from drainbus.errors import ConfigError, DrainbusError

__all__ = ["config_option", "fail", "load_cli_settings"]


def fail(exc: DrainbusError) -> NoReturn:
    """Print ``exc`` as one line on stderr and exit with its code."""
    click.echo(f"drainbus: {exc.message}", err=True)
    sys.exit(int(exc.exit_code))


def load_cli_settings(ctx: click.Context, config: str | None = None, **overrides: Any) -> Settings:
    """Load settings; a subcommand's ``--config`` beats the group's. A bad file exits 78."""
    if config:
        ctx.obj["config"] = config
    config = ctx.obj.get("config")
    try:
        return load_settings(Path(config) if config else None, overrides)
    except ConfigError as exc:
        fail(exc)


config_option = click.option(
    "--config",
    "config",
    envvar="DRAINBUS_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML config file (env DRAINBUS_CONFIG).",
)
