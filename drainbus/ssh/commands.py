"""The commands a user runs over SSH: pub, sub, ls, whoami, help.

Each command parses its arguments, checks access, does its work through the bus, and returns
an exit code (sysexits.h). Errors are raised as :mod:`drainbus.errors` exceptions and turned
into one line on stderr plus the matching exit code by :func:`run_command`.
"""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import cast

import anyio
import asyncssh
import structlog
from redis.exceptions import RedisError

from drainbus.acl import Access, check_topic_name
from drainbus.bus import Bus
from drainbus.bus.catalog import describe_topics, known_topics
from drainbus.bus.connection import backend_error
from drainbus.bus.fanout import Batch, TrimNotice
from drainbus.bus.limits import PublishRefused
from drainbus.bus.streams import StreamId, rfc3339
from drainbus.config import Settings, parse_duration
from drainbus.drain.receipts import (
    ReceiptWait,
    answered_by,
    live_drain_nodes,
    receipts_topic,
    render_line,
)
from drainbus.drain.status import drain_health
from drainbus.errors import (
    BackendError,
    DataError,
    DrainbusError,
    ExitCode,
    NotDurable,
    PermissionDenied,
    UsageError,
)
from drainbus.identity import Identity
from drainbus.metrics import record_deliveries
from drainbus.publishing import publish_as
from drainbus.ssh.durable import DurableCursor, durable_cursor, durable_listing, durable_table
from drainbus.ssh.parsing import CommandParser, HelpRequested
from drainbus.ssh.since import Since, parse_since
from drainbus.terminal import escape_controls, json_safe

__all__ = ["COMMANDS", "LineCheck", "SessionContext", "parse_since", "run_command"]

log = structlog.get_logger(__name__)

Process = asyncssh.SSHServerProcess[bytes]
LineCheck = Callable[[Identity, bytes], None]
"""Validates one message for a topic; raises DataError or PermissionDenied to reject it."""

_BATCH_LINES = 2048  # messages per stored batch when a publisher sends a lot at once
_RECEIPT_SLACK_MS = 5000  # pub --wait reads receipts from this long before its first purge


@dataclass
class SessionContext:
    """What a command needs: who runs it, the process to talk to, and the node's services."""

    identity: Identity
    process: Process
    settings: Settings
    bus: Bus
    access: Access
    line_checks: dict[str, LineCheck] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    topic: str | None = None

    def stderr(self, text: str) -> None:
        """Write one line to the client's stderr."""
        self.process.stderr.write((text.rstrip("\n") + "\n").encode("utf-8", "replace"))

    def write(self, data: bytes) -> None:
        """Write to the client's stdout without waiting (the channel buffers what it must)."""
        self.process.stdout.write(data)
        self.bytes_out += len(data)

    async def stdout(self, data: bytes) -> None:
        """Write to the client's stdout and wait until the channel can take more."""
        self.write(data)
        await self.process.stdout.drain()


@dataclass(frozen=True)
class Command:
    """A command: its one-line summary, an example, its parser and what it does."""

    name: str
    summary: str
    example: str
    parser: CommandParser
    run: Callable[[SessionContext, argparse.Namespace], Awaitable[int]]


# --- pub ---------------------------------------------------------------------------------


async def _pub(ctx: SessionContext, args: argparse.Namespace) -> int:
    topic = check_topic_name(args.topic)
    ctx.topic = topic
    ctx.access.require(ctx.identity, "publish", topic)
    if args.raw and topic in ctx.line_checks:
        raise UsageError(f"pub --raw is not allowed on '{topic}': it takes one checked line each")
    wait = _wait_seconds(ctx, topic, args)
    publisher = _LinePublisher(ctx, topic, keep_ids=wait is not None)
    reader = ctx.process.stdin
    limit = ctx.settings.server.max_message_bytes
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        ctx.bytes_in += len(chunk)
        if args.raw:
            for start in range(0, len(chunk), limit):
                publisher.add_raw(chunk[start : start + limit])
        else:
            publisher.feed(chunk)
        await publisher.flush()
    publisher.finish()
    await publisher.flush()
    code = publisher.report()
    if wait is None or not publisher.stored:
        return code
    waited = await _wait_for_receipts(ctx, topic, publisher.stored, wait, as_json=args.json)
    return code or waited


