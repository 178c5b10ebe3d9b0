"""Appending messages to a topic's stream.

A batch of messages is stored whole or not at all (one XADD, or one script of several), so
after a failure the publisher can say exactly how many messages were stored. With ``pack``,
lines share entries of up to ``ENTRY_BYTES`` (see :mod:`drainbus.bus.streams`). Each XADD trims the
stream approximately to ``max_len``; time retention (``XTRIM MINID``) runs at most once per
``_RETENTION_EVERY`` seconds per topic, which is plenty for a retention measured in hours.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from drainbus.bus.connection import RedisClient, backend_error
from drainbus.bus.persistence import Persistence, is_misconf
from drainbus.bus.streams import Keys, StreamId, entry_fields, parse_id
from drainbus.values import Durability

__all__ = ["APPEND_ENTRIES", "Publisher", "append_args"]

log = structlog.get_logger(__name__)

_RETENTION_EVERY = 30.0
ENTRY_BYTES = 64 * 1024
"""How much a packed entry holds (a single longer message gets an entry of its own)."""

# Appends a batch of entries in one command, atomically like MULTI/EXEC of the XADDs. One
# command matters on Redis Cluster, where redis-py runs a transaction one command per round
# trip: 1,000 entries took 238 ms that way and take 13 ms so (12 vs 16 ms on one server).
# KEYS[1]: the stream. ARGV[1]: MAXLEN (approximate). Then per entry: how many fields, then
# field, value, field, value, ... Returns the new entries' ids in order.
APPEND_ENTRIES = """
local ids = {}
local i = 2
while i <= #ARGV do
  local fields = tonumber(ARGV[i])
  local xadd = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*'}
  for f = i + 1, i + 2 * fields do
    xadd[#xadd + 1] = ARGV[f]
  end
  ids[#ids + 1] = redis.call(unpack(xadd))
  i = i + 2 * fields + 1
end
return ids
"""


def append_args(max_len: int, entries: Sequence[Mapping[FieldT, EncodableT]]) -> list[EncodableT]:
    """The ARGV of :data:`APPEND_ENTRIES` for ``entries`` (field maps, in order)."""
    args: list[EncodableT] = [max_len]
    for fields in entries:
        args.append(len(fields))
        for name, value in fields.items():
            args += [name, value]
    return args


def pack_messages(messages: Sequence[bytes]) -> list[list[bytes]]:
    """Group lines into runs of at most ENTRY_BYTES, newline separators included."""
    entries: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for message in messages:
        if current and size + len(message) + 1 > ENTRY_BYTES:
            entries.append(current)
            current, size = [], 0
        current.append(message)
        size += len(message) + 1
    if current:
        entries.append(current)
    return entries


class Publisher:
    """Appends messages to topics; one per process, shared by every session."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        max_len: int,
        retention: float,
        persistence: Persistence | None = None,
        durability: Callable[[str], Durability] = lambda topic: "os",
    ) -> None:
        """``persistence``: confirms each batch is durable as ``durability(topic)`` says
        (without one, Redis's reply is taken as stored, as the tests of trimming do)."""
        self._redis = redis
        self._keys = keys
        self._max_len = max_len
        self._persistence = persistence
        self._durability = durability
        self._retention_ms = int(retention * 1000)  # (1001 would be 0.1% off: not tested)
        self._known_topics: set[str] = set()
        self._last_retention_trim: dict[str, float] = {}
        self._append_entries = redis.register_script(APPEND_ENTRIES)

    async def publish(
        self,
        topic: str,
        messages: Sequence[bytes],
        *,
        user: str,
        raw: bool = False,
        pack: bool = False,
    ) -> list[StreamId]:
        """Store ``messages`` on ``topic`` as one atomic batch; return the entries' ids.

        With ``pack`` (lines without ``\\n``, not raw), several messages share an entry.
        Returns only once Redis acknowledged every XADD and the batch is durable as its topic's
        durability mode says. Raises BackendUnavailable if Redis cannot be reached (then none
        of this batch was stored), NotDurable if Redis took it but could not make it durable.
        """
        if not messages:
            return []
        key = self._keys.stream(topic)
        groups = pack_messages(messages) if pack and not raw else [[m] for m in messages]
        entries = [
            entry_fields(
                b"\n".join(group),
                user=user,
                message_id=secrets.token_hex(8),  # any length that cannot collide will do
                raw=raw,
                count=len(group),
            )
            for group in groups
        ]
        persistence = self._persistence
        mode = self._durability(topic) if persistence else "os"
        try:
            if mode == "os":
                ids = await self._append(self._redis, key, entries)
            else:  # the wait must follow the write on the same connection: a pipeline
                assert persistence is not None
                async with self._redis.pipeline(transaction=False) as pipe:
                    await self._append(pipe, key, entries)
                    pipe.execute_command(*persistence.wait_args(mode))
                    ids, waited = await pipe.execute()
                ids = [ids] if len(entries) == 1 else ids
                persistence.check_wait(mode, waited, topic)
        except ResponseError as exc:
            if persistence is not None and is_misconf(exc):
                raise persistence.misconf(exc, topic) from exc
            raise backend_error(exc, f"publishing to '{topic}'") from exc
        except (RedisError, OSError) as exc:
            raise backend_error(exc, f"publishing to '{topic}'") from exc
        if persistence is not None and (mode == "os" or not persistence.waitaof):
            await persistence.confirm(topic)  # the reply came before the AOF write's outcome
        await self._housekeeping(topic, key)
        return [parse_id(i) for i in ids]

    async def _append(self, client: Any, key: str, entries: list[dict[FieldT, EncodableT]]) -> Any:
        """Store ``entries`` with ``client`` (or queue them on a pipeline): their ids."""
        # approximate (~): trimming whole nodes only is cheaper; exact trimming would
        # keep at least max_len as well, so no test tells them apart.
        if len(entries) == 1:  # one XADD is atomic by itself
            one = client.xadd(key, entries[0], maxlen=self._max_len, approximate=True)
            return [await one] if client is self._redis else one
        return await self._append_entries(
            keys=[key], args=append_args(self._max_len, entries), client=client
        )

    async def _housekeeping(self, topic: str, key: str) -> None:
        """Register the topic and apply time retention; failures here lose nothing."""
        try:
            await self._register_and_trim(topic, key)
        except (RedisError, OSError) as exc:
            log.warning("topic_housekeeping_failed", topic=topic, error=str(exc))

    async def _register_and_trim(self, topic: str, key: str) -> None:
        if topic not in self._known_topics:
            await self._redis.sadd(self._keys.topics, topic)
            self._known_topics.add(topic)
        now = time.monotonic()
        # A default of 0.0 (or 1.0) means "long ago": the monotonic clock is far past either.
        # ">=" rather than ">" only matters to the exact microsecond.
        if now - self._last_retention_trim.get(topic, 0.0) >= _RETENTION_EVERY:
            self._last_retention_trim[topic] = now
            oldest_kept = int(time.time() * 1000) - self._retention_ms
            await self._redis.xtrim(key, minid=f"{oldest_kept}-0", approximate=True)  # (as XADD)
