"""One stream reader per topic per process, fanned out to local subscribers.

Every client blocked on a stream makes each XADD dearer and holds a connection, so a process
runs a single ``XREAD BLOCK`` loop per topic with live subscribers and hands each batch it
reads to every local subscriber's inbox.

Slow subscribers. An inbox is bounded in bytes (``server.subscriber_buffer_bytes``). The
reader never waits for a subscriber: when a batch would overflow an inbox, the inbox is
emptied and marked overflowed. That subscriber then leaves the live fan-out and reads the
stream directly, at its own pace, from the last id it wrote, and rejoins the fan-out once it
has caught up. Nothing is skipped and nobody else is slowed; the only messages a slow
subscriber can miss are ones the stream itself trimmed away before it got to them, and then
it is told so.

The express path. Waking a subscriber's task for every batch is most of what fan-out costs
per subscriber (a callback, a task step, an async generator, a write). So a subscriber
parked waiting for its next batch, with nothing queued, may give ``follow`` an ``express``
function: the reader calls it with the batch right away, and it writes it synchronously.
It declines (returns False) when it cannot take the batch now, for instance while its SSH
channel is backed up; the batch is then queued and the task woken as usual. Order holds:
express is only tried while the task is parked and its queue is empty.
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast

import anyio
import structlog
from anyio.abc import TaskGroup
from redis.exceptions import RedisError

from drainbus.backoff import Backoff
from drainbus.bus.connection import BLOCK_MS, RedisClient, backend_error, reader_client
from drainbus.bus.streams import (
    ZERO_ID,
    Entry,
    Keys,
    Row,
    StreamId,
    format_id,
    read_after,
    rfc3339,
    stream_info,
)
from drainbus.terminal import escape_controls, json_safe

__all__ = ["Batch", "Fanout", "Overflow", "TrimNotice"]

log = structlog.get_logger(__name__)

_READ_COUNT = 1024  # entries per XREAD / XRANGE page
_RECENT_IDS = 4096  # message ids remembered per topic to drop repeats of a retried XADD


def _page_entries(budget_bytes: int, entry_bytes: int) -> int:
    """How many entries of ``entry_bytes`` fit in ``budget_bytes`` (1 to _READ_COUNT)."""
    return max(1, min(_READ_COUNT, budget_bytes // max(1, entry_bytes)))


class Batch:
    """Entries read together; renders them once for every subscriber that wants them."""

    __slots__ = ("_json", "_plain", "_raw", "entries", "messages", "nbytes", "topic")

    def __init__(self, topic: str, entries: list[Entry]) -> None:
        self.topic = topic
        self.entries = entries
        self.nbytes = sum(len(e.data) + 1 for e in entries)
        self.messages = sum(e.count for e in entries)
        self._plain: bytes | None = None
        self._raw: bytes | None = None
        self._json: bytes | None = None

    @property
    def last_id(self) -> StreamId:
        """Id of the newest entry."""
        return self.entries[-1].id

    def after(self, position: StreamId) -> Batch | None:
        """This batch without entries at or before ``position``; None if nothing is left."""
        if self.entries[0].id > position:
            return self
        fresh = [e for e in self.entries if e.id > position]
        return Batch(self.topic, fresh) if fresh else None

    def first_messages(self, n: int) -> Batch:
        """This batch cut after its first ``n`` messages (``sub --count``)."""
        if n >= self.messages:
            return self
        kept: list[Entry] = []
        for entry in self.entries:
            if n <= 0:
                break
            kept.append(entry.first(n))
            n -= entry.count
        return Batch(self.topic, kept)

    def skip_into(self, entry_id: StreamId, n: int) -> Batch | None:
        """Without the first ``n`` messages of entry ``entry_id`` if this batch starts with it.

        How ``sub --since ENTRY:INDEX`` resumes inside a packed entry.
        """
        if not self.entries or self.entries[0].id != entry_id:
            return self
        rest = self.entries[0].without_first(n)
        kept = ([rest] if rest else []) + self.entries[1:]
        return Batch(self.topic, kept) if kept else None

    def raw(self) -> bytes:
        """What ``sub --raw`` writes: each message followed by a newline, ``pub --raw`` chunks
        exactly as they came; all bytes as stored."""
        if self._raw is None:
            self._raw = b"".join(e.data if e.raw else e.data + b"\n" for e in self.entries)
        return self._raw

    def plain(self) -> bytes:
        """What ``sub`` writes: :meth:`raw` with control characters shown as escapes
        (:func:`drainbus.terminal.escape_controls`), ``pub --raw`` chunks included."""
        if self._plain is None:
            self._plain = escape_controls(self.raw())
        return self._plain

    def json_lines(self) -> bytes:
        """One JSON object per message: id, time, topic, user, data (base64 if not UTF-8).

        Control characters, U+2028, U+2029 and U+FEFF are ``\\u`` escapes (json_safe)."""
        if self._json is None:
            lines = []
            for e in self.entries:
                # Both lists have e.count items: strict (or not) only guards that invariant.
                for message_id, message in zip(e.message_ids(), e.messages(), strict=True):
                    record: dict[str, str] = {
                        "id": message_id,
                        "time": rfc3339(e.received_ms),
                        "topic": self.topic,
                        "user": e.user,
                    }
                    # Codec names ignore case here and below: "UTF-8", "ASCII" are the same codecs.
                    try:
                        record["data"] = message.decode("utf-8")
                    except UnicodeDecodeError:
                        record["data"] = base64.b64encode(message).decode("ascii")
                        record["encoding"] = "base64"
                    # ensure_ascii=None would be as false as False: the same output.
                    lines.append(json.dumps(record, ensure_ascii=False))
            self._json = (json_safe("\n".join(lines)) + "\n").encode("utf-8")
        return self._json


class Overflow(Exception):
    """The subscriber's inbox overflowed: catch up from the stream instead."""


