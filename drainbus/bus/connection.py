"""Redis clients made the way the bus needs them.

Commands share one pooled client. Every blocking reader gets a client of its own with one
connection, because a blocked XREAD holds its connection for the whole BLOCK time, and is
closed (not returned to a pool) when the reader is cancelled, so a half-read reply is never
handed to another command. (redis-py drops a connection whose command was interrupted, in
its plain, cluster and sentinel clients alike; closing the reader's client makes sure.)

URLs (:func:`parse_url`)::

    redis://[user:pass@]host[:port][/db]         one server, read by redis-py itself
    rediss://…                                   (TLS), unix://[user:pass@]/path/to/socket
    redis+cluster://[user:pass@]host:port[,host:port…][?options]
        Redis Cluster. The hosts are where to start: the client learns every node from them.
    redis+sentinel://[user:pass@]host:port[,host:port…]/SERVICE[/db][?options]
        The primary the sentinels at host:port… (default port 26379) name for SERVICE.
    rediss+cluster://…, rediss+sentinel://…     the same over TLS (to the sentinels too)

``user:pass`` logs in to the data nodes. Sentinels are asked without a password, unless
``?sentinel_password=`` (and ``sentinel_username=``) gives them one of their own: they
rarely share the data nodes' password. Other options, for ``rediss+`` only: ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``none``, ``optional``, ``required``).
Percent-encode special characters in names and passwords.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

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

from drainbus.errors import BackendUnavailable, ConfigError

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


# --- URLs ------------------------------------------------------------------------------

Kind: TypeAlias = Literal["single", "cluster", "sentinel"]

_SCHEMES: dict[str, tuple[Kind, bool]] = {  # scheme -> kind, TLS
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_CERT_REQS = ("none", "optional", "required")
_PASSWORD_OPTION = re.compile(r"([?&][^=&#]*password=)[^&#]*")


@dataclass(frozen=True, slots=True)
class BackendUrl:
    """A Redis URL taken apart. A ``single`` one is kept whole: redis-py reads it itself."""

    kind: Kind
    url: str = field(repr=False)
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    node_options: dict[str, Any] = field(default_factory=dict, repr=False)
    """Client arguments for the data nodes: username, password, db, ssl, ssl_*."""
    sentinel_options: dict[str, Any] = field(default_factory=dict, repr=False)
    """Client arguments for the sentinels: username and password if given, ssl, ssl_*."""


def parse_url(url: str) -> BackendUrl:
    """Take ``url`` apart (forms: the module docstring).

    Raises ConfigError saying what is wrong; the message shows the URL without passwords.
    """
    kind, tls = _SCHEMES.get(url.partition("://")[0] if "://" in url else "", (None, False))
    if kind is None:
        raise ConfigError(
            f"{redacted_url(url)!r} is not a Redis URL: use redis://, rediss:// or unix:// "
            "for one server, redis+cluster://HOST:PORT,… for a cluster, or "
            "redis+sentinel://HOST:PORT,…/SERVICE for Sentinel (rediss+… for TLS)"
        )
    if kind == "single":
        return BackendUrl("single", url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _invalid(url, str(exc)) from None
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    hosts = tuple(_address(url, text, _DEFAULT_PORT[kind]) for text in hostlist.split(","))
    options = _query_options(url, parts.query, kind, tls)
    sentinel_login = {
        name.removeprefix("sentinel_"): options.pop(name)
        for name in _SENTINEL_OPTIONS
        if name in options
    }
    node_options: dict[str, Any] = {**_login(userinfo), "ssl": tls, **options}
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    if kind == "cluster":
        if path not in ([], ["0"]):
            raise _invalid(url, "a cluster has only database 0: leave out the path")
        return BackendUrl("cluster", url, hosts, node_options=node_options)
    if len(path) not in (1, 2):
        raise _invalid(url, "name the service: redis+sentinel://HOST:PORT,…/SERVICE[/DB]")
    if len(path) == 2:
        node_options["db"] = _number(url, path[1], "database", 0, 2**31 - 1)
    tls_options = {name: value for name, value in node_options.items() if name.startswith("ssl")}
    return BackendUrl(
        "sentinel",
        url,
        hosts,
        service=path[0],
        node_options=node_options,
        sentinel_options={**sentinel_login, **tls_options},
    )


def _address(url: str, text: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[ipv6][:port]`` -> (host, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        if port and not port.startswith(":"):
            raise _invalid(url, f"{text!r} is not [IPV6]:PORT")
        port = port[1:]
    else:
        host, _, port = text.partition(":")
    if not host:
        raise _invalid(url, f"a host is missing in {text!r}: give HOST:PORT[,HOST:PORT…]")
    return host, _number(url, port, "port", 1, 65535) if port else default_port


def _number(url: str, text: str, what: str, low: int, high: int) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise _invalid(url, f"{what} {text!r} is not a number from {low} to {high}")
    return int(text)


def _login(userinfo: str) -> dict[str, str]:
    """``user:password`` (either may be empty) -> the client arguments it sets."""
    user, _, password = userinfo.partition(":")
    login = {"username": unquote(user), "password": unquote(password)}
    return {name: value for name, value in login.items() if value}


def _query_options(url: str, query: str, kind: Kind, tls: bool) -> dict[str, str]:
    allowed = (_SENTINEL_OPTIONS if kind == "sentinel" else ()) + (_TLS_OPTIONS if tls else ())
    options = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in _TLS_OPTIONS and not tls:
            raise _invalid(url, f"{name} is for TLS: use rediss+{kind}://")
        if name not in allowed:
            takes = ", ".join(allowed) if allowed else "no options"
            raise _invalid(url, f"unknown option {name!r} (this URL takes {takes})")
        options[name] = value
    if options.get("ssl_cert_reqs", "required") not in _CERT_REQS:
        raise _invalid(url, f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
    return options


def _invalid(url: str, problem: str) -> ConfigError:
    return ConfigError(f"Redis URL {redacted_url(url)!r} is invalid: {problem}")


def redacted_url(url: str) -> str:
    """``url`` without its passwords (user info, ``…password=`` options), for logs and errors."""
    scheme, sep, rest = url.partition("://")
    address, query_mark, query = rest.partition("?")
    if "@" in address:  # the last "@" ends the user info, whatever the password holds
        address = "***@" + address.rpartition("@")[2]
    return scheme + sep + address + _PASSWORD_OPTION.sub(r"\1***", query_mark + query)