def _wait_seconds(ctx: SessionContext, topic: str, args: argparse.Namespace) -> float | None:
    """``pub --wait[=DURATION]`` in seconds; None without it. Only the drain topic has receipts."""
    if args.wait is None:
        if args.json:
            raise UsageError("pub --json describes receipts: use it with --wait")
        return None
    if topic != ctx.settings.drain.topic:
        raise UsageError(
            f"pub --wait waits for purge receipts, which only '{ctx.settings.drain.topic}' has"
        )
    try:
        seconds = parse_duration(args.wait)
    except ValueError:
        raise UsageError(f"--wait={args.wait!r} is not a duration like 10s, 500ms or 1m") from None
    if seconds <= 0:
        raise UsageError("--wait must be a positive duration, like 10s")
    return seconds


async def _wait_for_receipts(
    ctx: SessionContext,
    topic: str,
    stored: list[tuple[StreamId, str]],
    seconds: float,
    *,
    as_json: bool,
) -> int:
    """Wait until every live drain node reported on every stored purge; print what each did.

    Returns 0 when all were carried out, 75 when one was dead-lettered or a node did not
    answer within ``timeout``, 69 when no drain node is live (nothing will carry them out).
    The purges stay stored whatever this returns: waiting changes what the publisher
    learns, never what the bus does.
    """
    bus = ctx.bus
    try:
        nodes = await live_drain_nodes(bus.redis, bus.keys)
    except (RedisError, OSError) as exc:
        raise backend_error(exc, "looking for live drain nodes") from exc
    if not nodes:
        ctx.stderr(
            f"drainbus: {len(stored)} purge(s) stored, but no drain node is live (none has "
            f"reported its status recently), so nothing is carrying them out; they will be "
            "carried out once a drain node starts"
        )
        return int(ExitCode.UNAVAILABLE)
    wait = ReceiptWait.for_purges(stored, nodes)
    # Receipts are appended after the purge, in the same Redis: start a little before the
    # first purge's id so clock steps between the two streams cannot hide one.
    after = (max(0, stored[0][0][0] - _RECEIPT_SLACK_MS), 0)
    with anyio.move_on_after(seconds):
        receipts = bus.fanout.follow(receipts_topic(topic), after)
        try:
            async for item in receipts:
                if isinstance(item, TrimNotice):
                    continue
                for entry in item.entries:
                    for message in entry.messages():
                        wait.add(json.loads(message))
                if wait.complete:
                    break
        finally:
            await receipts.aclose()
    lines = wait.report(as_json=as_json, waited=seconds)
    await ctx.stdout(_receipt_output(lines, as_json=as_json))
    return 0 if wait.ok else int(ExitCode.TEMPFAIL)


