"""Redis clients made the way the bus needs them.

Commands share one pooled client. Every blocking reader gets a client of its own with one
connection, because a blocked XREAD holds its connection for the whole BLOCK time, and is
closed (not returned to a pool) when the reader is cancelled, so a half-read reply is never
handed to another command.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from drainbus.errors import BackendUnavailable

__all__ = ["BLOCK_MS", "RETRYABLE", "backend_error", "command_client", "reader_client"]

# XREAD BLOCK time. Short, so a reader notices cancellation and dead connections quickly;
# the socket timeout must stay above it or every idle read would time out.
BLOCK_MS = 2000
_SOCKET_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 5.0

RETRYABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def command_client(url: str) -> Redis:
    """A pooled client for ordinary commands (XADD, XRANGE, XINFO, …).

    It retries a command up to twice on a broken connection. A retried XADD can store a
    message twice; each entry carries a message id so readers drop the repeat.
    """
    return Redis.from_url(
        url,
        socket_timeout=_SOCKET_TIMEOUT,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        health_check_interval=30,
        max_connections=256,
    )


def reader_client(url: str) -> Redis:
    """A single-connection client for one blocking XREAD loop."""
    return Redis.from_url(
        url,
        socket_timeout=BLOCK_MS / 1000 + _SOCKET_TIMEOUT,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        single_connection_client=True,
    )


def backend_error(exc: RedisError | OSError, doing: str) -> BackendUnavailable:
    """Turn a client exception into the error a user sees (exit 69)."""
    return BackendUnavailable(f"backend unavailable: Redis did not answer while {doing} ({exc})")
