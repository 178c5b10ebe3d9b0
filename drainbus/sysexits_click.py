"""click commands and groups that exit 64 (EX_USAGE) on a usage error, not click's 2.

Every drainbus command line, local or over SSH, exits with sysexits(3) codes, so a script
treats ``drainbus serve --bogus``, ``drainbus pub --bogus`` and ``ssh bus pub --bogus`` alike.
"""

from __future__ import annotations

import click

from drainbus.errors import ExitCode

__all__ = ["SysexitsCommand", "SysexitsGroup"]


class _UsageError(click.UsageError):
    """click's usage error, shown the same, but exiting 64 (EX_USAGE) instead of 2."""

    exit_code = int(ExitCode.USAGE)

    def __init__(self, cause: click.UsageError) -> None:
        super().__init__(cause.message, cause.ctx)
        self.cause = cause

    def format_message(self) -> str:
        return self.cause.format_message()


class SysexitsCommand(click.Command):
    """A click command whose usage errors exit 64."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _UsageError(exc) from exc


class SysexitsGroup(click.Group):
    """A click group whose usage errors exit 64, as do its commands' and subgroups'."""

    command_class = SysexitsCommand
    group_class = type  # subgroups are SysexitsGroups too

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _UsageError(exc) from exc

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _UsageError(exc) from exc
