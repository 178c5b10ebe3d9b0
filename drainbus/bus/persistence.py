"""Watching Redis's own persistence: a failed AOF write or RDB save is a purge a restart loses.

Redis keeps accepting writes while its append-only file or snapshot cannot be written (until
``stop-writes-on-bgsave-error`` stops them, for RDB only), so a bus that looks healthy may be
one restart away from losing what it stored. :func:`watch_persistence` reads ``INFO
persistence`` every ``interval`` seconds and sets ``drainbus_redis_persistence_failing{check}``
to 1 while a check fails; the example rules alert on it. On Redis Cluster every primary
answers, and a check fails if it fails on any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import structlog
from prometheus_client import Gauge
from redis.exceptions import RedisError

from drainbus.bus.connection import RedisClient
from drainbus.metrics import REGISTRY

__all__ = ["CHECKS", "PERSISTENCE_FAILING", "failing_checks", "watch_persistence"]

log = structlog.get_logger(__name__)

CHECKS: Mapping[str, str] = {
    "aof_last_write": "aof_last_write_status",
    "aof_last_bgrewrite": "aof_last_bgrewrite_status",
    "rdb_last_bgsave": "rdb_last_bgsave_status",
}
"""The label of each check and the ``INFO persistence`` field it reads (``ok`` or ``err``)."""

PERSISTENCE_FAILING = Gauge(
    "drainbus_redis_persistence_failing",
    "1 while Redis reports this persistence check failed (INFO persistence), else 0",
    ["check"], registry=REGISTRY,
)  # fmt: skip


def failing_checks(info: Mapping[str, Any]) -> dict[str, bool]:
    """Each check's state in ``INFO persistence`` as redis-py returns it: one server's
    fields, or (Cluster) a map of node to fields. A field a server does not report is not
    counted as failing."""
    servers = (
        list(info.values()) if info and all(isinstance(v, dict) for v in info.values()) else [info]
    )
    return {
        check: any(str(server.get(field, "ok")) != "ok" for server in servers)
        for check, field in CHECKS.items()
    }


async def watch_persistence(redis: RedisClient, interval: float) -> None:
    """Update ``drainbus_redis_persistence_failing`` every ``interval`` seconds, until
    cancelled. A failed read is logged and leaves the last values."""
    while True:
        try:
            info = await redis.info("persistence")
        except (RedisError, OSError) as exc:
            log.warning("persistence_check_failed", error=str(exc), retry_in=interval)
        else:
            for check, failing in failing_checks(info).items():
                PERSISTENCE_FAILING.labels(check).set(int(failing))
                if failing:
                    log.error("redis_persistence_failing", check=check)
        await anyio.sleep(interval)
