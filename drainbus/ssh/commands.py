"""The commands a user runs over SSH: the command table, ``help``, and dispatch.

Each command parses its arguments, checks access, does its work through the bus, and returns
an exit code (sysexits.h). Errors are raised as :mod:`drainbus.errors` exceptions and turned
into one line on stderr plus the matching exit code by :func:`run_command`. The commands
themselves live in :mod:`drainbus.ssh.pub`, :mod:`drainbus.ssh.sub` and
:mod:`drainbus.ssh.info`.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from drainbus.errors import DrainbusError, UsageError
from drainbus.ssh.context import LineCheck, SessionContext
from drainbus.ssh.info import run_ls, run_stats, run_whoami
from drainbus.ssh.parsing import CommandParser, HelpRequested
from drainbus.ssh.pub import run_pub
from drainbus.ssh.since import parse_since
from drainbus.ssh.sub import run_sub

__all__ = ["COMMANDS", "LineCheck", "SessionContext", "parse_since", "run_command"]


@dataclass(frozen=True)
class Command:
    """A command: its one-line summary, an example, its parser and what it does."""

    name: str
    summary: str
    example: str
    parser: CommandParser
    run: Callable[[SessionContext, argparse.Namespace], Awaitable[int]]


async def _help(ctx: SessionContext, args: argparse.Namespace) -> int:
    await ctx.stdout(help_text().encode())
    return 0


def help_text() -> str:
    """The command list with a one-line description and an example for each."""
    lines = ["drainbus: authenticated pub/sub over SSH", "", "commands:"]
    for command in COMMANDS.values():
        lines.append(f"  {command.name:<8} {command.summary}")
        lines.append(f"  {'':<8}   e.g. {command.example}")
    lines += [
        "",
        "Run 'ssh bus COMMAND --help' for a command's options.",
        "Exit codes: 0 ok, 64 usage, 65 bad data, 69 backend unavailable, 75 try later, "
        "77 permission denied.",
    ]
    return "\n".join(lines) + "\n"


def _command(
    name: str,
    summary: str,
    example: str,
    run: Callable[[SessionContext, argparse.Namespace], Awaitable[int]],
) -> Command:
    parser = CommandParser(f"ssh bus {name}", summary, f"example:\n  {example}")
    return Command(name, summary, example, parser, run)


def _build_commands() -> dict[str, Command]:
    pub = _command(
        "pub",
        "publish each line of stdin as one message",
        "echo acme-blog | ssh bus pub cache-drain",
        run_pub,
    )
    pub.parser.add_argument("topic", help="topic name, e.g. cache-drain or alice/deploys")
    pub.parser.add_argument(
        "--raw",
        action="store_true",
        help="send stdin in chunks as-is (binary-safe), not line by line",
    )
    pub.parser.add_argument(
        "--wait",
        nargs="?",
        const="10s",
        metavar="DURATION",
        help="cache-drain: then wait (default 10s) until every live drain node carried out "
        "each purge, print what each target did, exit 0 (all done), 75 (dead-lettered or no "
        "answer in time) or 69 (no drain node is live)",
    )
    pub.parser.add_argument(
        "--json", action="store_true", help="with --wait: one JSON object per node and target"
    )

    sub = _command(
        "sub",
        "write the topic's messages to stdout as they arrive",
        "ssh bus sub cache-drain --since 10m --json",
        run_sub,
    )
    sub.parser.add_argument("topic")
    sub.parser.add_argument(
        "--since",
        metavar="POS",
        help="replay from POS first: a stream id, a duration (30s, 10m, "
        "2h, 7d), an RFC 3339 time, or 'all'",
    )
    sub.parser.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    sub.parser.add_argument("--durable", metavar="NAME", help="resume where your last 'sub "
                            "--durable NAME' here stopped; drop repeats by --json id")  # fmt: skip
    sub.parser.add_argument(
        "--json", action="store_true", help="one JSON object per line: id, time, topic, user, data"
    )
    sub.parser.add_argument(
        "--raw",
        action="store_true",
        help="write messages as stored, control characters included (without it they show "
        "as escapes: ESC as \\e, others as \\xNN)",
    )
    sub.parser.add_argument(
        "--receipts",
        action="store_true",
        help="cache-drain: follow the purge receipts instead (what each drain node did with "
        "each purge), one line per purge, node and target",
    )

    ls = _command(
        "ls",
        "list the topics you may read: size, last message, subscribers, groups",
        "ssh bus ls cache --json",
        run_ls,
    )
    ls.parser.add_argument("prefix", nargs="?", help="only topics starting with PREFIX")
    ls.parser.add_argument("--json", action="store_true", help="one JSON object per topic")

    whoami = _command(
        "whoami",
        "show your user name, key fingerprint and whether you are admin",
        "ssh bus whoami",
        run_whoami,
    )
    whoami.parser.add_argument("--json", action="store_true")

    stats = _command("stats", "is the drain healthy? lag, pending, dead letters, per node "
                     "(admins)", "ssh bus stats --json", run_stats)  # fmt: skip
    stats.parser.add_argument("--json", action="store_true")

    help_ = _command("help", "show this list", "ssh bus help", _help)
    return {c.name: c for c in (pub, sub, ls, whoami, stats, help_)}


COMMANDS = _build_commands()


def command_label(command_line: str | None) -> str:
    """The command's name for metrics: a known command, ``(none)`` or ``other``."""
    name = (command_line or "").split(" ", 1)[0]
    if not name:
        return "(none)"
    return name if name in COMMANDS else "other"


def _lookup(name: str) -> Command:
    command = COMMANDS.get(name)
    if command is None:
        shown = name if name.isprintable() else repr(name)
        raise UsageError(f"unknown command '{shown}'")
    return command


async def run_command(ctx: SessionContext, command_line: str | None) -> int:
    """Parse and run one SSH command line; return its exit code. Never raises DrainbusError."""
    try:
        try:
            argv = shlex.split(command_line or "")
        except ValueError as exc:
            raise UsageError(f"cannot parse the command line: {exc}") from None
        if not argv:
            await _help(ctx, argparse.Namespace())
            return 0
        command = _lookup(argv[0])
        try:
            args = command.parser.parse_args(argv[1:])
        except argparse.ArgumentError as exc:
            raise UsageError(f"{command.parser.prog}: {exc}") from None
        return await command.run(ctx, args)
    except HelpRequested as shown:
        await ctx.stdout(shown.text.encode())
        return 0
    except UsageError as exc:
        ctx.stderr(f"drainbus: {exc.message} (run 'ssh bus help' for usage)")
        return int(exc.exit_code)
    except DrainbusError as exc:
        ctx.stderr(f"drainbus: {exc.message}")
        return int(exc.exit_code)