class _LinePublisher:
    """Splits stdin into lines, checks each, and stores valid ones in batches."""

    def __init__(self, ctx: SessionContext, topic: str, *, keep_ids: bool = False) -> None:
        self.ctx = ctx
        self.keep_ids = keep_ids
        self.stored: list[tuple[StreamId, str]] = []  # with keep_ids: (id, line) of each
        self.topic = topic
        self.check = ctx.line_checks.get(topic)
        self.limit = ctx.settings.server.max_message_bytes
        self.partial = bytearray()
        self.skipping = False  # inside a line already known to be too long
        self.line_number = 0
        self.pending: list[bytes] = []
        self.raw = False
        self.published = 0
        self.rejected = 0
        self.worst = ExitCode.OK
        self.refusal: PublishRefused | None = None  # over a limit: nothing more is stored

    def feed(self, chunk: bytes) -> None:
        if self.check is None and not self.skipping and self._feed_fast(chunk):
            return
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._extend(chunk[start:])
                return
            self._extend(chunk[start:end])
            self._end_line()
            start = end + 1

    def _feed_fast(self, chunk: bytes) -> bool:
        """Split a whole chunk at C speed when no line needs a closer look; else do nothing.

        The common case for bulk publishing (no check, no CR, no line over the limit); what
        it does is exactly what the line-by-line path below would do.
        """
        data = bytes(self.partial) + chunk if self.partial else chunk
        if b"\r\n" in data:
            return False
        lines = data.split(b"\n")
        if max(map(len, lines)) > self.limit:
            return False
        self.partial = bytearray(lines.pop())
        self.line_number += len(lines)
        self.pending += filter(None, lines)  # empty lines are skipped, but counted
        return True

    def _extend(self, piece: bytes) -> None:
        if self.skipping:
            return
        self.partial += piece
        if len(self.partial) > self.limit + 1:  # +1: a CR of a CRLF ending doesn't count
            self.skipping = True
            self.partial.clear()

    def _end_line(self) -> None:
        self.line_number += 1
        if self.skipping:
            self.skipping = False
            self._reject(DataError(f"line is longer than {self.limit} bytes (max_message_bytes)"))
            return
        line = bytes(self.partial.removesuffix(b"\r"))
        self.partial.clear()
        if not line:
            return
        if len(line) > self.limit:
            self._reject(DataError(f"line is longer than {self.limit} bytes (max_message_bytes)"))
            return
        if self.check is not None:
            try:
                self.check(self.ctx.identity, line)
            except (DataError, PermissionDenied) as exc:
                self._reject(exc)
                return
        self.pending.append(line)

    def _reject(self, exc: DrainbusError) -> None:
        self.rejected += 1
        self.worst = max(self.worst, exc.exit_code, key=_severity)
        self.ctx.stderr(f"line {self.line_number}: {exc.message}")

    def add_raw(self, data: bytes) -> None:
        self.raw = True
        self.pending.append(data)

    def finish(self) -> None:
        if self.partial or self.skipping:  # a final line without a newline still counts
            self._end_line()

    async def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:_BATCH_LINES], self.pending[_BATCH_LINES:]
            if self.refusal:  # the rest of stdin is refused unseen, and counted
                self.ctx.bus.publisher.refuse_more(self.refusal, len(batch))
                continue
            try:
                ids = await publish_as(
                    self.ctx.bus,
                    self.topic,
                    batch,
                    user=self.ctx.identity.user,
                    raw=self.raw,
                    pack=self.check is None,  # checked lines stay one entry each (the drain's unit)
                )
            except PublishRefused as exc:  # its first exc.stored lines were stored
                self.refusal, ids, batch = exc, exc.ids, batch[: exc.stored]
            except BackendError as exc:
                # Not durable: the server may hold (and subscribers may have seen) the batch,
                # but it would not survive a restart, so it does not count as stored.
                rest = "the rest are not" if isinstance(exc, NotDurable) else "none after"
                exc.message += (
                    f"; {self.published} message(s) of this session were stored before it, {rest}"
                )
                raise
            self.published += len(batch)
            if self.keep_ids:  # checked lines are never packed: one entry id per line
                self.stored += zip(ids, (m.decode("utf-8", "replace") for m in batch), strict=True)

    def report(self) -> int:
        if self.refusal:
            self.ctx.stderr(self.refusal.summary(self.published, self.refusal.refused))
            return int(ExitCode.TEMPFAIL)
        if self.rejected:
            self.ctx.stderr(
                f"drainbus: {self.published} message(s) published, {self.rejected} line(s) rejected"
            )
        return int(self.worst)


def _severity(code: ExitCode) -> int:
    """Which exit code wins when lines fail for different reasons: refusals over bad data."""
    return {ExitCode.OK: 0, ExitCode.DATAERR: 1, ExitCode.NOPERM: 2}.get(code, 3)


# --- sub ---------------------------------------------------------------------------------


async def _sub(ctx: SessionContext, args: argparse.Namespace) -> int:
    topic = check_topic_name(args.topic)
    ctx.topic = topic
    ctx.access.require(ctx.identity, "subscribe", topic)
    if args.count is not None and args.count < 1:
        raise UsageError("sub: --count must be a positive number")
    since = parse_since(args.since) if args.since else None
    async with durable_cursor(ctx, topic, args.durable, since, receipts=args.receipts) as cursor:
        if cursor is not None:  # resume where the last session's bytes reached the client
            since = parse_since(cursor.confirmed or "")
        return await _follow(ctx, topic, since, cursor, args)


