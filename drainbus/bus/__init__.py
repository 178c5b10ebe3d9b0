"""The distributed part of drainbus, on Redis streams. It knows nothing of SSH.

:class:`Bus` owns the Redis clients (and the embedded server when no URL is configured), the
publisher, the per-topic fan-out, the presence heartbeat and the persistence watch.
"""

from __future__ import annotations

import os
import secrets
import socket
from contextlib import AsyncExitStack
from types import TracebackType

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

__all__ = ["Bus"]

log = structlog.get_logger(__name__)


def new_node_name() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Bus:
    """Everything a bus node needs from Redis. Use as an async context manager.

    Entering starts the embedded server if ``settings.redis_url`` is unset (call from the
    main thread: the server is tied to the thread that starts it), connects, and checks with
    PING that Redis answers; raises BackendUnavailable or StartupError otherwise.
    """

    def __init__(self, settings: Settings, *, node: str | None = None) -> None:
        self.settings = settings
        self.node = node or new_node_name()
        self.keys = Keys(settings.namespace)
        self.embedded: EmbeddedRedis | None = None
        self.url = settings.redis_url or ""

    async def __aenter__(self) -> Bus:
        # Everything entered here is left in reverse order by the exit stack, in the task
        # that entered it (task groups require that).
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            if not self.settings.redis_url:
                self.embedded = EmbeddedRedis(
                    self.settings.data_dir, maxmemory=self.settings.embedded_maxmemory
                )
                self.embedded.start()
                stack.callback(self.embedded.stop)
                self.url = self.embedded.url
            self.redis: RedisClient = command_client(self.url)
            stack.push_async_callback(self.redis.aclose)
            try:
                await self.redis.ping()
            except (RedisError, OSError) as exc:
                raise backend_error(exc, f"connecting to {redacted_url(self.url)}") from exc
            topics = self.settings.topics
            self.persistence = Persistence(self.redis, timeout=topics.durability_timeout)
            await self.persistence.check_support(set(topics.durability_patterns.values()))
            self.publisher = Publisher(
                self.redis,
                self.keys,
                max_len=topics.max_len,
                retention=topics.retention,
                persistence=self.persistence,
                durability=topics.durability_for,
                limits=publish_limits(self.settings),
            )
            stack.callback(self.publisher.refusals.close)
            self.fanout = await stack.enter_async_context(
                Fanout(
                    self.redis,
                    self.url,
                    self.keys,
                    inbox_bytes=self.settings.server.subscriber_buffer_bytes,
                    max_message_bytes=self.settings.server.max_message_bytes,
                    on_change=self._presence_changed,
                    on_express=record_deliveries,
                )
            )
            self.presence = Presence(
                self.redis, self.keys, self.node, self.fanout.subscriber_counts
            )
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            task_group.start_soon(self.presence.run)
            task_group.start_soon(self.persistence.run)
            if self.settings.redis_idle_timeout:
                task_group.start_soon(
                    prune_idle_forever, self.redis, self.settings.redis_idle_timeout
                )
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._stack = stack
        log.info("bus_connected", redis=redacted_url(self.url), node=self.node)
        return self

    def _presence_changed(self) -> None:
        if hasattr(self, "presence"):
            self.presence.changed()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)
        self.embedded = None
