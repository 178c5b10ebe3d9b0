"""Appending messages to a topic's stream.

A batch of messages is stored by one script (:data:`drainbus.bus.limits.APPEND`), so after a
failure the publisher can say exactly how many messages were stored: all of them, none (Redis
failed), or the first ones when the rest were over a limit (:class:`PublishRefused`). With
``pack``, lines share entries of up to ``ENTRY_BYTES`` (see :mod:`drainbus.bus.streams`). Each
XADD trims the stream approximately to ``max_len``, and to ``topics.max_bytes``; time retention
(``XTRIM MINID``) runs at most once per ``_RETENTION_EVERY`` seconds per topic, which is plenty
for a retention measured in hours.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from drainbus.bus.connection import RedisClient, backend_error
from drainbus.bus.limits import (
    APPEND,
    CREDIT,
    ENTRY_OVERHEAD,
    RESERVE,
    Limits,
    PublishRefused,
    RefusalLog,
    human_bytes,
    recount_usage,
)
from drainbus.bus.persistence import Persistence, is_misconf
from drainbus.bus.streams import Keys, StreamId, entry_fields, parse_id, text
from drainbus.values import Durability

__all__ = ["APPEND_ENTRIES", "Publisher", "append_args"]

log = structlog.get_logger(__name__)

_RETENTION_EVERY = 30.0
_RECOUNT_EVERY = 60.0  # seconds between recounts of one owner's usage, per process
ENTRY_BYTES = 64 * 1024
"""How much a packed entry holds (a single longer message gets an entry of its own)."""


# Appends a batch of entries in one command, atomically like MULTI/EXEC of the XADDs (the
# drain's receipts; topics go through drainbus.bus.limits.APPEND, which also counts bytes). One
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


@dataclass(frozen=True, slots=True)
class _Batch:
    """One publish call's entries: their messages, fields and sizes, in order."""

    topic: str
    user: str
    owner: str | None  # whose storage quota the topic counts against
    groups: list[list[bytes]]
    entries: list[dict[FieldT, EncodableT]]
    sizes: list[int]

    def first(self, n: int) -> _Batch:
        """This batch's first ``n`` entries."""
        return replace(self, groups=self.groups[:n], entries=self.entries[:n], sizes=self.sizes[:n])

    def after(self, n: int) -> _Batch:
        """This batch without its first ``n`` entries."""
        # (Only a quota refusal is offered again, on an owned topic, never the drain topic
        # whose rate limit is all that reads ``groups``: left whole, nothing would differ.)
        return replace(self, groups=self.groups[n:], entries=self.entries[n:], sizes=self.sizes[n:])


