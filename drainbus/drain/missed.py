"""What a drain group does about purges it can no longer read.

Entries a group never read can be trimmed away (its node was down or behind longer than
the topic's retention), or lost with the group itself (a failover, a Redis restarted empty).
Which purges went unread cannot be known. A local group then empties its node's caches
rather than serve stale pages; the cdn group only says so: ``purge_everything`` on a CDN is
too costly to do on a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from drainbus.drain.roles import DrainStats, Role
from drainbus.drain.targets import LocalCacheTarget

__all__ = ["act_on_missed"]

log = structlog.get_logger("drainbus.drain.daemon")


async def act_on_missed(
    role: Role, local_targets: Sequence[LocalCacheTarget], stats: DrainStats
) -> None:
    """Flush the local caches (a local role), or log and record the gap (the cdn role)."""
    if not role.flush_if_missed:
        stats.last_error = "purges were trimmed from the stream before this group read them"
        log.error(
            "drain_purges_missed",
            group=role.group,
            reason="purges were trimmed before this group read them (down or behind longer "
            "than the retention); purge the CDN by hand if stale pages matter",
        )
        return
    log.warning(
        "drain_missed_purges_flushing",
        group=role.group,
        reason="purges this node had not read were trimmed from the stream "
        "(down or behind longer than the retention); flushing the local caches instead of "
        "serving stale pages",
    )
    for target in local_targets:
        removed = await target.flush_all()
        log.warning("drain_flushed", target=target.name, removed=removed)
    stats.flushes += 1