@dataclass(frozen=True, slots=True)
class TrimNotice:
    """History the subscriber asked for is gone: the stream now begins at ``first_id``."""

    first_id: StreamId

    def message(self, topic: str) -> str:
        """The line a subscriber sees on stderr."""
        return (
            f"note: history of '{topic}' before {format_id(self.first_id)} "
            f"({rfc3339(self.first_id[0])}) was trimmed; messages before it are gone"
        )


Express = Callable[["Batch"], bool]
"""Writes a batch at once and returns True, or returns False to have it queued."""


class _Inbox:
    """A subscriber's bounded queue of live batches (see the module docstring).

    ``position`` is the id of the last entry handed to the subscriber, by ``take`` or by
    ``express``; batches are trimmed to what lies after it.
    """

    __slots__ = (
        "_batches",
        "_bytes",
        "_limit",
        "_parked",
        "_ready",
        "express",
        "overflowed",
        "position",
    )

    def __init__(self, limit_bytes: int, express: Express | None = None) -> None:
        self._batches: deque[Batch] = deque()
        self._bytes = 0
        self._limit = limit_bytes
        self._ready = anyio.Event()
        # Only the truth of these two is read: None would do as well as False.
        self._parked = False  # the subscriber waits in take(): all it took is written
        self.express = express
        self.overflowed = False
        self.position = ZERO_ID

    def offer(self, batch: Batch) -> int:
        """Queue ``batch``, or hand it to ``express``: then return how many messages it took."""
        if self.overflowed:
            return 0
        if self._parked and self.express is not None and not self._batches:
            fresh = batch.after(self.position)
            if fresh is None:
                return 0
            if self._express(fresh):
                self.position = fresh.last_id
                return fresh.messages
        if self._batches and self._bytes + batch.nbytes > self._limit:
            # An overflowed inbox is done with (follow attaches a new one): only free the
            # batches; its byte count is never read again.
            self._batches.clear()
            self.overflowed = True
        else:
            self._batches.append(batch)
            self._bytes += batch.nbytes
        self._ready.set()
        return 0

    def _express(self, batch: Batch) -> bool:
        assert self.express is not None
        try:
            return self.express(batch)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the reader must go on
            # This runs in the topic's reader: one subscriber's failure must not end it. The
            # batch goes the slow way, where the subscriber's own task meets the error.
            log.warning("subscriber_express_failed", error=f"{type(exc).__name__}: {exc}")
            self.express = None
            return False

    async def take(self) -> list[Batch]:
        """The batches queued since the last call (waiting for one), each after ``position``."""
        self._parked = True
        try:
            await self._ready.wait()
        finally:
            self._parked = False  # (None would do as well: only its truth is read)
        self._ready = anyio.Event()  # (an anyio Event is never cleared: a fresh one)
        if self.overflowed:
            raise Overflow
        batches = []
        for batch in self._batches:
            fresh = batch.after(self.position)
            if fresh is not None:
                batches.append(fresh)
                self.position = fresh.last_id
        self._batches.clear()
        self._bytes = 0
        return batches


