"""Which node has how many live subscribers on which topic, for ``ls``.

Each node keeps a hash ``topic -> count`` that expires unless refreshed, and its name in a
sorted set scored by the last refresh. A node that dies stops refreshing and drops out of
the counts within ``3 * interval`` without anyone cleaning up after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import anyio
import structlog
from redis.exceptions import RedisError

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Keys, text

__all__ = ["Presence"]

log = structlog.get_logger(__name__)

_COALESCE = 0.2  # seconds: a burst of joins and leaves becomes one write


class Presence:
    """Publishes this node's subscriber counts and sums every live node's."""

    def __init__(
        self,
        redis: RedisClient,
        keys: Keys,
        node: str,
        counts: Callable[[], dict[str, int]],
        *,
        interval: float = 10.0,
    ) -> None:
        self.node = node
        self._redis = redis
        self._keys = keys
        self._counts = counts
        self._interval = interval
        self._changed = anyio.Event()

    def changed(self) -> None:
        """Ask for the counts to be written soon."""
        self._changed.set()

    async def run(self) -> None:
        """Refresh forever: on every change (coalesced) and every ``interval`` seconds."""
        try:
            while True:
                await self._write()
                with anyio.move_on_after(self._interval):
                    await self._changed.wait()
                    await anyio.sleep(_COALESCE)
                self._changed = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self._withdraw()

    async def _write(self) -> None:
        key = self._keys.node_subscribers(self.node)
        ttl_ms = int(self._interval * 3000)
        counts = self._counts()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if counts:
                    pipe.hset(key, mapping=counts)  # type: ignore[arg-type]
                    pipe.pexpire(key, ttl_ms)
                await pipe.execute()
            now_ms = int(time.time() * 1000)
            await self._redis.zadd(self._keys.nodes, {self.node: now_ms})
            await self._redis.zremrangebyscore(self._keys.nodes, "-inf", now_ms - ttl_ms)
        except (RedisError, OSError) as exc:
            log.warning("presence_write_failed", error=str(exc))

    async def _withdraw(self) -> None:
        try:
            await self._redis.delete(self._keys.node_subscribers(self.node))
            await self._redis.zrem(self._keys.nodes, self.node)
        except (RedisError, OSError) as exc:
            log.warning("presence_withdraw_failed", error=str(exc))

    async def subscribers(self) -> dict[str, int]:
        """Topic -> live subscribers summed over every node seen in the last 3 intervals."""
        since = int(time.time() * 1000 - self._interval * 3000)
        nodes = cast(list[bytes], await self._redis.zrangebyscore(self._keys.nodes, since, "+inf"))
        totals: dict[str, int] = {}
        for node in nodes:
            name = text(node)
            counts = await self._redis.hgetall(self._keys.node_subscribers(name))
            for topic, count in counts.items():
                totals[text(topic)] = totals.get(text(topic), 0) + int(count)
        return totals
