"""Durable subscriber positions: where ``sub TOPIC --durable NAME`` left off, kept in Redis.

A position is the id of the last message the subscriber was sent, as ``sub --json`` shows it
(``ENTRY-ID`` or ``ENTRY-ID:INDEX`` inside a packed entry), so resuming is a ``sub --since``
from it. It lives in Redis, not in the node, so a session on any node or worker resumes it.

One key per position (``drainbus:{TOPIC}:durable:USER:NAME``, in the topic's hash tag) with a
time to live of ``topics.retention``, renewed on every save: a position nobody used for that
long expires, as the history it pointed into would have. A sorted set per topic indexes the
positions for ``ls``; members whose key expired are dropped from it when it is read.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import cast

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Keys, format_id, parse_id, rfc3339, stream_info, text
from drainbus.errors import DataError

__all__ = ["LAG_CAP", "DurablePosition", "DurableStore", "check_durable_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
LAG_CAP = 1000  # ls counts entries behind a position up to this many (XRANGE reads them)


def check_durable_name(name: str) -> str:
    """``name`` if it can name a durable position; DataError (65) saying what is allowed."""
    if not _NAME.match(name):
        shown = name if name.isprintable() else repr(name)
        raise DataError(
            f"durable name '{shown}' is invalid: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class DurablePosition:
    """One ``ls`` row about a durable position of the user's."""

    topic: str
    name: str
    position: str  # the last message sent, as sub --json names it
    time: str  # when that message was received by the bus (RFC 3339)
    lag: int | None  # entries stored after it (None: over the cap, shown as cap+)
    last_used: str  # when the position was last saved


class DurableStore:
    """Reads and writes durable positions; ``ttl`` seconds is how long an unused one lives."""

    def __init__(self, redis: RedisClient, keys: Keys, ttl: float) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_ms = max(1, int(ttl * 1000))

    def _key(self, topic: str, user: str, name: str) -> str:
        return self._keys.durable(topic, user, name)

    async def load(self, topic: str, user: str, name: str) -> str | None:
        """The saved position, or None if there is none (never saved, or expired)."""
        raw = await self._redis.get(self._key(topic, user, name))
        return None if raw is None else text(raw)

    async def save(self, topic: str, user: str, name: str, position: str) -> None:
        """Store ``position`` and renew the time to live of the position and the index."""
        now = int(time.time() * 1000)
        index = self._keys.durables(topic)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(topic, user, name), position, px=self._ttl_ms)
            pipe.zadd(index, {f"{user}:{name}": now})
            pipe.pexpire(index, self._ttl_ms)
            await pipe.execute()

    async def describe(self, topic: str, user: str) -> list[DurablePosition]:
        """``user``'s positions on ``topic`` with their lag, by name."""
        index = self._keys.durables(topic)
        members = cast(
            list[tuple[bytes, float]], await self._redis.zrange(index, 0, -1, withscores=True)
        )
        rows = []
        for member, score in sorted((text(m), s) for m, s in members):
            owner, _, name = member.partition(":")
            if owner != user:
                continue
            position = await self.load(topic, user, name)
            if position is None:  # expired: the index forgets it too
                await self._redis.zrem(index, member)
                continue
            rows.append(
                DurablePosition(
                    topic=topic,
                    name=name,
                    position=position,
                    time=rfc3339(parse_id(position.partition(":")[0])[0]),
                    lag=await self._lag(topic, position),
                    last_used=rfc3339(int(score)),
                )
            )
        return rows

    async def _lag(self, topic: str, position: str) -> int | None:
        """Entries stored after ``position``'s entry, counted up to LAG_CAP."""
        key = self._keys.stream(topic)
        info = await stream_info(self._redis, key)
        entry = parse_id(position.partition(":")[0])
        if info is None or info.last_id <= entry:
            return 0
        after = f"({format_id(entry)}"
        rows = await self._redis.xrange(key, min=after, max="+", count=LAG_CAP + 1)
        behind = len(rows or [])
        return None if behind > LAG_CAP else behind
