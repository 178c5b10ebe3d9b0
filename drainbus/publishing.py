"""Publishing as a user: the one path every front door stores messages through.

``ssh bus pub`` and the Cloudflare-compatible HTTP endpoint (:mod:`drainbus.http`) both end
here, so whatever the bus applies to a user's publishing (the publish metrics, per-user rate
limits and quotas) applies to both alike.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from drainbus.bus import Bus
from drainbus.bus.limits import PublishRefused
from drainbus.bus.streams import StreamId
from drainbus.metrics import MESSAGES_PUBLISHED, PUBLISH_SECONDS, topic_label

__all__ = ["publish_as"]


async def publish_as(
    bus: Bus,
    topic: str,
    messages: Sequence[bytes],
    *,
    user: str,
    raw: bool = False,
    pack: bool = False,
    confirm: bool = True,
) -> list[StreamId]:
    """Store ``messages`` on ``topic`` as ``user``, in one atomic batch; return the ids.

    The caller has checked access and each message already. Raises what
    :meth:`~drainbus.bus.publisher.Publisher.publish` raises: a
    :class:`~drainbus.errors.BackendError` (69) when Redis failed and nothing was stored,
    :class:`~drainbus.bus.limits.PublishRefused` (75) over a rate limit or quota.
    """
    started = time.perf_counter()
    try:
        ids = await bus.publisher.publish(
            topic, messages, user=user, raw=raw, pack=pack, confirm=confirm
        )
    except PublishRefused as refused:  # over a limit: its first messages were stored all the same
        MESSAGES_PUBLISHED.labels(topic_label(topic)).inc(refused.stored)
        raise
    PUBLISH_SECONDS.observe(time.perf_counter() - started)
    MESSAGES_PUBLISHED.labels(topic_label(topic)).inc(len(messages))
    return ids
