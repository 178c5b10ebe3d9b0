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

from drainbus.bus.fanout import Batch, Fanout, TrimNotice
from drainbus.bus.streams import Keys, entry_fields

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
