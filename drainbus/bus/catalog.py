"""What ``ls`` reports about topics: size, last message, subscribers, consumer groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Keys, format_id, rfc3339, stream_info, text

__all__ = ["GroupSummary", "TopicSummary", "describe_topics", "known_topics"]


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """A consumer group on a topic: how far behind it is and how much it holds unacked."""

    name: str
    lag: int | None  # None when Redis cannot tell (entries were trimmed past the group)
    pending: int
    consumers: int


@dataclass(frozen=True, slots=True)
class TopicSummary:
    """One ``ls`` row."""

    topic: str
    entries: int  # stored stream entries: a burst from one pub is one packed entry
    last_id: str | None
    last_time: str | None
    subscribers: int
    dead_letters: int
    groups: list[GroupSummary] = field(default_factory=list)


async def known_topics(redis: RedisClient, keys: Keys) -> list[str]:
    """Every topic ever published to on this bus, sorted."""
    names = await redis.smembers(keys.topics)
    return sorted(text(n) for n in names)


async def describe_topics(
    redis: RedisClient, keys: Keys, topics: list[str], subscribers: dict[str, int]
) -> list[TopicSummary]:
    """Summaries for ``topics`` (skipping ones whose stream no longer exists)."""
    summaries = []
    for topic in topics:
        key = keys.stream(topic)
        info = await stream_info(redis, key)
        if info is None:
            continue
        groups = [
            GroupSummary(
                name=text(g["name"]),
                lag=None if g.get("lag") is None else int(g["lag"]),
                pending=int(g["pending"]),
                consumers=int(g["consumers"]),
            )
            for g in await redis.xinfo_groups(key)
        ]
        has_last = info.last_id != (0, 0)
        summaries.append(
            TopicSummary(
                topic=topic,
                entries=info.length,
                last_id=format_id(info.last_id) if has_last else None,
                last_time=rfc3339(info.last_id[0]) if has_last else None,
                subscribers=subscribers.get(topic, 0),
                dead_letters=int(await redis.xlen(keys.dead_letters(topic))),
                groups=groups,
            )
        )
    return summaries
