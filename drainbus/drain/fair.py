"""A fair share of the drain for every publisher: a read-ahead backlog served round-robin.

The drain reads the stream ahead of its work, up to ``drain.read_ahead`` entries, and keeps
them here in one queue per publishing user (the entry's ``u`` field). Each batch takes one
entry from each waiting user in turn, so one user's burst of thousands cannot sit in front of
another user's single purge: that purge is in the next batch, near its front. Because a batch
interleaves the users, and the Cloudflare planner packs items into calls in batch order, each
call also carries a share of every waiting user's items.

The entries held here were delivered to this consumer and are pending in its group; they are
acknowledged when their batch is done, in any order. :func:`keep_claimed` resets their idle
time while they wait, so neither this node's reclaim nor another node's consumer in a shared
group takes them as abandoned. It claims with ``JUSTID``, which does not raise the delivery
count: waiting in the backlog is not a failed delivery. A crash loses only the memory; the
entries stay pending and the restarted consumer reads them back (ID ``0``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio
import structlog
from redis.exceptions import RedisError

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Row

__all__ = ["FairBacklog", "keep_claimed"]

log = structlog.get_logger(__name__)

_CLAIM_CHUNK = 5000  # ids per XCLAIM, so one command never carries the whole backlog


class FairBacklog:
    """Entries read but not yet handed to a batch, in one FIFO queue per publisher.

    ``limit`` is how many entries the consumer reads ahead at most (:attr:`room`); entries
    added beyond it (a restart's pending entries) are kept, never dropped.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Insertion order is the round-robin order: a user served and still waiting moves
        # to the back, a user who arrives joins at the back.
        self._queues: dict[bytes, deque[Row]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def users(self) -> int:
        """How many publishers have entries waiting."""
        return len(self._queues)

    @property
    def room(self) -> int:
        """How many more entries the consumer may read ahead now (0 when full)."""
        return max(0, self.limit - self._size)

    def add(self, rows: Iterable[Row]) -> None:
        """Queue ``rows`` (in stream order) behind their publishers' earlier entries."""
        for row in rows:
            user = row[1].get(b"u", b"")  # any default would do: it only keys their queue
            queue = self._queues.get(user)
            if queue is None:
                queue = self._queues[user] = deque()
            queue.append(row)
            self._size += 1

    def take(self, most: int) -> list[Row]:
        """Up to ``most`` entries, one per waiting user in turn, each user's in stream order.

        The users left waiting keep their turn order, so the next batch starts with the user
        after the last one served.
        """
        taken: list[Row] = []
        queues = self._queues
        if len(queues) == 1:  # one publisher: no one to share with, take a slice
            user, queue = next(iter(queues.items()))
            count = min(most, len(queue))
            taken = [queue.popleft() for _ in range(count)]
            if not queue:
                del queues[user]
        while len(taken) < most and queues:
            user = next(iter(queues))
            queue = queues.pop(user)
            taken.append(queue.popleft())
            if queue:
                queues[user] = queue  # to the back of the turn order
        self._size -= len(taken)
        return taken

    def ids(self) -> list[bytes]:
        """The ids of every entry held (for :func:`keep_claimed`)."""
        return [row[0] for queue in self._queues.values() for row in queue]

    def clear(self) -> None:
        """Forget every entry (their group is gone, so they can no longer be acknowledged)."""
        self._queues.clear()
        self._size = 0


async def keep_claimed(
    redis: RedisClient,
    stream: str,
    *,
    group: str,
    consumer: str,
    ids: Callable[[], Sequence[bytes]],
    every: float,
) -> None:
    """Reset the idle time of the entries ``ids()`` names, every ``every`` seconds, until
    cancelled, so that no consumer reclaims them while they wait or are in flight."""
    while True:
        await anyio.sleep(every)
        held = list(ids())
        try:
            for start in range(0, len(held), _CLAIM_CHUNK):
                chunk: list[Any] = list(held[start : start + _CLAIM_CHUNK])
                # min-idle-time 0: held entries are claimed however recently (1 ms: alike).
                await redis.xclaim(stream, group, consumer, 0, chunk, justid=True)
        except (RedisError, OSError) as exc:
            log.warning("drain_heartbeat_failed", group=group, error=str(exc))