async def _follow(ctx: SessionContext, topic: str, since: Since | None,
                  cursor: DurableCursor | None, args: argparse.Namespace) -> int:  # fmt: skip
    after, resume_inside = since or (None, None)
    if args.receipts:
        return await _sub_receipts(ctx, topic, after, args)
    remaining = args.count
    channel = ctx.process.stdout.channel
    if args.raw and args.json:
        raise UsageError("sub: --raw and --json are two different outputs; choose one")
    render = Batch.json_lines if args.json else Batch.raw if args.raw else Batch.plain

    def express(batch: Batch) -> bool:
        # Straight from the topic's reader (see drainbus.bus.fanout), which also counts it:
        # only a plain live batch, and only while the channel has nothing waiting, so
        # backpressure still applies. A durable sub records each batch: the slow way.
        if remaining is not None or resume_inside is not None or cursor is not None:
            return False
        if channel.is_closing() or channel.get_write_buffer_size():
            return False
        ctx.write(render(batch))
        return True

    fanout = ctx.bus.fanout
    fanout.count(topic, +1)
    try:
        stream = fanout.follow(topic, after, express=express)
        try:
            async for item in stream:
                if isinstance(item, TrimNotice):
                    ctx.stderr(item.message(topic))
                    continue
                batch: Batch | None = item
                if resume_inside is not None:
                    batch = item.skip_into(*resume_inside)
                    resume_inside = None
                if batch is None:
                    continue
                if remaining is not None:
                    batch = batch.first_messages(remaining)
                await ctx.stdout(render(batch))
                if cursor is not None:
                    cursor.sent(batch)
                record_deliveries(batch, sessions=1, messages=batch.messages)
                if remaining is not None:
                    remaining -= batch.messages
                    if remaining == 0:
                        return 0
        finally:
            await stream.aclose()
    finally:
        fanout.count(topic, -1)
    return 0


async def _sub_receipts(
    ctx: SessionContext, topic: str, after: StreamId | None, args: argparse.Namespace
) -> int:
    """``sub cache-drain --receipts``: what each drain node did with each purge, as it happens.

    One line per purge, node and target (``--json``: one object each, as ``pub --wait
    --json`` prints them, plus ``user`` and ``time``). ``--count`` counts those lines.
    """
    if topic != ctx.settings.drain.topic:
        raise UsageError(f"sub --receipts: only the drain topic '{ctx.settings.drain.topic}' "
                         "has receipts")  # fmt: skip
    if args.raw:
        raise UsageError("sub --receipts writes drainbus's own lines: --raw does not apply")
    remaining = args.count
    fanout = ctx.bus.fanout
    fanout.count(receipts_topic(topic), +1)
    stream = fanout.follow(receipts_topic(topic), after)
    try:
        async for item in stream:
            if isinstance(item, TrimNotice):
                ctx.stderr(item.message(topic + " receipts"))
                continue
            lines = []
            for entry in item.entries:
                for message in entry.messages():
                    lines += _receipt_lines(json.loads(message), entry.received_ms, args.json)
            if remaining is not None:
                lines = lines[:remaining]
                remaining -= len(lines)
            await ctx.stdout(_receipt_output(lines, as_json=args.json))
            if remaining == 0:
                return 0
    finally:
        await stream.aclose()
        fanout.count(receipts_topic(topic), -1)
    return 0


def _receipt_output(lines: list[str], *, as_json: bool) -> bytes:
    """Receipt lines as written to a terminal: they quote purge lines and targets' error
    text, so control characters are shown as escapes, as plain ``sub`` shows messages."""
    text = "".join(line + "\n" for line in lines)
    if as_json:
        return json_safe(text).encode()
    return escape_controls(text.encode("utf-8", "replace"))


def _receipt_lines(record: dict[str, object], received_ms: int, as_json: bool) -> list[str]:
    parts = cast(list[dict[str, object]], record.get("targets") or [])
    if as_json:
        node = answered_by(record)
        common = {"id": record.get("id"), "purge": record.get("purge"), "user": record.get("user"),
                  "node": node, "time": rfc3339(received_ms),
                  "refill": bool(record.get("refill"))}  # fmt: skip
        return [
            json.dumps({**common, **{k: part.get(k) for k in _RECEIPT_FIELDS}}) for part in parts
        ]
    head = f"{record.get('id')} {record.get('purge')} by {record.get('user')}"
    return [f"{head}: {render_line(record, part)}" for part in parts]


