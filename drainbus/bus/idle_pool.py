"""Closing pooled Redis connections nobody has used for a while.

redis-py's pool opens a connection whenever every open one is busy and keeps it for good: a
burst of sessions leaves a process holding as many connections as the burst needed (27 after
one test run), and with workers x nodes they count against Redis ``maxclients``. The pool
hands out its most recently used connection first (LIFO), so after a burst the extra ones sit
unused; every ``idle_timeout / 2`` seconds this closes those idle for ``idle_timeout``.

"Idle since" is redis-py's own bookkeeping: with ``health_check_interval`` set (the command
client sets 30 s) each reply moves a connection's ``next_health_check`` to now + interval.
Only plain and Sentinel clients are pruned: a cluster client keeps one pool per node, in
another shape, and is left as it is. The clock is asyncio's loop time on purpose: it is
the one redis-py stamps ``next_health_check`` with.
"""

from __future__ import annotations

import asyncio

import anyio
import structlog
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool

from drainbus.bus.connection import RedisClient

__all__ = ["prune_idle", "prune_idle_forever"]

log = structlog.get_logger(__name__)


def _idle_for(connection: AbstractConnection, now: float) -> float:
    interval = connection.health_check_interval
    return now - (connection.next_health_check - interval) if interval else 0.0


async def prune_idle(redis: RedisClient, idle_timeout: float) -> int:
    """Close the pooled connections of ``redis`` unused for ``idle_timeout`` seconds.

    Returns how many were closed. The pool forgets them under its own lock, so none can be
    handed out meanwhile; it opens new ones as it needs them.
    """
    if not isinstance(redis, Redis):
        return 0
    pool: ConnectionPool = redis.connection_pool
    now = asyncio.get_running_loop().time()
    async with pool._lock:
        idle = [c for c in pool._available_connections if _idle_for(c, now) >= idle_timeout]
        for connection in idle:
            pool._available_connections.remove(connection)
    for connection in idle:
        await connection.disconnect()
    return len(idle)


async def prune_idle_forever(redis: RedisClient, idle_timeout: float) -> None:
    """Run :func:`prune_idle` every ``idle_timeout / 2`` seconds until cancelled."""
    while True:
        await anyio.sleep(max(0.1, idle_timeout / 2))
        if closed := await prune_idle(redis, idle_timeout):
            log.debug("redis_idle_closed", connections=closed)