class Publisher:
    """Appends messages to topics; one per process, shared by every session.

    ``limits`` (the rate limit and storage quotas, see :mod:`drainbus.bus.limits`) apply to
    every caller alike: SSH ``pub``, hooks, and anything else that publishes through here.
    """

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        *,
        max_len: int,
        retention: float,
        limits: Limits | None = None,
        persistence: Persistence | None = None,
        durability: Callable[[str], Durability] = lambda topic: "os",
    ) -> None:
        """``persistence``: confirms each batch is durable as ``durability(topic)`` says
        (without one, Redis's reply is taken as stored, as the tests of trimming do)."""
        self._redis = redis
        self._keys = keys
        self._max_len = max_len
        self._retention_ms = int(retention * 1000)  # (1001 would be 0.1% off: not tested)
        self._limits = limits or Limits()
        self._persistence = persistence
        self._durability = durability
        self._known_topics: set[str] = set()
        self._last_retention_trim: dict[str, float] = {}
        self._last_recount: dict[str, float] = {}
        # On Redis Cluster a topic and its owner's usage hash are in different slots.
        self._cluster = isinstance(redis, RedisCluster)
        self._append_script = redis.register_script(APPEND)
        self._reserve_script = redis.register_script(RESERVE)
        self._credit_script = redis.register_script(CREDIT)
        self.refusals = RefusalLog()
        """Refused publishes, logged aggregated; closed with the bus."""

    async def publish(
        self,
        topic: str,
        messages: Sequence[bytes],
        *,
        user: str,
        raw: bool = False,
        pack: bool = False,
        confirm: bool = True,
    ) -> list[StreamId]:
        """Store ``messages`` on ``topic`` as one batch; return the entries' ids.

        ``confirm=False`` leaves the check that the batch survives a restart (one more round
        trip, see :meth:`confirm`) to the caller, who must make it before saying "stored":
        a session publishing line after line confirms now and then and at its end.

        With ``pack`` (lines without ``\\n``, not raw), several messages share an entry.
        Returns only once Redis acknowledged every XADD and the batch is durable as its topic's
        durability mode says. Raises BackendUnavailable if Redis cannot be reached (then none
        of this batch was stored), NotDurable if Redis took it but could not make it durable,
        and PublishRefused (exit 75)
        when the batch is over the rate limit, a storage quota or the server's memory: then
        its first ``stored`` messages were stored, and the rest were not.
        """
        if not messages:
            return []
        groups = pack_messages(messages) if pack and not raw else [[m] for m in messages]
        data = [b"\n".join(group) for group in groups]
        entries = [
            entry_fields(
                d,
                user=user,
                message_id=secrets.token_hex(8),  # any length that cannot collide will do
                raw=raw,
                count=len(group),
            )
            for d, group in zip(data, groups, strict=True)  # (strict: equal lengths by build)
        ]
        sizes = [len(d) + ENTRY_OVERHEAD for d in data]
        owner = self._limits.owner_of(topic)
        batch = _Batch(topic, user, owner, groups, entries, sizes)
        ids, wait_ms, reason = await self._store(batch)
        if reason in {"bytes", "topics"} and self._recount_due(owner):
            # Before a quota refusal stands, make sure the count is not off (recount_usage).
            assert owner is not None
            try:
                await recount_usage(self._redis, self._keys, owner)
            except (RedisError, OSError) as exc:  # then the refusal stands as counted
                log.warning("quota_recount_failed", owner=owner, error=str(exc))
            else:
                more, wait_ms, reason = await self._store(batch.after(len(ids)))
                ids += more
        if ids:  # a topic whose first publish was refused whole is not listed (ls)
            if confirm:
                await self.confirm(topic)
            await self._housekeeping(topic)
        if len(ids) < len(entries):
            retry = wait_ms / 1000 if reason == "rate" else None
            raise self._refused(topic, user, reason, groups, ids=ids, retry_after=retry)
        return ids

    async def confirm(self, topic: str) -> None:
        """Raise NotDurable unless everything published so far on ``topic`` is durable as
        its mode says. A Redis-compatible server replies before it appends to its AOF, so the
        outcome of that append is read after the reply (a ``fsync``/``replica`` wait already
        covers it where the server has WAITAOF)."""
        persistence = self._persistence
        if persistence is not None and (self._durability(topic) == "os" or not persistence.waitaof):
            await persistence.confirm(topic)

    async def _store(self, batch: _Batch) -> tuple[list[StreamId], int, str]:
        """Store what fits of ``batch``: (the ids stored, ms until a refused entry fits, why
        the rest was refused: "" none was, "rate", "bytes", "topics" or "memory")."""
        owner, topic = batch.owner, batch.topic
        reserve_first = owner is not None and self._cluster
        # (refusal's "" is returned only when nothing was refused, and then not read.)
        granted, refusal, reserved = len(batch.entries), "", 0
        try:
            if reserve_first:
                assert owner is not None
                granted, refusal = await self._reserve_bytes(owner, topic, batch.user, batch.sizes)
                reserved = sum(batch.sizes[:granted])
            appended, trimmed, wait_ms, reason, ids = await self._append_batch(
                batch.first(granted), usage=None if reserve_first else owner
            )
        except (RedisError, OSError) as exc:
            await self._give_back(owner, topic, reserved)
            if isinstance(exc, OutOfMemoryError):
                return [], 0, "memory"  # (the wait is read for "rate" only)
            if isinstance(exc, ResponseError) and self._persistence and is_misconf(exc):
                raise self._persistence.misconf(exc, topic) from exc
            raise backend_error(exc, f"publishing to '{topic}'") from exc
        # Give back what was trimmed, and what was reserved but not appended (none today: an
        # owned topic is never rate limited, so the append refuses none of what was reserved).
        if reserve_first:
            await self._give_back(owner, topic, trimmed + sum(batch.sizes[appended:granted]))
        return ids, wait_ms, reason or refusal

    def _recount_due(self, owner: str | None) -> bool:
        now = time.monotonic()
        # As in _retention_due: any default far in the past will do, and "<=" matters only
        # to the exact microsecond.
        if owner is None or now - self._last_recount.get(owner, -_RECOUNT_EVERY) < _RECOUNT_EVERY:
            return False
        self._last_recount[owner] = now
        return True

    async def _reserve_bytes(
        self, owner: str, topic: str, user: str, sizes: list[int]
    ) -> tuple[int, str]:
        """Redis Cluster: reserve the longest prefix of ``sizes`` in the owner's quota."""
        args: list[EncodableT] = [topic, self._quota(user), self._limits.max_topics_per_user]
        args += sizes
        granted, reason = await self._reserve_script(keys=[self._keys.usage(owner)], args=args)
        return int(granted), text(reason)

    def _quota(self, user: str) -> int:
        """``user``'s byte quota as the scripts take it: -1 counts without refusing."""
        return -1 if self._limits.exempt(user) else self._limits.max_user_bytes  # (any < 0)

    async def _append_batch(
        self, batch: _Batch, *, usage: str | None
    ) -> tuple[int, int, int, str, list[StreamId]]:
        """Append what fits of ``batch`` (checking ``usage``'s quota too, when given);
        return (how many, bytes trimmed, ms to wait, why the rest was refused, their ids)."""
        topic, user = batch.topic, batch.user
        rate, burst = self._limits.rate_for(topic, user)
        args: list[EncodableT] = [
            self._max_len, self._limits.max_topic_bytes, repr(rate), burst,
            self._retention_due(topic), topic, self._quota(user),
            self._limits.max_topics_per_user,
        ]  # fmt: skip
        # (strict: the three lists are built the same length)
        for group, fields, size in zip(batch.groups, batch.entries, batch.sizes, strict=True):
            args += [len(group), size, len(fields)]
            for name, value in fields.items():
                args += [name, value]
        keys = [
            self._keys.stream(topic),
            self._keys.stream_bytes(topic),
            self._keys.purge_bucket(topic, user),
        ]
        if usage is not None:
            keys.append(self._keys.usage(usage))
        persistence = self._persistence
        mode = self._durability(topic) if persistence else "os"
        if mode == "os":
            reply = await self._append_script(keys=keys, args=args)
        else:  # WAITAOF waits for this connection's writes: the wait must follow on it
            assert persistence is not None
            # No MULTI (None would do as False): inside one, WAITAOF answers without waiting.
            async with self._redis.pipeline(transaction=False) as pipe:
                queue: Any = pipe  # redis-py's Script types no pipeline, but queues on one
                await self._append_script(keys=keys, args=args, client=queue)
                pipe.execute_command(*persistence.wait_args(mode))
                reply, waited = await pipe.execute()
            persistence.check_wait(mode, waited, topic)
        appended, trimmed, wait_ms, reason, *ids = reply
        return (int(appended), int(trimmed), int(wait_ms), text(reason), [parse_id(i) for i in ids])

    async def _give_back(self, owner: str | None, topic: str, size: int) -> None:
        """Credit ``size`` bytes no longer stored to ``owner``; a failure only over-counts."""
        # (A credit of 0 changes nothing but costs a round trip; no size is 1 byte.)
        if owner is None or size <= 0:
            return
        try:
            await self._credit_script(keys=[self._keys.usage(owner)], args=[topic, size])
        except (RedisError, OSError) as exc:
            log.warning("quota_credit_failed", topic=topic, bytes=size, error=str(exc))

    def refuse_more(self, refusal: PublishRefused, count: int) -> None:
        """Count ``count`` more messages refused after ``refusal`` (the rest of a session's
        input, never offered to Redis once one batch was refused), in its log and metrics."""
        refusal.refused += count
        self.refusals.add(refusal, count)

    def _refused(
        self,
        topic: str,
        user: str,
        reason: str,
        groups: list[list[bytes]],
        *,
        ids: list[StreamId] | None = None,
        retry_after: float | None = None,
    ) -> PublishRefused:
        ids = ids or []
        limits = self._limits
        owner = limits.owner_of(topic) or ""  # (named only by the quotas: then there is one)
        message = {
            "rate": f"over user {user}'s purge rate limit (drain.max_purges_per_user: "
            f"{limits.purges_per_minute} per minute, bursts of {limits.purge_burst})",
            "bytes": f"over the storage quota of {owner}'s topics (server.max_user_bytes: "
            f"{human_bytes(limits.max_user_bytes)}); older messages make room as retention "
            "trims them",
            "topics": f"'{owner}' already stores {limits.max_topics_per_user} topics "
            "(server.max_topics_per_user); a topic stops counting once nothing of it is stored",
            "memory": "the bus's Redis is out of memory (maxmemory); retry later",
        }[reason]
        stored = sum(map(len, groups[: len(ids)]))
        refusal = PublishRefused(
            message, reason=reason, user=user, topic=topic, ids=ids, stored=stored,
            refused=sum(map(len, groups)) - stored, retry_after=retry_after,
            per_minute=limits.purges_per_minute if reason == "rate" else None,
        )  # fmt: skip
        self.refusals.add(refusal, refusal.refused)
        return refusal

    def _retention_due(self, topic: str) -> str:
        """The MINID that time retention trims ``topic`` to, when due ("" when not)."""
        now = time.monotonic()
        # A default of 0.0 (or 1.0) means "long ago": the monotonic clock is far past either.
        # ">=" rather than ">" only matters to the exact microsecond.
        if now - self._last_retention_trim.get(topic, 0.0) < _RETENTION_EVERY:
            return ""
        self._last_retention_trim[topic] = now
        return f"{int(time.time() * 1000) - self._retention_ms}-0"

    async def _housekeeping(self, topic: str) -> None:
        """Register the topic (for ``ls``); a failure here loses nothing."""
        if topic in self._known_topics:
            return
        try:
            await self._redis.sadd(self._keys.topics, topic)
        except (RedisError, OSError) as exc:
            log.warning("topic_housekeeping_failed", topic=topic, error=str(exc))
        else:
            self._known_topics.add(topic)
