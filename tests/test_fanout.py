"""The fan-out's express path: live batches written straight from the topic's reader.

These drive :class:`Fanout` directly on a real Redis, so each test can decide what the
subscriber's ``express`` function does: accept, decline (its channel is backed up) or fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from redis.asyncio import Redis

from drainbus.bus.fanout import Batch, Fanout, TrimNotice, _Inbox
from drainbus.bus.streams import ZERO_ID, Entry, Keys, StreamId, entry_fields

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
) -> AsyncIterator[tuple[Fanout, Redis, list[tuple[int, int]]]]:
    """A Fanout on a fresh namespace, the client it uses, and what ``on_express`` heard."""
    redis = Redis.from_url(redis_url)
    heard: list[tuple[int, int]] = []
    try:
        async with Fanout(
            redis,
            redis_url,
            Keys(namespace),
            inbox_bytes=1 << 20,
            on_express=lambda batch, sessions, messages: heard.append((sessions, messages)),
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
        assert heard == [(3, 3)]  # one call for the three sessions, not three
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
            replayed += [m for e in item.entries for m in e.messages()]
            if replayed[-1:] == [b"c"]:
                break
        await stream.aclose()
    assert replayed == [b"a", b"b", b"c"]
