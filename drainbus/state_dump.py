"""What a running node logs on SIGUSR1: its state as structured lines, for an operator.

One line per thing, so a log search finds them (``state_*`` events): the node's totals, the
connections and sessions of each user, each topic reader of the fan-out with its
subscribers' lag, the drain's groups, and the Redis persistence state. Nothing here talks
to Redis: the dump shows what the process already knows, at once, even while Redis is away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from drainbus.bus.streams import format_id

if TYPE_CHECKING:
    from drainbus.bus.fanout import Fanout
    from drainbus.drain.daemon import Drain
    from drainbus.node import Node

__all__ = ["dump_drain", "dump_node"]

log = structlog.get_logger(__name__)


def dump_node(node: Node) -> None:
    """Log the state of ``node``: sessions, fan-out readers, drain, persistence."""
    door = node.door
    subscribers = node.bus.fanout.subscriber_counts()
    log.info(
        "state_node",
        node=node.bus.node,
        connections=door.connections,
        connections_starting=door.startups,
        sessions=sum(door.sessions_by_user.values()),
        subscribers=sum(subscribers.values()),
        persistence=node.bus.persistence.state.summary(),
    )
    for user, connections in sorted(door.connections_by_user.items()):
        log.info("state_user", user=user, connections=len(connections),
                 sessions=door.sessions_by_user.get(user, 0))  # fmt: skip
    _dump_fanout(node.bus.fanout, subscribers)
    if node.drain is not None:
        dump_drain(node.drain)


def _dump_fanout(fanout: Fanout, subscribers: dict[str, int]) -> None:
    readers = fanout.readers()
    for topic, position, queued, reading_stream in readers:
        log.info("state_reader", topic=topic, position=format_id(position),
                 subscribers=subscribers.get(topic, 0), reading_stream=reading_stream,
                 queued_bytes=queued[:20], queued_bytes_max=max(queued, default=0))  # fmt: skip
    read = {topic for topic, *_ in readers}
    for topic, count in sorted(subscribers.items()):
        if topic not in read:  # every subscriber still replaying history: no reader yet
            log.info("state_reader", topic=topic, position=None, subscribers=count,
                     reading_stream=count, queued_bytes=[], queued_bytes_max=0)  # fmt: skip


def dump_drain(drain: Drain) -> None:
    """Log the drain's state: totals, then each consumer group's lag and pending entries."""
    stats = drain.stats
    log.info("state_drain", node=drain.consumer, purges_done=stats.purges_done,
             entries_acked=stats.entries_acked, dead_lettered=stats.dead_lettered,
             retries=stats.retries, last_purge_ms=stats.last_purge_ms,
             last_error=stats.last_error)  # fmt: skip
    for group, (lag, pending) in sorted(stats.groups.items()):
        log.info("state_drain_group", group=group, lag=lag, pending=pending)
