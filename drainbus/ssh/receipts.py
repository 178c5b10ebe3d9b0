"""Purge receipts at the SSH front door: ``pub --wait`` and ``sub --receipts``.

Both read the drain topic's receipts stream (written by the drain nodes, see
:mod:`drainbus.drain.receipts`) and print what each node did with each purge.
"""

from __future__ import annotations

import argparse
import json
from typing import cast

import anyio
from redis.exceptions import RedisError

from drainbus.bus.connection import backend_error
from drainbus.bus.fanout import TrimNotice
from drainbus.bus.streams import StreamId, rfc3339
from drainbus.drain.receipts import (
    ReceiptWait,
    answered_by,
    live_drain_nodes,
    receipts_topic,
    render_line,
)
from drainbus.errors import ExitCode, UsageError
from drainbus.ssh.context import SessionContext
from drainbus.terminal import escape_controls, json_safe

__all__ = ["follow_receipts", "wait_for_receipts"]

_RECEIPT_SLACK_MS = 5000  # pub --wait reads receipts from this long before its first purge


async def wait_for_receipts(
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


async def follow_receipts(
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
