"""What the drain asks Redis about its consumer groups: gaps, idle entries, deliveries, status.

Each function is one question (or one report) on the topic's stream and a group on it, so
:mod:`drainbus.drain.daemon` reads as what it does with the answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Keys, Row, parse_id, stream_info, text

__all__ = [
    "claim_idle",
    "deliveries",
    "group_counts",
    "own_pending",
    "publish_status",
    "trimmed_unread",
]


async def trimmed_unread(redis: RedisClient, stream: str, group: str) -> bool:
    """True if entries ``group`` never read were trimmed away (its node was down too long)."""
    info = await stream_info(redis, stream)
    groups = await redis.xinfo_groups(stream)
    mine = next((g for g in groups if text(g["name"]) == group), None)
    if info is None or mine is None or not info.was_trimmed:
        return False
    entries_read = mine.get("entries-read")
    if entries_read is None:
        # Redis lost count (entries were deleted in the middle): decide by position.
        last_read = parse_id(mine["last-delivered-id"])
        return info.first_id is not None and last_read < info.first_id
    # Every entry ever added was either read by this group, is still in the stream, or
    # was trimmed before this group read it: the last kind are missed purges.
    return info.entries_added - int(entries_read) - info.length > 0


async def claim_idle(
    redis: RedisClient, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int
) -> AsyncIterator[tuple[list[Row], int]]:
    """Claim, page by page, the entries idle for ``min_idle_ms`` (failed here, or on a dead
    consumer): yields (the claimed entries, how many pending ones were trimmed meanwhile).
    The caller may stop early (a full backlog): the rest is claimed on a later round."""
    cursor = "0-0"
    while True:
        reply = await redis.xautoclaim(
            stream, group, consumer, min_idle_ms, start_id=cursor, count=count
        )
        cursor = text(reply[0])
        # Redis 6.2 answers a trimmed entry as nil, and no third element; 7 (and valkey)
        # drops such entries and lists them in a third element, always there. (cast: no-op)
        rows = cast(list[Row], [r for r in reply[1] if r and r[1] is not None])
        lost = len(reply[2]) if len(reply) > 2 and reply[2] else 0
        yield rows, lost
        if cursor == "0-0":
            return


async def deliveries(
    redis: RedisClient, stream: str, group: str, ids: Sequence[bytes]
) -> dict[Any, int]:
    """How many times each of ``ids`` was delivered in ``group``."""
    # One XPENDING per id: in a shared group other consumers' entries lie between ours,
    # so a range query could stop short of some of them. (A range of one id holds one
    # entry whatever the count; a transaction would answer the same, at a MULTI's cost.)
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in ids:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        replies = await pipe.execute()
    return {p["message_id"]: int(p["times_delivered"]) for r in replies for p in r}


async def group_counts(redis: RedisClient, stream: str) -> dict[str, tuple[int | None, int]]:
    """Each group's (lag, pending) on ``stream``."""
    groups = await redis.xinfo_groups(stream)
    return {
        text(g["name"]): (None if g.get("lag") is None else int(g["lag"]), int(g["pending"]))
        for g in groups
    }


async def publish_status(
    redis: RedisClient, keys: Keys, node: str, status: Mapping[str, Any], *, ttl: float
) -> None:
    """Share ``node``'s status for ``ssh bus stats``, and mark the node live for ``ttl``
    seconds (``pub --wait`` counts the live nodes)."""
    ttl_ms = int(ttl * 1000)
    now_ms = int(time.time() * 1000)
    await redis.set(keys.drain_status(node), json.dumps(status, default=str), px=ttl_ms)
    await redis.zadd(keys.drain_nodes, {node: now_ms})
    await redis.zremrangebyscore(keys.drain_nodes, "-inf", now_ms - ttl_ms)  # "-INF" alike


async def own_pending(
    redis: RedisClient, stream: str, group: str, consumer: str, count: int
) -> AsyncIterator[tuple[list[Row], list[bytes]]]:
    """The entries delivered to ``consumer`` and never acknowledged (after a crash), page by
    page: yields (the entries, the ids of those trimmed from the stream since)."""
    position = "0"
    while True:
        reply: Any = await redis.xreadgroup(group, consumer, {stream: position}, count=count)
        # (Pending entries are answered [[stream, []]] when there are none: `reply` is never
        # empty here, the test is for safety. cast: no-op.)
        entries = cast(list[tuple[bytes, dict[bytes, bytes] | None]], reply[0][1] if reply else [])
        if not entries:
            return
        # Entries trimmed since come back with no fields (redis-py gives {}, or None): skip
        # them, keep paging.
        position = text(entries[-1][0])
        rows: list[Row] = [(i, f) for i, f in entries if f]
        yield rows, [i for i, f in entries if not f]
