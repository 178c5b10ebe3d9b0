"""The distributed part of drainbus, on Redis streams. It knows nothing of SSH.

:class:`Bus` owns the Redis clients (and the embedded server when no URL is configured), the
publisher, the per-topic fan-out and the presence heartbeat.
"""

from __future__ import annotations

import os
import secrets
import socket
from types import TracebackType

import anyio
import structlog
from anyio.abc import TaskGroup
from redis.asyncio import Redis
from redis.exceptions import RedisError

from drainbus.bus.connection import backend_error, command_client
from drainbus.bus.embedded import EmbeddedRedis
from drainbus.bus.fanout import Fanout
from drainbus.bus.presence import Presence
from drainbus.bus.publisher import Publisher
from drainbus.bus.streams import Keys
from drainbus.config import Settings

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
        self._task_group: TaskGroup | None = None

    async def __aenter__(self) -> Bus:
        if not self.settings.redis_url:
            self.embedded = EmbeddedRedis(self.settings.data_dir)
            self.embedded.start()
            self.url = self.embedded.url
        try:
            self.redis: Redis = command_client(self.url)
            try:
                await self.redis.ping()
            except (RedisError, OSError) as exc:
                raise backend_error(exc, f"connecting to {_redacted(self.url)}") from exc
            self.publisher = Publisher(
                self.redis,
                self.keys,
                max_len=self.settings.topics.max_len,
                retention=self.settings.topics.retention,
            )
            self.fanout = Fanout(
                self.redis,
                self.url,
                self.keys,
                inbox_bytes=self.settings.server.subscriber_buffer_bytes,
                on_change=self._presence_changed,
            )
            self.presence = Presence(
                self.redis, self.keys, self.node, self.fanout.subscriber_counts
            )
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            await self.fanout.__aenter__()
            self._task_group.start_soon(self.presence.run)
        except BaseException:
            await self._close()
            raise
        log.info("bus_connected", redis=_redacted(self.url), node=self.node)
        return self

    def _presence_changed(self) -> None:
        self.presence.changed()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._task_group is not None:
                await self.fanout.__aexit__(None, None, None)
                self._task_group.cancel_scope.cancel()
                await self._task_group.__aexit__(None, None, None)
                self._task_group = None
            if hasattr(self, "redis"):
                await self.redis.aclose()
            if self.embedded is not None:
                self.embedded.stop()
                self.embedded = None


def _redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