class _RecentIds:
    """The last ``_RECENT_IDS`` message ids seen: a repeat of one is a retried XADD."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()

    def is_repeat(self, message_id: str) -> bool:
        if not message_id:
            return False
        if message_id in self._ids:
            return True
        self._ids[message_id] = None  # an ordered set: the value is never read
        if len(self._ids) > _RECENT_IDS:
            self._ids.popitem(last=False)  # (last=None: as false, the same oldest item)
        return False


@dataclass(eq=False)
class _TopicReader:
    topic: str
    position: StreamId
    inboxes: set[_Inbox] = field(default_factory=set)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    recent: _RecentIds = field(default_factory=_RecentIds)

    def is_repeat(self, message_id: str) -> bool:
        return self.recent.is_repeat(message_id)


class Fanout:
    """Shares one stream reader per topic among this process's subscribers.

    Use as an async context manager; :meth:`follow` is what a ``sub`` session iterates.
    """

    def __init__(
        self,
        redis: RedisClient,
        redis_url: str,
        keys: Keys,
        *,
        inbox_bytes: int,
        max_message_bytes: int = 65536,  # sizes the first catch-up page only: not observable
        on_change: Callable[[], None] = lambda: None,
        on_express: Callable[[Batch, int, int], None] = lambda batch, sessions, messages: None,
    ) -> None:
        """``on_change``: the local subscriber count changed. ``on_express(batch, sessions,
        messages)``: the reader wrote ``batch`` to that many sessions by their express path
        (``messages`` in all), once per batch so the writes need not each be counted."""
        self._redis = redis
        self._redis_url = redis_url
        self._keys = keys
        self._inbox_bytes = inbox_bytes
        self._max_message_bytes = max_message_bytes
        self._readers: dict[str, _TopicReader] = {}
        self._subscribers: dict[str, int] = {}
        self._on_change = on_change
        self._on_express = on_express
        self._task_group: TaskGroup | None = None  # (any value: __aenter__ sets it before use)
        self.lagged = 0  # times a subscriber overflowed its inbox and had to catch up

    async def __aenter__(self) -> Fanout:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        # anyio reads only `exc` when the body raised, and all three are None when it did
        # not: None for exc_type or tb changes nothing (test_fanout checks `exc` is passed).
        await self._task_group.__aexit__(exc_type, exc, tb)

    def subscriber_counts(self) -> dict[str, int]:
        """Topic -> number of live local subscribers."""
        return dict(self._subscribers)

    def readers(self) -> list[tuple[str, StreamId, list[int], int]]:
        """Each topic reader: (topic, position, bytes queued by each subscriber in the fan-out
        (its lag), how many read the stream directly: replaying, or catching up)."""
        return [
            (topic, reader.position, sorted((i._bytes for i in reader.inboxes), reverse=True),
             self._subscribers.get(topic, 0) - len(reader.inboxes))
            for topic, reader in self._readers.items()
        ]  # fmt: skip

    @asynccontextmanager
    async def _attached(self, topic: str, express: Express | None) -> AsyncIterator[_Inbox]:
        """Register an inbox with ``topic``'s reader, starting the reader if needed."""
        reader = self._readers.get(topic)
        if reader is None:
            info = await stream_info(self._redis, self._keys.stream(topic))
            reader = self._readers.get(topic)  # another subscriber may have won the race
            if reader is None:
                reader = _TopicReader(topic, info.last_id if info else ZERO_ID)
                self._readers[topic] = reader
                assert self._task_group is not None
                self._task_group.start_soon(self._read_loop, reader)
        inbox = _Inbox(self._inbox_bytes, express)
        reader.inboxes.add(inbox)
        try:
            yield inbox
        finally:
            reader.inboxes.discard(inbox)
            if not reader.inboxes and self._readers.get(topic) is reader:
                del self._readers[topic]
                reader.scope.cancel()

    async def _read_loop(self, reader: _TopicReader) -> None:
        key = self._keys.stream(reader.topic)
        # The retry path (this backoff, the except and the shielded close below) runs only when
        # Redis fails mid-read: tests/test_bus.py restarts Redis under a subscriber, through
        # OpenSSH, too slowly for scripts/mutate; its mutants are left to that test.
        backoff = Backoff("stream_reader_retry")
        with reader.scope:
            while True:
                client = reader_client(self._redis_url)
                try:
                    while True:
                        # COUNT and BLOCK bound the reply and the wait: without them the reader
                        # reads the same entries, in one reply or by polling, so no test differs.
                        reply = await client.xread(
                            {key: format_id(reader.position)}, count=_READ_COUNT, block=BLOCK_MS
                        )
                        backoff.succeeded()
                        replies = cast(list[tuple[bytes, list[Row]]], reply or [])  # no-op
                        for _key, rows in replies:
                            entries = [Entry.from_redis(i, f) for i, f in rows]
                            reader.position = entries[-1].id
                            fresh = [e for e in entries if not reader.is_repeat(e.message_id)]
                            if fresh:
                                self._offer(reader, Batch(reader.topic, fresh))
                except (RedisError, OSError) as exc:
                    await backoff.failed(
                        exc, topic=reader.topic, position=format_id(reader.position)
                    )
                finally:
                    # Never reuse a connection a cancelled XREAD may have left mid-reply.
                    with anyio.CancelScope(shield=True):
                        await client.aclose()

    def _offer(self, reader: _TopicReader, batch: Batch) -> None:
        sessions = messages = 0
        for inbox in tuple(reader.inboxes):
            if taken := inbox.offer(batch):
                sessions += 1
                messages += taken
        if sessions:
            self._on_express(batch, sessions, messages)

    async def follow(
        self, topic: str, after: StreamId | None, *, express: Express | None = None
    ) -> AsyncGenerator[Batch | TrimNotice, None]:
        """Yield ``topic``'s messages after ``after`` (None: only new ones), forever.

        Yields a TrimNotice whenever history it had not yet read was trimmed. Raises
        BackendUnavailable if Redis cannot be reached when starting; later outages are
        retried, and the subscriber resumes from its last id with no gap or repeat.
        ``express``: see the module docstring; live batches it accepts are not yielded.
        """
        key = self._keys.stream(topic)
        position = after
        started = False
        # As in _read_loop, the retry path (backoff, `started`, the last except) is left to
        # tests/test_bus.py's Redis restart: too slow a test for scripts/mutate.
        backoff = Backoff("subscriber_retry")
        # A retried XADD can store one message twice (see streams.py): the live feed drops
        # such repeats by message id (_TopicReader), and so does catching up.
        seen = _RecentIds()
        # Catch-up pages are sized in bytes like inboxes: start from the largest message
        # allowed, then follow the sizes actually seen.
        page = _page_entries(self._inbox_bytes, self._max_message_bytes)
        while True:
            try:
                async with self._attached(topic, express) as inbox:
                    position, notice = await self._start_at(key, position)
                    if notice:
                        yield notice
                    started = True
                    while True:  # catch up from the stream
                        asked = page
                        # Pages bound memory, not results: unbounded, one read returns the same.
                        entries = await read_after(self._redis, key, position, asked)
                        if entries:
                            position = entries[-1].id
                            batch = Batch(topic, entries)
                            page = _page_entries(self._inbox_bytes, batch.nbytes // len(entries))
                            fresh = [e for e in entries if not seen.is_repeat(e.message_id)]
                            if fresh:
                                # (A new Batch of the same entries would do: this saves one.)
                                yield batch if len(fresh) == len(entries) else Batch(topic, fresh)
                        if len(entries) < asked:  # a short page: caught up
                            break
                    backoff.succeeded()
                    inbox.position = position
                    try:
                        while True:  # live
                            for batch in await inbox.take():
                                yield batch
                    finally:
                        position = inbox.position
            except Overflow:
                self.lagged += 1
                log.info("subscriber_lagging", topic=topic, position=format_id(position or ZERO_ID))
            except (RedisError, OSError) as exc:
                if not started:
                    raise backend_error(exc, f"subscribing to '{topic}'") from exc
                await backoff.failed(exc, topic=topic)

    async def _start_at(
        self, key: str, position: StreamId | None
    ) -> tuple[StreamId, TrimNotice | None]:
        """Where a (re)attached subscriber reads from (None: the stream's last id), and the
        TrimNotice it is owed: each time it catches up (at start, after lagging, after an
        outage) it is told if what it had not read yet was trimmed."""
        info = await stream_info(self._redis, key)
        if position is None:
            return (info.last_id if info else ZERO_ID), None
        if info and info.was_trimmed and info.first_id and position < info.first_id:
            # Trimming removes the oldest entries, so what was removed lies before first_id.
            # Asking for a start before it means asking for some of what is gone.
            return position, TrimNotice(info.first_id)
        return position, None

    def count(self, topic: str, delta: int) -> None:
        """Track a ``sub`` session joining (+1) or leaving (-1) ``topic``."""
        total = self._subscribers.get(topic, 0) + delta
        if total > 0:
            self._subscribers[topic] = total
        else:
            self._subscribers.pop(topic, None)
        self._on_change()
