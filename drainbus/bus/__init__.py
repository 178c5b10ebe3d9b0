"""The distributed part of drainbus, on Redis streams. It knows nothing of SSH.

:func:`open_bus` connects a node; its :class:`Bus` holds the Redis client (and the embedded
server runs when no URL is configured), the publisher, the per-topic fan-out, the presence
heartbeat and the persistence watch.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import anyio
import structlog
from redis.exceptions import RedisError

from drainbus.bus.connection import RedisClient, backend_error, command_client, redacted_url
from drainbus.bus.embedded import EmbeddedRedis
from drainbus.bus.fanout import Fanout
from drainbus.bus.idle_pool import prune_idle_forever
from drainbus.bus.limits import publish_limits
from drainbus.bus.persistence import Persistence
from drainbus.bus.presence import Presence
from drainbus.bus.publisher import Publisher
from drainbus.bus.streams import Keys
from drainbus.config import Settings
from drainbus.metrics import record_deliveries

__all__ = ["Bus", "open_bus"]

log = structlog.get_logger(__name__)


def new_node_name() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass(eq=False)
class Bus:
    """A connected bus node: its Redis client and what it shares among sessions.

    Made only by :func:`open_bus`, whose context keeps every part running.
    """

    settings: Settings
    node: str
    keys: Keys
    url: str  # of the Redis in use: the configured one, or the embedded server's
    redis: RedisClient
    persistence: Persistence
    publisher: Publisher
    fanout: Fanout
    presence: Presence


@asynccontextmanager
async def open_bus(settings: Settings, *, node: str | None = None) -> AsyncIterator[Bus]:
    """Connect a bus node: everything it needs from Redis, until the context ends.

    Starts the embedded server if ``settings.redis_url`` is unset (call from the main thread:
    the server is tied to the thread that starts it), connects, and checks with PING that
    Redis answers; raises BackendUnavailable, ConfigError or StartupError otherwise. Parts
    are left in reverse order, in the task that entered them (task groups require that).
    """
    node = node or new_node_name()
    keys = Keys(settings.namespace)
    async with AsyncExitStack() as stack:
        url = settings.redis_url or ""
        if not url:
            embedded = EmbeddedRedis(settings.data_dir, maxmemory=settings.embedded_maxmemory)
            embedded.start()
            stack.callback(embedded.stop)
            url = embedded.url
        redis: RedisClient = command_client(url)
        stack.push_async_callback(redis.aclose)
        try:
            await redis.ping()
        except (RedisError, OSError) as exc:
            raise backend_error(exc, f"connecting to {redacted_url(url)}") from exc
        topics = settings.topics
        persistence = Persistence(redis, timeout=topics.durability_timeout)
        await persistence.check_support(set(topics.durability_patterns.values()))
        publisher = Publisher(
            redis,
            keys,
            max_len=topics.max_len,
            retention=topics.retention,
            persistence=persistence,
            durability=topics.durability_for,
            limits=publish_limits(settings),
        )
        stack.callback(publisher.refusals.close)
        # The fan-out reports subscriber changes to the presence heartbeat, which reads the
        # fan-out's counts: made one after the other, so the first report may find none.
        heartbeat: list[Presence] = []

        def subscribers_changed() -> None:
            for presence in heartbeat:
                presence.changed()

        fanout = await stack.enter_async_context(
            Fanout(
                redis,
                url,
                keys,
                inbox_bytes=settings.server.subscriber_buffer_bytes,
                max_message_bytes=settings.server.max_message_bytes,
                on_change=subscribers_changed,
                on_express=record_deliveries,
            )
        )
        presence = Presence(redis, keys, node, fanout.subscriber_counts)
        heartbeat.append(presence)
        task_group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(task_group.cancel_scope.cancel)
        task_group.start_soon(presence.run)
        task_group.start_soon(persistence.run)
        if settings.redis_idle_timeout:
            task_group.start_soon(prune_idle_forever, redis, settings.redis_idle_timeout)
        log.info("bus_connected", redis=redacted_url(url), node=node)
        yield Bus(settings, node, keys, url, redis, persistence, publisher, fanout, presence)
