"""The dead-letter stream: purges the drain gave up on, to inspect and replay.

Each dead letter keeps the original entry's fields (data, publisher, message id, time) plus
``origin_id``, ``group`` (which role failed), ``error`` and ``failed_at``. Replaying one
publishes its data to the topic again as a new entry and deletes the dead letter, in one
transaction. Every group sees the replay, not only the one that failed: purges are
idempotent, so the others merely repeat theirs.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Keys, format_id, parse_id, read_rows, rfc3339

__all__ = ["DeadLetter", "list_dead_letters", "replay_dead_letters"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of the dead-letter stream."""

    id: str
    origin_id: str
    group: str
    user: str
    error: str
    failed_at: str
    data: str


def _decode(raw_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    def text(name: bytes) -> str:
        return fields.get(name, b"").decode("utf-8", "replace")

    failed = fields.get(b"failed_at")
    return DeadLetter(
        id=format_id(parse_id(raw_id)),
        origin_id=text(b"origin_id"),
        group=text(b"group"),
        user=text(b"u"),
        error=text(b"error"),
        failed_at=rfc3339(int(failed)) if failed else "",
        data=text(b"d"),
    )


async def list_dead_letters(redis: RedisClient, keys: Keys, topic: str) -> list[DeadLetter]:
    """Every dead letter of ``topic``, oldest first."""
    rows = await read_rows(redis, keys.dead_letters(topic))
    return [_decode(raw_id, fields) for raw_id, fields in rows]


async def replay_dead_letters(
    redis: RedisClient, keys: Keys, topic: str, ids: list[str] | None
) -> list[str]:
    """Publish dead letters again (``ids``, or all when None); return the ids replayed.

    Raises KeyError naming the first id that is not in the dead-letter stream.
    """
    dead_key = keys.dead_letters(topic)
    rows = await read_rows(redis, dead_key)
    by_id = {format_id(parse_id(raw_id)): (raw_id, fields) for raw_id, fields in rows}
    wanted = list(by_id) if ids is None else ids
    for entry_id in wanted:
        if entry_id not in by_id:
            raise KeyError(entry_id)
    for entry_id in wanted:
        raw_id, fields = by_id[entry_id]
        entry = {
            "d": fields.get(b"d", b""),
            "u": fields.get(b"u", b""),
            "m": secrets.token_hex(8),
            "t": int(time.time() * 1000),
            "replay_of": entry_id,
        }
        async with redis.pipeline(transaction=True) as pipe:  # same slot: {topic} hash tag
            pipe.xadd(keys.stream(topic), entry)  # type: ignore[arg-type]
            pipe.xdel(dead_key, raw_id)
            await pipe.execute()
    return wanted
