"""Redis key names and the stream operations the bus is made of.

Every key of one topic carries the topic in a hash tag (``drainbus:{TOPIC}:stream``) so that
all of them land in one Redis Cluster slot. Each stream entry holds:

====  =====================================================================
d     the message bytes; for a packed entry, its messages joined by ``\n``
n     how many messages a packed entry holds (absent: one)
u     the authenticated publisher
m     an entry id (hex), the same across retries: consumers drop repeats
t     the time the bus received it, in ms since the epoch
r     ``1`` for a ``pub --raw`` chunk (written to subscribers as-is)
====  =====================================================================

A burst of lines read from one ``pub`` is *packed* into one entry rather than one entry per
line: a subscriber writes the entry out unchanged, so the per-message cost on both sides is a
slice of one bytes object instead of a Redis command and a reply. A message inside a packed
entry is addressed as ``ENTRY-ID:INDEX`` (``sub --json`` shows it; ``sub --since`` takes it).
Topics whose lines are checked one by one (``cache-drain``) are never packed, so the drain
acknowledges, retries and dead-letters each purge on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TypeAlias, cast

from redis.typing import EncodableT, FieldT

from drainbus.bus.connection import RedisClient

__all__ = [
    "MAX_SEQ",
    "Entry",
    "Keys",
    "StreamId",
    "StreamInfo",
    "format_id",
    "parse_id",
]

StreamId: TypeAlias = tuple[int, int]
MAX_SEQ = 2**64 - 1
ZERO_ID: StreamId = (0, 0)


def parse_id(raw: bytes | str) -> StreamId:
    """``b"1700000000000-3"`` -> ``(1700000000000, 3)``; a bare ``ms`` means ``ms-0``."""
    ms, _, seq = text(raw).partition("-")  # (one "-" in an id: rpartition would split it alike)
    return int(ms), int(seq or 0)


def text(value: bytes | str) -> str:
    """A Redis reply value as str (replies are bytes: the clients don't decode)."""
    return value.decode() if isinstance(value, bytes) else value


def format_id(stream_id: StreamId) -> str:
    """``(ms, seq)`` -> ``"ms-seq"``."""
    return f"{stream_id[0]}-{stream_id[1]}"


def rfc3339(ms: int) -> str:
    """Milliseconds since the epoch as an RFC 3339 UTC time with millisecond precision."""
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class Keys:
    """Every Redis key name drainbus uses, in one place."""

    def __init__(self, namespace: str = "drainbus") -> None:
        self.namespace = namespace
        self.topics = f"{namespace}:topics"
        self.nodes = f"{namespace}:nodes"

    def stream(self, topic: str) -> str:
        """The stream holding ``topic``'s messages."""
        return f"{self.namespace}:{{{topic}}}:stream"

    def stream_bytes(self, topic: str) -> str:
        """How many bytes ``topic``'s stream has taken in, ever (see drainbus.bus.limits)."""
        return f"{self.namespace}:{{{topic}}}:bytes"

    def purge_bucket(self, topic: str, user: str) -> str:
        """``user``'s token bucket for publishing to ``topic`` (the drain topic's rate limit)."""
        return f"{self.namespace}:{{{topic}}}:rate:{user.casefold()}"

    def usage(self, owner: str) -> str:
        """Hash topic -> bytes stored of the topics ``owner`` owns (their storage quota)."""
        return f"{self.namespace}:{{{owner}}}:usage"

    def dead_letters(self, topic: str) -> str:
        """The stream holding ``topic``'s entries that consumers gave up on."""
        return f"{self.namespace}:{{{topic}}}:dead"

    def durable(self, topic: str, user: str, name: str) -> str:
        """Where ``user``'s ``sub --durable NAME`` on ``topic`` left off (bus/durable.py)."""
        return f"{self.namespace}:{{{topic}}}:durable:{user}:{name}"

    def durables(self, topic: str) -> str:
        """Sorted set of ``USER:NAME`` durable positions on ``topic``, scored by last use."""
        return f"{self.namespace}:{{{topic}}}:durables"

    def drain_status(self, node: str) -> str:
        """JSON status of ``node``'s drain, refreshed while it runs (for ``stats``)."""
        return f"{self.namespace}:drain:{node}:status"

    @property
    def drain_nodes(self) -> str:
        """Sorted set of drain nodes scored by their last status refresh (ms)."""
        return f"{self.namespace}:drain-nodes"

    def node_subscribers(self, node: str) -> str:
        """A hash topic -> live subscriber count on ``node`` (expires if the node dies)."""
        return f"{self.namespace}:node:{node}:subscribers"


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry, decoded: one message, or ``count`` packed ones.

    A packed entry cut short (``sub --count``, ``--since ID:INDEX``) remembers where its first
    message sat in the stored entry (``offset``), so every message keeps its ``ID:INDEX``.
    """

    id: StreamId
    data: bytes
    user: str
    message_id: str
    received_ms: int
    raw: bool
    count: int = 1
    packed: bool = False
    offset: int = 0

    def messages(self) -> list[bytes]:
        """The messages this entry holds, in order."""
        return self.data.split(b"\n") if self.count > 1 else [self.data]

    def message_ids(self) -> list[str]:
        """What ``sub --json`` calls each message: the entry id, ``:INDEX`` if packed."""
        if not self.packed:
            return [format_id(self.id)]
        return [f"{format_id(self.id)}:{i}" for i in range(self.offset, self.offset + self.count)]

    def first(self, n: int) -> Entry:
        """This entry with only its first ``n`` messages."""
        return self if n >= self.count else self._with(self.messages()[:n], self.offset)

    def without_first(self, n: int) -> Entry | None:
        """This entry without its first ``n`` messages; None if nothing is left."""
        if n <= 0:
            return self
        if n >= self.count:
            return None
        return self._with(self.messages()[n:], self.offset + n)

    def _with(self, messages: list[bytes], offset: int) -> Entry:
        return replace(self, data=b"\n".join(messages), count=len(messages), offset=offset)

    @classmethod
    def from_redis(cls, raw_id: bytes, fields: dict[bytes, bytes]) -> Entry:
        """Decode an entry as redis-py returns it (bytes id, bytes field map)."""
        stream_id = parse_id(raw_id)
        count = int(fields.get(b"n", 1))
        # Codec names ignore case: "UTF-8" and "ASCII" below would be the same codecs.
        return cls(
            id=stream_id,
            data=fields.get(b"d", b""),
            user=fields.get(b"u", b"").decode("utf-8", "replace"),
            message_id=fields.get(b"m", b"").decode("ascii", "replace"),
            received_ms=int(fields.get(b"t", stream_id[0])),
            raw=fields.get(b"r") == b"1",
            count=count,
            packed=count > 1,
        )


def entry_fields(
    data: bytes, *, user: str, message_id: str, raw: bool, count: int = 1
) -> dict[FieldT, EncodableT]:
    """The field map XADD stores for one entry (``count`` packed messages in ``data``)."""
    fields: dict[FieldT, EncodableT] = {
        "d": data,
        "u": user,
        "m": message_id,
        "t": int(time.time() * 1000),
    }
    if count > 1:
        fields["n"] = count
    if raw:
        fields["r"] = "1"
    return fields


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What ``XINFO STREAM`` says about a topic, reduced to what drainbus uses."""

    length: int
    last_id: StreamId
    first_id: StreamId | None
    entries_added: int

    @property
    def was_trimmed(self) -> bool:
        """True if entries were ever removed (by MAXLEN/MINID trimming or XDEL)."""
        return self.entries_added > self.length


async def stream_info(redis: RedisClient, key: str) -> StreamInfo | None:
    """``XINFO STREAM`` for ``key``, or None if the stream does not exist."""
    if not await redis.exists(key):
        return None
    info = await redis.xinfo_stream(key)
    first = info.get("first-entry")
    return StreamInfo(
        length=int(info["length"]),
        last_id=parse_id(info["last-generated-id"]),
        first_id=parse_id(first[0]) if first else None,
        # entries-added is there from Redis 7 on (valkey too): the fallback serves older ones.
        entries_added=int(info.get("entries-added", info["length"])),
    )


Row: TypeAlias = tuple[bytes, dict[bytes, bytes]]
"""A stream entry as redis-py returns it: raw id and raw field map."""


async def read_rows(
    redis: RedisClient, key: str, *, min: str = "-", max: str = "+", count: int | None = None
) -> list[Row]:
    """``XRANGE key min max [COUNT count]``, typed."""
    return cast(list[Row], await redis.xrange(key, min=min, max=max, count=count))  # cast: no-op


async def read_after(redis: RedisClient, key: str, after: StreamId, count: int) -> list[Entry]:
    """Up to ``count`` entries with ids strictly greater than ``after``, oldest first."""
    # "(0-0" would read the same as "-": no entry can have the id 0-0.
    start = "(" + format_id(after) if after != ZERO_ID else "-"
    rows = await read_rows(redis, key, min=start, count=count)
    return [Entry.from_redis(raw_id, fields) for raw_id, fields in rows]
