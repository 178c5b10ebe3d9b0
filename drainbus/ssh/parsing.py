"""argparse for commands that run inside an SSH session: errors are raised, never printed.

A session has no terminal of drainbus's own to print usage on, and must not exit the server
process: :class:`CommandParser` raises UsageError (exit 64) for bad arguments and
:class:`HelpRequested` for ``--help``, which the caller writes to the client.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from drainbus.errors import UsageError

__all__ = ["CommandParser", "HelpRequested"]


class HelpRequested(Exception):
    """``--help`` was given: ``text`` is the help to write to the client's stdout."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class CommandParser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting."""

    def __init__(self, prog: str, description: str, epilog: str) -> None:
        super().__init__(
            prog=prog,
            description=description,
            epilog=epilog,
            allow_abbrev=False,
            exit_on_error=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def print_help(self, file: object = None) -> None:
        raise HelpRequested(self.format_help())

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or f"{self.prog}: invalid arguments")
