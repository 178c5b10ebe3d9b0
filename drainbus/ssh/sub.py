"""The ``sub`` command: a topic's messages written to the client as they arrive.

``--since`` replays history first, ``--durable`` resumes where the last session with that
name stopped (:mod:`drainbus.ssh.durable`), ``--receipts`` follows the drain's purge
receipts instead (:mod:`drainbus.ssh.receipts`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from drainbus.acl import check_topic_name
from drainbus.bus.fanout import Batch, TrimNotice
from drainbus.bus.streams import StreamId
from drainbus.errors import UsageError
from drainbus.metrics import record_deliveries
from drainbus.ssh.context import SessionContext
from drainbus.ssh.durable import DurableCursor, durable_cursor
from drainbus.ssh.receipts import follow_receipts
from drainbus.ssh.since import Since, parse_since

__all__ = ["run_sub"]


async def run_sub(ctx: SessionContext, args: argparse.Namespace) -> int:
    """``sub TOPIC``: follow the topic until the client leaves or ``--count`` is reached."""
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
        return await follow_receipts(ctx, topic, after, args)
    if args.raw and args.json:
        raise UsageError("sub: --raw and --json are two different outputs; choose one")
    render = Batch.json_lines if args.json else Batch.raw if args.raw else Batch.plain
    delivery = _Delivery(ctx, topic, render, cursor, args.count, resume_inside)
    fanout = ctx.bus.fanout
    fanout.count(topic, +1)
    try:
        stream = fanout.follow(topic, after, express=delivery.express)
        try:
            async for item in stream:
                if await delivery.deliver(item):
                    return 0
        finally:
            await stream.aclose()
    finally:
        fanout.count(topic, -1)
    return 0


@dataclass
class _Delivery:
    """How one ``sub`` session writes what the topic's reader gives it, and what is left.

    ``remaining``: messages still to write under ``--count`` (None: no limit);
    ``resume_inside``: where to start inside the first batch (None once it is written).
    """

    ctx: SessionContext
    topic: str
    render: Callable[[Batch], bytes]
    cursor: DurableCursor | None
    remaining: int | None
    resume_inside: tuple[StreamId, int] | None

    def __post_init__(self) -> None:
        self.channel = self.ctx.process.stdout.channel  # looked up once: express is hot

    def express(self, batch: Batch) -> bool:
        """Write a live batch straight from the topic's reader (see drainbus.bus.fanout),
        which also counts it; False leaves it to :meth:`deliver`, the slow way.

        Only a plain live batch, and only while the channel has nothing waiting, so
        backpressure still applies. A durable sub records each batch: the slow way.
        """
        if self.remaining is not None or self.resume_inside is not None or self.cursor is not None:
            return False
        if self.channel.is_closing() or self.channel.get_write_buffer_size():
            return False
        self.ctx.write(self.render(batch))
        return True

    async def deliver(self, item: Batch | TrimNotice) -> bool:
        """Write one item the reader yielded; True once ``--count`` messages were written."""
        if isinstance(item, TrimNotice):
            self.ctx.stderr(item.message(self.topic))
            return False
        batch: Batch | None = item
        if self.resume_inside is not None:
            batch = item.skip_into(*self.resume_inside)
            self.resume_inside = None
        if batch is None:
            return False
        if self.remaining is not None:
            batch = batch.first_messages(self.remaining)
        await self.ctx.stdout(self.render(batch))
        if self.cursor is not None:
            self.cursor.sent(batch)
        record_deliveries(batch, sessions=1, messages=batch.messages)
        if self.remaining is None:
            return False
        self.remaining -= batch.messages
        return self.remaining == 0
