"""One bus node: the SSH front door on the bus, plus the drain when it has targets.

``drainbus serve`` runs exactly this; so do the tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import anyio
import structlog

from drainbus.bus import Bus, open_bus
from drainbus.config import Settings
from drainbus.drain.build import open_drain
from drainbus.drain.daemon import Drain
from drainbus.drain.validate import purge_line_check
from drainbus.http.app import build_app
from drainbus.http.server import serve_http
from drainbus.http.tokens import TokenStore
from drainbus.identity import UserKeys, load_or_create_host_key
from drainbus.metrics import NodeCollector, serve_metrics
from drainbus.ssh.server import FrontDoor

__all__ = ["Node", "open_node"]

log = structlog.get_logger(__name__)


@dataclass
class Node:
    """A running node's parts."""

    bus: Bus
    door: FrontDoor
    users: UserKeys
    drain: Drain | None
    metrics_port: int | None = None
    http_port: int | None = None  # the purge API's port, when [http] listen is set here

    @property
    def port(self) -> int:
        """The SSH port actually bound (useful with port 0)."""
        return self.door.port


@asynccontextmanager
async def open_node(settings: Settings, *, worker: int | None = None) -> AsyncIterator[Node]:
    """Start a node; stop it (stop accepting, end sessions, stop Redis) on exit.

    ``worker``: this node's index when it is one of the worker processes of ``drainbus serve
    --workers N`` (see :mod:`drainbus.supervisor`): it then shares the SSH port with the others
    (SO_REUSEPORT), and only worker 0 runs the drain, so purges are carried out once, and
    the HTTP purge API (:mod:`drainbus.http.server` says why).

    Raises ConfigError (bad key files), StartupError (port, embedded server) or
    BackendUnavailable (Redis) before anything is served.
    """
    host_key = load_or_create_host_key(settings.server.host_keys_dir)
    log.info("host_key", fingerprint=host_key.get_fingerprint(),
             path=str(settings.server.host_keys_dir))  # fmt: skip
    users = UserKeys(settings.server.users_dir, settings.server.admins)
    users.load()
    tokens = TokenStore(settings.server.users_dir, settings.server.admins)
    tokens.reload_if_changed()
    users.add_listener(tokens.reload)  # SIGHUP re-reads the tokens with the keys
    # pub on the drain topic checks every line, whether or not this node runs the drain.
    checks = {settings.drain.topic: purge_line_check(settings.drain.scope_rule)}
    async with AsyncExitStack() as stack:
        bus = await stack.enter_async_context(open_bus(settings))
        door = await stack.enter_async_context(
            FrontDoor(
                settings, bus, users, host_key, line_checks=checks, reuse_port=worker is not None
            )
        )
        task_group = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(task_group.cancel_scope.cancel)
        drain = None
        if settings.drain.enabled and worker in (None, 0):
            drain = await stack.enter_async_context(
                open_drain(settings, redis=bus.redis, redis_url=bus.url)
            )
            task_group.start_soon(drain.run)
            await drain.ready.wait()
        task_group.start_soon(_reload_users, users, tokens, settings.server.users_reload_interval)
        collector = NodeCollector(settings.drain.node, door=door, fanout=bus.fanout, drain=drain,
                                  persistence=bus.persistence)  # fmt: skip
        metrics_port = stack.enter_context(serve_metrics(settings.metrics_listen, collector))
        http_port = None
        if settings.http.listen and worker in (None, 0):
            app = build_app(settings, bus, tokens, door.access, checks)
            http_port = await stack.enter_async_context(
                serve_http(
                    settings.http,
                    app,
                    grace=settings.server.shutdown_grace,
                    limit=settings.server.max_connections,
                )
            )
        yield Node(bus, door, users, drain, metrics_port, http_port)


async def _reload_users(users: UserKeys, tokens: TokenStore, interval: float) -> None:
    while True:
        await anyio.sleep(interval)
        if users.reload_if_changed():
            log.info("reload", reason="users folder changed")
        if tokens.reload_if_changed():
            log.info("reload", reason="tokens changed")
