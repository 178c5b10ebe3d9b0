"""The ``pub`` command: stdin split into lines, each checked, stored in batches.

With ``--wait`` it then waits for the drain nodes' receipts (:mod:`drainbus.ssh.receipts`).
"""

from __future__ import annotations

import argparse
import time

from drainbus.acl import check_topic_name
from drainbus.bus.limits import PublishRefused
from drainbus.bus.streams import StreamId
from drainbus.config import parse_duration
from drainbus.errors import (
    BackendError,
    DataError,
    DrainbusError,
    ExitCode,
    NotDurable,
    PermissionDenied,
    UsageError,
)
from drainbus.publishing import publish_as
from drainbus.ssh.context import SessionContext
from drainbus.ssh.receipts import wait_for_receipts

__all__ = ["LinePublisher", "run_pub"]

# Seconds between durability checks while a session publishes (see LinePublisher.confirm).
_CONFIRM_EVERY = 0.1
_BATCH_LINES = 2048  # messages per stored batch when a publisher sends a lot at once


async def run_pub(ctx: SessionContext, args: argparse.Namespace) -> int:
    """``pub TOPIC``: publish each line of stdin (``--raw``: each chunk); return the exit code."""
    topic = check_topic_name(args.topic)
    ctx.topic = topic
    ctx.access.require(ctx.identity, "publish", topic)
    if args.raw and topic in ctx.line_checks:
        raise UsageError(f"pub --raw is not allowed on '{topic}': it takes one checked line each")
    wait = _wait_seconds(ctx, topic, args)
    publisher = LinePublisher(ctx, topic, keep_ids=wait is not None)
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
    await publisher.confirm()
    code = publisher.report()
    if wait is None or not publisher.stored:
        return code
    waited = await wait_for_receipts(ctx, topic, publisher.stored, wait, as_json=args.json)
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


class LinePublisher:
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
        self.confirmed = 0  # of those, how many Redis is known to have made durable
        self._confirmed_at = time.monotonic()
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
                    confirm=False,  # below, now and then: not a round trip per line
                )
            except PublishRefused as exc:  # its first exc.stored lines were stored
                self.refusal, ids, batch = exc, exc.ids, batch[: exc.stored]
            except BackendError as exc:
                # Not durable: the server may hold (and subscribers may have seen) the batch,
                # but it would not survive a restart, so it does not count as stored.
                rest = "the rest are not" if isinstance(exc, NotDurable) else "none after"
                exc.message += (
                    f"; {self.confirmed} message(s) of this session were stored before it, {rest}"
                )
                raise
            self.published += len(batch)
            if self.keep_ids:  # checked lines are never packed: one entry id per line
                self.stored += zip(ids, (m.decode("utf-8", "replace") for m in batch), strict=True)
            if time.monotonic() - self._confirmed_at >= _CONFIRM_EVERY:
                await self.confirm()

    async def confirm(self) -> None:
        """Make sure what this session published is durable (see Publisher.confirm): now and
        then while lines come, and before the session says anything was stored. A line-by-line
        publisher (a script writing one purge at a time) then pays one round trip per
        ``_CONFIRM_EVERY``, not one per line; what it is told was stored is always confirmed."""
        if self.published > self.confirmed:
            try:
                await self.ctx.bus.publisher.confirm(self.topic)
            except BackendError as exc:
                exc.message += (
                    f"; {self.confirmed} message(s) of this session were stored before it, "
                    "the rest are not"
                )
                raise
            self.confirmed = self.published
        self._confirmed_at = time.monotonic()

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
