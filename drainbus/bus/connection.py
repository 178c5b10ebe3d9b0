"""Redis clients made the way the bus needs them.

Commands share one pooled client. Every blocking reader gets a client of its own with one
connection, because a blocked XREAD holds its connection for the whole BLOCK time, and is
closed (not returned to a pool) when the reader is cancelled, so a half-read reply is never
handed to another command. (redis-py drops a connection whose command was interrupted, in
its plain, cluster and sentinel clients alike; closing the reader's client makes sure.)

URLs are taken apart by :mod:`drainbus.backend_url`.

asyncio on purpose: redis-py's async clients (``redis.asyncio``) run on asyncio only; the
bus reaches them from anyio code, whose asyncio backend is the one the node runs on.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from drainbus.backend_url import BackendUrl, parse_url, redacted_url
from drainbus.errors import BackendUnavailable

__all__ = [
    "BLOCK_MS",
    "RETRYABLE",
    "BackendUrl",
    "ClusterUnreachable",
    "RedisClient",
    "backend_error",
    "command_client",
    "parse_url",
    "reader_client",
    "redacted_url",
]

RedisClient: TypeAlias = Redis | RedisCluster
"""What the bus talks to: one server or a sentinel-managed primary (Redis), or a cluster."""

# XREAD BLOCK time. Short, so a reader notices cancellation and dead connections quickly;
# the socket timeout must stay above it or every idle read would time out.
BLOCK_MS = 2000
_SOCKET_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 5.0

RETRYABLE = (
    RedisConnectionError,  # also Sentinel's MasterNotFoundError and ClusterUnreachable below
    RedisTimeoutError,
    ClusterError,  # CLUSTERDOWN, MASTERDOWN (a failover is running), redirections exhausted
    TryAgainError,  # a slot is being migrated
    ReadOnlyError,  # a write reached a primary that was just demoted to replica
    ConnectionError,
    OSError,
)
"""Errors that mean "Redis is away or failing over: the same command may work shortly"."""


class ClusterUnreachable(RedisConnectionError):
    """No cluster node gave a usable slot map (all unreachable, or slots uncovered).

    redis-py reports this as RedisClusterException, which is no RedisError; every caller in
    drainbus handles RedisError, so the cluster client raises this instead.
    """


def command_client(url: str) -> RedisClient:
    """A pooled client for ordinary commands (XADD, XRANGE, XINFO, …).

    It retries a command up to twice on a broken connection. A retried XADD can store a
    message twice; each entry carries a message id so readers drop the repeat. Raises
    ConfigError if ``url`` is malformed.
    """
    return _client(
        parse_url(url),
        socket_timeout=_SOCKET_TIMEOUT,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        health_check_interval=30,
        max_connections=256,  # per node, in a cluster
    )


def reader_client(url: str) -> RedisClient:
    """A client for one blocking XREAD loop, holding one connection. Raises ConfigError."""
    return _client(
        parse_url(url),
        single_connection=True,
        socket_timeout=BLOCK_MS / 1000 + _SOCKET_TIMEOUT,
        socket_connect_timeout=_CONNECT_TIMEOUT,
    )


def _client(target: BackendUrl, *, single_connection: bool = False, **options: Any) -> RedisClient:
    # Cluster and Sentinel clients cannot pin one connection, but they open connections only
    # as commands need them: a loop issuing one command at a time holds one (per cluster
    # node it talks to).
    if target.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in target.hosts]
        return _Cluster(startup_nodes=nodes, **target.node_options, **options)
    if target.kind == "sentinel":
        sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
            target.hosts,
            sentinel_kwargs={
                # Sentinels answer at once, and discovery tries the next one itself.
                "socket_timeout": _CONNECT_TIMEOUT,
                "socket_connect_timeout": _CONNECT_TIMEOUT,
                "retry": Retry(NoBackoff(), retries=0),
                **target.sentinel_options,
            },
        )
        primary: _SentinelPrimary = sentinel.master_for(
            target.service, redis_class=_SentinelPrimary, **target.node_options, **options
        )
        return primary
    return Redis.from_url(target.url, single_connection_client=single_connection, **options)


class _Cluster(RedisCluster):
    """A cluster client whose "cannot map the cluster" is a RedisError (ClusterUnreachable)."""

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnreachable(str(exc)) from exc

    async def aclose(self) -> None:
        """Close the connections to every node, also while waiting to map the cluster again.

        RedisCluster.aclose() does nothing after a connection error has marked the map stale,
        which would leave the connections to the other nodes open. redis-py also calls it to
        force a new map, so connections a command in flight is using are left to it.
        """
        if not self._initialize:
            await super().aclose()
            return
        manager = self.nodes_manager
        for node in [*manager.nodes_cache.values(), *manager.startup_nodes.values()]:
            await node.disconnect_free_connections()


class _SentinelPrimary(Redis):
    """The primary's client from ``Sentinel.master_for``; closing it closes the sentinels'."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            pool = self.connection_pool
            if isinstance(pool, SentinelConnectionPool):
                await pool.sentinel_manager.aclose()


def backend_error(exc: RedisError | OSError, doing: str) -> BackendUnavailable:
    """Turn a client exception into the error a user sees (exit 69)."""
    detail = str(exc)
    if isinstance(exc, MasterNotFoundError):  # then redis-py appends each sentinel's repr
        detail = detail.partition(" : ")[0]
    return BackendUnavailable(f"backend unavailable: Redis did not answer while {doing} ({detail})")