_RECEIPT_FIELDS = ("target", "result", "count", "ms", "error")


# --- ls, whoami, help --------------------------------------------------------------------


async def _ls(ctx: SessionContext, args: argparse.Namespace) -> int:
    bus = ctx.bus
    topics = [
        t
        for t in await known_topics(bus.redis, bus.keys)
        if t.startswith(args.prefix or "") and ctx.access.allows(ctx.identity, "subscribe", t)
    ]
    summaries = await describe_topics(bus.redis, bus.keys, topics, await bus.presence.subscribers())
    durables = await durable_listing(ctx, [s.topic for s in summaries])
    if args.json:
        await ctx.stdout(b"".join(json.dumps({**asdict(s), "durable": durables.get(s.topic, [])})
                                  .encode() + b"\n" for s in summaries))  # fmt: skip
        return 0
    rows = [("TOPIC", "ENTRIES", "LAST MESSAGE", "SUBSCRIBERS", "DEAD", "GROUPS")]
    for s in summaries:
        groups = ", ".join(
            f"{g.name} (lag {'?' if g.lag is None else g.lag}, pending {g.pending})"
            for g in s.groups
        )
        rows.append(
            (
                s.topic,
                str(s.entries),
                s.last_time or "-",
                str(s.subscribers),
                str(s.dead_letters),
                groups or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
        for r in rows
    ] + durable_table(durables)
    await ctx.stdout(("\n".join(lines) + "\n").encode())
    return 0


async def _whoami(ctx: SessionContext, args: argparse.Namespace) -> int:
    ident = ctx.identity
    admin = "yes" if ident.is_admin else "no"
    text = f"user: {ident.user}\nkey: {ident.fingerprint}\nadmin: {admin}\n"
    if args.json:
        text = json.dumps(asdict(ident)) + "\n"
    await ctx.stdout(text.encode())
    return 0


async def _stats(ctx: SessionContext, args: argparse.Namespace) -> int:
    if not ctx.identity.is_admin:
        raise PermissionDenied("stats is for admins (server.admins)", user=ctx.identity.user)
    health = await drain_health(ctx.bus.redis, ctx.bus.keys, ctx.settings.drain.topic)
    persistence = await ctx.bus.persistence.refresh()
    if args.json:
        health["persistence"] = persistence.as_dict()
        await ctx.stdout(json.dumps(health).encode() + b"\n")
        return 0
    lines = [
        f"persistence: {persistence.summary()}",
        f"topic {health['topic']}: {health['messages']} message(s), last "
        f"{health['last_message'] or '-'}, dead letters {health['dead_letters']}",
        "",
        "GROUP                LAG    PENDING  CONSUMERS",
    ]
    for g in health["groups"]:
        lag = "?" if g["lag"] is None else str(g["lag"])
        lines.append(f"{g['group']:<20} {lag:<6} {g['pending']:<8} {g['consumers']}")
    lines += ["", "NODE         LAST PURGE                PURGES  DEAD  LAST ERROR"]
    for node in health["nodes"]:
        lines.append(
            f"{node['node']:<12} {node['last_purge'] or '-':<25} {node['purges_done']:<7} "
            f"{node['dead_lettered']:<5} {node['last_error'] or '-'}"
        )
        for target, figures in node["targets"].items():
            shown = ", ".join(f"{k} {v}" for k, v in figures.items() if v not in (None, {}))
            lines.append(f"  {target}: {shown}")
    if not health["nodes"]:
        lines.append("(no drain node has reported in the last 2 minutes)")
    await ctx.stdout(("\n".join(lines) + "\n").encode())
    return 0


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
        _pub,
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
        _sub,
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
        _ls,
    )
    ls.parser.add_argument("prefix", nargs="?", help="only topics starting with PREFIX")
    ls.parser.add_argument("--json", action="store_true", help="one JSON object per topic")

    whoami = _command(
        "whoami",
        "show your user name, key fingerprint and whether you are admin",
        "ssh bus whoami",
        _whoami,
    )
    whoami.parser.add_argument("--json", action="store_true")

    stats = _command("stats", "is the drain healthy? lag, pending, dead letters, per node "
                     "(admins)", "ssh bus stats --json", _stats)  # fmt: skip
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
