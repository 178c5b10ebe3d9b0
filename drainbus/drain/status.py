"""What ``ssh bus stats`` shows: is the drain healthy, node by node."""

from __future__ import annotations

import json
import time
from typing import Any, cast

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Keys, rfc3339, stream_info, text

__all__ = ["drain_health"]


async def drain_health(redis: RedisClient, keys: Keys, topic: str) -> dict[str, Any]:
    """The drain topic's groups (lag, pending), dead letters, and each live node's status."""
    key = keys.stream(topic)
    info = await stream_info(redis, key)
    groups = []
    if info is not None:
        for group in await redis.xinfo_groups(key):
            lag = group.get("lag")
            groups.append(
                {
                    "group": text(group["name"]),
                    "lag": None if lag is None else int(lag),
                    "pending": int(group["pending"]),
                    "consumers": int(group["consumers"]),
                }
            )
    now_ms = int(time.time() * 1000)
    nodes = []
    names = cast(list[bytes], await redis.zrangebyscore(keys.drain_nodes, now_ms - 120_000, "+inf"))
    for name in names:
        raw = await redis.get(keys.drain_status(text(name)))
        if raw is None:
            continue
        status = json.loads(raw)
        last = status.get("last_purge_ms")
        status["last_purge"] = rfc3339(int(last)) if last else None
        nodes.append(status)
    return {
        "topic": topic,
        "messages": info.length if info else 0,
        "last_message": rfc3339(info.last_id[0]) if info and info.last_id[0] else None,
        "dead_letters": int(await redis.xlen(keys.dead_letters(topic))),
        "groups": groups,
        "nodes": nodes,
    }
