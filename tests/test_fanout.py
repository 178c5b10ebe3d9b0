"""The fan-out's express path: live batches written straight from the topic's reader.

These drive :class:`Fanout` directly on a real Redis, so each test can decide what the
subscriber's ``express`` function does: accept, decline (its channel is backed up) or fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from structlog.testing import capture_logs

from drainbus.bus.fanout import (
    Batch,
    Fanout,
    TrimNotice,
    _Inbox,
    _page_entries,
    _RecentIds,
    _TopicReader,
)
from drainbus.bus.streams import ZERO_ID, Entry, Keys, StreamId, entry_fields, parse_id
from drainbus.errors import BackendUnavailable

TOPIC = "alice/express"


class Subscriber:
    """One ``follow`` consumed in a task: what it yielded, and what went by express."""

    def __init__(self, fanout: Fanout, express: Callable[[Batch], bool] | None) -> None:
        self.yielded: list[bytes] = []
        self.expressed: list[bytes] = []
        self._arrived = asyncio.Event()  # set whenever a message arrives
        self._express = express
        self._task = asyncio.create_task(self._consume(fanout))

    def express(self, batch: Batch) -> bool:
        if self._express is not None and not self._express(batch):
            return False
        self.expressed += [m for e in batch.entries for m in e.messages()]
        self._arrived.set()
        return True

    @property
    def received(self) -> list[bytes]:
        return self.expressed + self.yielded

    async def _consume(self, fanout: Fanout) -> None:
        async for item in fanout.follow(TOPIC, None, express=self.express):
            assert not isinstance(item, TrimNotice)
            self.yielded += [m for e in item.entries for m in e.messages()]
            self._arrived.set()

    async def wait_for(self, message: bytes, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while message not in self.received:
                self._arrived.clear()
                await self._arrived.wait()

    async def stop(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


@asynccontextmanager
async def fanout_on(
    redis_url: str, namespace: str
) -> AsyncIterator[tuple[Fanout, Redis, list[tuple[int, int, list[bytes]]]]]:
    """A Fanout on a fresh namespace, the client it uses, and what ``on_express`` heard:
    (sessions, messages, the batch's messages) per call."""
    redis = Redis.from_url(redis_url)
    heard: list[tuple[int, int, list[bytes]]] = []
    try:
        async with Fanout(
            redis,
            redis_url,
            Keys(namespace),
            inbox_bytes=1 << 20,
            on_express=lambda batch, sessions, messages: heard.append(
                (sessions, messages, [m for e in batch.entries for m in e.messages()])
            ),
        ) as fanout:
            yield fanout, redis, heard
    finally:
        await redis.aclose()


async def publish(redis: Redis, namespace: str, *messages: bytes) -> None:
    """One entry per message, as a pub of separate lines on a checked topic stores them."""
    for n, message in enumerate(messages):
        fields = entry_fields(message, user="alice", message_id=f"{message!r}-{n}", raw=False)
        await redis.xadd(Keys(namespace).stream(TOPIC), fields)


async def attach(redis: Redis, namespace: str, *subs: Subscriber) -> None:
    """Publish warm-up lines until every subscriber has seen one: then all are live."""
    for n in range(500):
        warm = b"warm-%d" % n
        await publish(redis, namespace, warm)
        try:
            for sub in subs:
                await sub.wait_for(warm, timeout=0.2)
            return
        except TimeoutError:
            continue
    raise AssertionError("the subscribers never attached")


async def test_live_batches_go_by_express_and_are_counted_once_per_batch(
    redis_url: str, namespace: str
) -> None:
    """A parked subscriber gets live batches from the reader itself, not through its task."""
    async with fanout_on(redis_url, namespace) as (fanout, redis, heard):
        subs = [Subscriber(fanout, None) for _ in range(3)]
        await attach(redis, namespace, *subs)
        heard.clear()
        for sub in subs:
            sub.expressed.clear()
        await publish(redis, namespace, b"one")
        for sub in subs:
            await sub.wait_for(b"one")
            assert sub.expressed == [b"one"]
        assert heard == [(3, 3, [b"one"])]  # one call for the three sessions, not three
        for sub in subs:
            await sub.stop()


async def test_declined_batches_are_queued_in_order_without_repeats(
    redis_url: str, namespace: str
) -> None:
    """While express declines (channel backed up), batches wait in the inbox; none is lost."""
    accepting = True
    async with fanout_on(redis_url, namespace) as (fanout, redis, _):
        sub = Subscriber(fanout, lambda batch: accepting)
        await attach(redis, namespace, sub)
        accepting = False
        await publish(redis, namespace, b"a", b"b", b"c")
        await sub.wait_for(b"c")
        accepting = True
        await publish(redis, namespace, b"d", b"e")
        await sub.wait_for(b"e")
        live = [m for m in sub.yielded + sub.expressed if not m.startswith(b"warm")]
        assert sorted(live) == [b"a", b"b", b"c", b"d", b"e"]
        # a-c were yielded by the task; once it was parked again, express took d and e.
        assert [m for m in sub.yielded if not m.startswith(b"warm")] == [b"a", b"b", b"c"]
        assert sub.expressed[-2:] == [b"d", b"e"]
        await sub.stop()


async def test_failing_express_falls_back_and_spares_the_other_subscribers(
    redis_url: str, namespace: str
) -> None:
    """An express that raises is turned off for that subscriber only; nothing is lost."""
    failing = False

    def flaky(batch: Batch) -> bool:
        if failing:
            raise BrokenPipeError("channel closed")
        return True

    async with fanout_on(redis_url, namespace) as (fanout, redis, _):
        broken, healthy = Subscriber(fanout, flaky), Subscriber(fanout, None)
        await attach(redis, namespace, broken, healthy)
        failing = True
        await publish(redis, namespace, b"x", b"y")
        await healthy.wait_for(b"y")
        await broken.wait_for(b"y")
        assert broken.yielded[-2:] == [b"x", b"y"]  # by its own task, after express failed
        assert healthy.expressed[-2:] == [b"x", b"y"]
        for sub in (broken, healthy):
            await sub.stop()


def _entries(*ids: tuple[int, int]) -> list[Entry]:
    return [
        Entry(
            id=i,
            data=f"m{i[0]}-{i[1]}".encode(),
            user="alice",
            message_id=f"{i[0]:x}{i[1]:x}",
            received_ms=i[0],
            raw=False,
        )
        for i in ids
    ]


def test_batch_after_a_position_drops_everything_up_to_and_including_it() -> None:
    """`after(P)` keeps only entries newer than P: P itself was already written."""
    batch = Batch(TOPIC, _entries((1, 0), (2, 0), (3, 0)))
    assert batch.after((0, 5)) is batch
    kept = batch.after((1, 0))
    assert kept is not None
    assert [e.id for e in kept.entries] == [(2, 0), (3, 0)]
    kept = batch.after((2, 0))
    assert kept is not None
    assert [e.id for e in kept.entries] == [(3, 0)]
    assert batch.after((3, 0)) is None
    assert batch.after((9, 0)) is None


async def test_rejoining_exactly_at_a_batch_boundary_sees_each_message_once() -> None:
    """A subscriber that caught up to the first entry of a live batch gets the rest, once.

    How a subscriber rejoins the live feed after catching up from the stream: its position
    is the last entry it wrote, and a live batch read meanwhile may start exactly there.
    """
    live = Batch(TOPIC, _entries((5, 0), (5, 1), (6, 0)))
    queued = _Inbox(limit_bytes=1 << 20)
    queued.position = (5, 0)
    queued.offer(live)
    taken = await queued.take()
    assert [e.id for b in taken for e in b.entries] == [(5, 1), (6, 0)]

    written: list[StreamId] = []

    def express(batch: Batch) -> bool:
        written.extend(e.id for e in batch.entries)
        return True

    parked = _Inbox(limit_bytes=1 << 20, express=express)
    parked.position = (5, 0)
    waiting = asyncio.create_task(parked.take())
    await asyncio.sleep(0)  # let take() park: that is when the express path is open
    assert parked.offer(live) == 2
    assert written == [(5, 1), (6, 0)]
    assert parked.position == (6, 0)
    waiting.cancel()


async def test_catching_up_drops_a_retried_append_like_the_live_feed(
    redis_url: str, namespace: str
) -> None:
    """An entry stored twice by a retried XADD (same message id) is replayed once."""
    key = Keys(namespace).stream(TOPIC)
    async with fanout_on(redis_url, namespace) as (fanout, redis, _heard):
        for data, message_id in [(b"a", "m1"), (b"b", "m2"), (b"b", "m2"), (b"c", "m3")]:
            await redis.xadd(key, entry_fields(data, user="alice", message_id=message_id,
                                               raw=False))  # fmt: skip
        replayed: list[bytes] = []
        stream = fanout.follow(TOPIC, ZERO_ID)
        async for item in stream:
            assert isinstance(item, Batch)
            assert item.topic == TOPIC
            replayed += [m for e in item.entries for m in e.messages()]
            if replayed[-1:] == [b"c"]:
                break
        await stream.aclose()
    assert replayed == [b"a", b"b", b"c"]


# --- batches, inboxes and repeats on their own ----------------------------------------------


def _entry(ms: int, *messages: bytes) -> Entry:
    return Entry(
        id=(ms, 0),
        data=b"\n".join(messages),
        user="alice",
        message_id=f"id{ms}",
        received_ms=1_700_000_000_000,
        raw=False,
        count=len(messages),
        packed=len(messages) > 1,
    )


def _messages(batch: Batch | None) -> list[bytes]:
    assert batch is not None
    assert batch.topic == TOPIC
    return [m for e in batch.entries for m in e.messages()]


def test_batch_cuts_keep_the_topic_and_the_messages_asked_for() -> None:
    """after, first_messages and skip_into return batches of the same topic, cut exactly."""
    batch = Batch(TOPIC, [_entry(1, b"a", b"b"), _entry(2, b"c"), _entry(3, b"d", b"e")])
    assert batch.messages == 5
    assert _messages(batch.after((1, 0))) == [b"c", b"d", b"e"]
    assert batch.first_messages(5) is batch
    assert _messages(batch.first_messages(2)) == [b"a", b"b"]
    assert len(batch.first_messages(2).entries) == 1
    assert _messages(batch.first_messages(4)) == [b"a", b"b", b"c", b"d"]
    assert _messages(batch.skip_into((1, 0), 1)) == [b"b", b"c", b"d", b"e"]
    assert _messages(batch.skip_into((1, 0), 2)) == [b"c", b"d", b"e"]
    assert batch.skip_into((2, 0), 1) is batch  # the batch does not start with that entry
    assert Batch(TOPIC, [_entry(1, b"a", b"b")]).skip_into((1, 0), 2) is None


def test_json_lines_render_text_as_is_and_other_bytes_as_base64() -> None:
    """UTF-8 messages appear as text (not \\u escapes); others as base64, marked so."""
    batch = Batch(TOPIC, [_entry(1, "café".encode(), b"\xff\xfe")])
    lines = batch.json_lines().decode("utf-8").splitlines()
    assert lines == [
        '{"id": "1-0:0", "time": "2023-11-14T22:13:20.000Z", "topic": "alice/express", '
        '"user": "alice", "data": "café"}',
        '{"id": "1-0:1", "time": "2023-11-14T22:13:20.000Z", "topic": "alice/express", '
        '"user": "alice", "data": "//4=", "encoding": "base64"}',
    ]


def test_trim_notice_names_where_the_stream_now_begins() -> None:
    """The notice gives the first id left and its time."""
    assert TrimNotice((1_700_000_000_000, 5)).message("alice/x") == (
        "note: history of 'alice/x' before 1700000000000-5 (2023-11-14T22:13:20.000Z) "
        "was trimmed; messages before it are gone"
    )


async def test_an_inbox_holds_batches_up_to_its_limit_in_bytes() -> None:
    """Batches queue while their bytes fit the limit exactly; one more byte overflows."""
    one = Batch(TOPIC, [_entry(1, b"123456789")])  # 10 bytes with its newline
    inbox = _Inbox(limit_bytes=30)
    assert inbox.offer(one) == 0
    assert inbox.offer(Batch(TOPIC, [_entry(2, b"123456789")])) == 0
    assert inbox.offer(Batch(TOPIC, [_entry(3, b"123456789")])) == 0  # 30 bytes: full
    assert [b.last_id for b in await inbox.take()] == [(1, 0), (2, 0), (3, 0)]
    assert not inbox.overflowed

    # take() emptied it: the limit holds again from zero.
    for ms in (4, 5, 6):
        inbox.offer(Batch(TOPIC, [_entry(ms, b"123456789")]))
    assert not inbox.overflowed
    assert inbox.offer(Batch(TOPIC, [_entry(7, b"1")])) == 0
    assert inbox.overflowed
    assert inbox.offer(Batch(TOPIC, [_entry(8, b"1")])) == 0


async def test_a_big_batch_into_an_empty_inbox_is_queued_not_an_overflow() -> None:
    """A single batch larger than the limit still goes through: only a backlog overflows."""
    inbox = _Inbox(limit_bytes=5)
    inbox.offer(Batch(TOPIC, [_entry(1, b"123456789")]))
    assert not inbox.overflowed
    assert [b.last_id for b in await inbox.take()] == [(1, 0)]


async def test_express_is_closed_while_the_subscriber_is_not_parked() -> None:
    """Once take() returned, the subscriber is busy writing: batches queue until it parks."""
    expressed: list[Batch] = []

    def express(batch: Batch) -> bool:
        expressed.append(batch)
        return True

    inbox = _Inbox(limit_bytes=1 << 20, express=express)
    inbox.offer(Batch(TOPIC, [_entry(1, b"a")]))
    assert [b.last_id for b in await inbox.take()] == [(1, 0)]
    assert inbox.offer(Batch(TOPIC, [_entry(2, b"b")])) == 0
    assert expressed == []
    assert [b.last_id for b in await inbox.take()] == [(2, 0)]


async def test_express_of_nothing_new_takes_nothing() -> None:
    """A parked subscriber offered only entries it already has takes none of them."""
    inbox = _Inbox(limit_bytes=1 << 20, express=lambda batch: True)
    inbox.position = (5, 0)
    waiting = asyncio.create_task(inbox.take())
    await asyncio.sleep(0)  # let take() park: that is when the express path is open
    assert inbox.offer(Batch(TOPIC, [_entry(4, b"old"), _entry(5, b"old")])) == 0
    assert inbox.position == (5, 0)
    waiting.cancel()


@pytest.mark.usefixtures("fresh_logging")
async def test_a_failing_express_is_logged_once_and_turned_off() -> None:
    """The error is logged with its type; express is then off, so it cannot fail again."""
    calls = 0

    def broken(batch: Batch) -> bool:
        nonlocal calls
        calls += 1
        raise BrokenPipeError("channel closed")

    inbox = _Inbox(limit_bytes=1 << 20, express=broken)
    with capture_logs() as logs:
        for ms in (1, 2):
            waiting = asyncio.create_task(inbox.take())
            await asyncio.sleep(0)
            assert inbox.offer(Batch(TOPIC, [_entry(ms, b"x")])) == 0
            assert [b.last_id for b in await waiting] == [(ms, 0)]
    assert calls == 1
    assert inbox.express is None
    assert logs == [
        {"event": "subscriber_express_failed", "error": "BrokenPipeError: channel closed",
         "log_level": "warning"}
    ]  # fmt: skip


async def test_recent_ids_remember_the_last_4096() -> None:
    """A message id seen among the last 4096 is a repeat; an older one is forgotten; none is
    never a repeat."""
    recent = _RecentIds()
    assert not recent.is_repeat("")
    assert not recent.is_repeat("")
    for n in range(4096):
        assert not recent.is_repeat(f"m{n}")
    assert recent.is_repeat("m0")  # still among the last 4096
    assert not recent.is_repeat("new")  # 4097th: m0 is forgotten now
    assert not recent.is_repeat("m0")
    reader = _TopicReader(TOPIC, ZERO_ID)
    assert not reader.is_repeat("m1")
    assert reader.is_repeat("m1")


async def test_no_trim_notice_when_resuming_from_the_first_entry_left(
    redis_url: str, namespace: str
) -> None:
    """Resuming at the first entry a trimmed stream still has misses nothing: no notice.

    Resuming from before it does miss what was trimmed, and says so.
    """
    key = Keys(namespace).stream(TOPIC)
    async with fanout_on(redis_url, namespace) as (fanout, redis, _heard):
        for ms in (1, 2, 3):
            await redis.xadd(key, entry_fields(b"%d" % ms, user="alice", message_id=f"m{ms}",
                                               raw=False), id=f"{ms}-0")  # fmt: skip
        await redis.xtrim(key, maxlen=2, approximate=False)

        stream = fanout.follow(TOPIC, (2, 0))
        first = await anext(stream)
        await stream.aclose()
        assert isinstance(first, Batch)
        assert _messages(first) == [b"3"]

        stream = fanout.follow(TOPIC, (1, 0))
        first = await anext(stream)
        await stream.aclose()
        assert first == TrimNotice((2, 0))


@pytest.mark.parametrize(
    ("budget", "entry_bytes", "entries"),
    [
        pytest.param(1 << 20, 65536, 16, id="budget-over-entry-size"),
        pytest.param(1 << 20, 1 << 20, 1, id="one-entry-fills-it"),
        pytest.param(100, 1000, 1, id="at-least-one"),
        pytest.param(1 << 20, 10, 1024, id="at-most-a-page"),
        pytest.param(1 << 20, 0, 1024, id="empty-entries"),
        pytest.param(1000, 1, 1000, id="one-byte-entries"),
    ],
)
def test_catch_up_pages_fit_the_inbox_budget(budget: int, entry_bytes: int, entries: int) -> None:
    """A catch-up page holds as many entries as fit the budget: at least 1, at most 1024."""
    assert _page_entries(budget, entry_bytes) == entries


def test_subscriber_counts_follow_sessions_joining_and_leaving() -> None:
    """count(+1/-1) keeps a live count per topic, drops topics at zero, and reports each change."""
    changes: list[dict[str, int]] = []
    fanout = Fanout(
        cast(Redis, None), "redis://unused", Keys("t"), inbox_bytes=1,  # count() uses no Redis
        on_change=lambda: changes.append(fanout.subscriber_counts()),
    )  # fmt: skip
    fanout.count("a", 1)
    fanout.count("a", 1)
    fanout.count("b", 1)
    fanout.count("a", -1)
    fanout.count("a", -1)
    fanout.count("c", -1)
    assert changes == [{"a": 1}, {"a": 2}, {"a": 2, "b": 1}, {"a": 1, "b": 1}, {"b": 1}, {"b": 1}]


def test_plain_is_each_message_and_a_newline_raw_chunks_as_they_came() -> None:
    """raw() writes a line per message and a --raw chunk exactly as it was published;
    plain() is the same with control characters shown as escapes."""
    raw = Entry(id=(2, 0), data=b"chunk\x00", user="alice", message_id="r", received_ms=2,
                raw=True)  # fmt: skip
    batch = Batch(TOPIC, [_entry(1, b"a", b"b"), raw, _entry(3, b"c")])
    assert batch.raw() == b"a\nb\nchunk\x00c\n"
    assert batch.plain() == b"a\nb\nchunk\\x00c\n"
    assert batch.plain() is batch.plain()  # rendered once, for every subscriber
    assert batch.raw() is batch.raw()


@pytest.mark.usefixtures("fresh_logging")
async def test_an_overflowed_subscriber_catches_up_without_gap_or_repeat(
    redis_url: str, namespace: str
) -> None:
    """A subscriber that stops reading overflows its inbox, is logged as lagging, and then
    reads the rest from the stream: every message once, in order."""
    key = Keys(namespace).stream(TOPIC)
    redis = Redis.from_url(redis_url)
    try:
        async with Fanout(redis, redis_url, Keys(namespace), inbox_bytes=64) as fanout:
            stream = fanout.follow(TOPIC, None)
            first = asyncio.create_task(anext(stream))
            n = 0
            while not first.done():  # publish until the subscriber is live and got one
                await publish(redis, namespace, b"warm-%d" % n)
                n += 1
                await asyncio.wait([first], timeout=0.05)
            assert isinstance(first.result(), Batch)

            async def overflow_and_catch_up(sent: list[bytes]) -> list[bytes]:
                await publish(redis, namespace, *sent)  # ~500 bytes: far over the inbox
                newest: Any = await redis.xrevrange(key, count=1)
                last = newest[0][0]
                while fanout._readers[TOPIC].position != parse_id(last):
                    await asyncio.sleep(0.01)  # until the reader has offered all of them
                got: list[bytes] = []
                while sent[-1] not in got:
                    item = await anext(stream)
                    assert isinstance(item, Batch)
                    got += [m for e in item.entries for m in e.messages()]
                return [m for m in got if not m.startswith(b"warm")]

            sent = [b"m%03d" % i for i in range(100)]
            with capture_logs() as logs:
                assert await overflow_and_catch_up(sent) == sent
            assert fanout.lagged == 1
            # Lagging again is counted again: the count is of times, not of subscribers.
            again = [b"n%03d" % i for i in range(100)]
            assert await overflow_and_catch_up(again) == again
            assert fanout.lagged == 2
            await stream.aclose()
    finally:
        await redis.aclose()
    [lagging] = [log for log in logs if log["event"] == "subscriber_lagging"]
    assert lagging["topic"] == TOPIC
    given = first.result()
    assert isinstance(given, Batch)
    assert parse_id(lagging["position"]) == given.last_id  # the last it was given


async def test_following_without_redis_is_backend_unavailable(namespace: str) -> None:
    """If Redis cannot be reached when a subscriber starts, it is told so at once (exit 69)."""
    dead = Redis(unix_socket_path="/nonexistent/redis.sock", retry=Retry(NoBackoff(), 0))
    try:
        async with Fanout(dead, "unix:///nonexistent/redis.sock", Keys(namespace),
                          inbox_bytes=1 << 20) as fanout:  # fmt: skip
            with pytest.raises(BackendUnavailable) as caught:
                await anext(fanout.follow(TOPIC, None))
    finally:
        await dead.aclose()
    assert str(caught.value).startswith(
        f"backend unavailable: Redis did not answer while subscribing to '{TOPIC}' ("
    )
    assert "No such file or directory" in str(caught.value)


async def test_the_live_feed_drops_a_retried_append_and_keeps_the_topic(
    redis_url: str, namespace: str
) -> None:
    """Live, an entry stored twice (same message id) reaches a subscriber once, under its topic."""
    key = Keys(namespace).stream(TOPIC)
    topics: list[str] = []
    async with fanout_on(redis_url, namespace) as (fanout, redis, _heard):

        def express(batch: Batch) -> bool:
            topics.append(batch.topic)
            return True

        sub = Subscriber(fanout, express)
        await attach(redis, namespace, sub)
        for data, message_id in [(b"a", "r1"), (b"a", "r1"), (b"b", "r2")]:
            await redis.xadd(key, entry_fields(data, user="alice", message_id=message_id,
                                               raw=False))  # fmt: skip
        await sub.wait_for(b"b")
        await sub.stop()
    assert sorted(m for m in sub.received if not m.startswith(b"warm")) == [b"a", b"b"]
    assert set(topics) == {TOPIC}


async def until_parked(fanout: Fanout, task: asyncio.Task[object]) -> None:
    """Wait until a subscriber of TOPIC is parked in the live feed (``task`` still waiting)."""

    def parked() -> bool:
        reader = fanout._readers.get(TOPIC)
        return reader is not None and any(inbox._parked for inbox in reader.inboxes)

    while not parked():
        # Polling a state: the inbox has no event for "parked", only for "ready".
        await asyncio.wait([task], timeout=0.01)
        assert not task.done()


async def test_a_subscriber_started_before_the_topic_exists_gets_its_first_message(
    redis_url: str, namespace: str
) -> None:
    """With no stream yet, "only new messages" means from the very start: the first counts."""
    async with fanout_on(redis_url, namespace) as (fanout, redis, _heard):
        assert not await redis.exists(Keys(namespace).stream(TOPIC))
        stream = fanout.follow(TOPIC, None)
        first = asyncio.create_task(anext(stream))
        await until_parked(fanout, first)
        await publish(redis, namespace, b"first")
        batch = await asyncio.wait_for(first, 10)
        await stream.aclose()
    assert isinstance(batch, Batch)
    assert [m for e in batch.entries for m in e.messages()] == [b"first"]


async def test_an_error_inside_the_fanout_reaches_the_caller(
    redis_url: str, namespace: str
) -> None:
    """The fanout is a task group: an error in its body comes out as one, with the readers
    stopped, so it is neither lost nor swallowed."""
    readers: list[_TopicReader] = []

    async def fail_while_following() -> None:
        async with fanout_on(redis_url, namespace) as (fanout, _redis, _heard):
            waiting = asyncio.create_task(anext(fanout.follow(TOPIC, None)))
            await until_parked(fanout, waiting)
            readers.append(fanout._readers[TOPIC])
            waiting.cancel()
            raise LookupError("in the body")

    with pytest.raises(ExceptionGroup) as caught:
        await fail_while_following()
    assert caught.group_contains(LookupError, match="in the body")
    assert readers[0].scope.cancel_called
