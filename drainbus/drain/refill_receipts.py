"""Receipts for stale refills: the entries a refill evicted by an nginx refill guard belongs to.

A refill guard (:mod:`drainbus.drain.refill`) evicts a stale copy up to ``refill_window``
seconds after its purge, long after the purge's entries were acknowledged. So the drain
remembers, for each batch its local group carried out, which entries asked for each purge,
for that long and a little more; when a guard reports an eviction, a receipt marked
``refill`` is appended for each of those entries.

Kept small on purpose: a busy drain carries out thousands of purges a second and remembers
each for about 15 s. Per entry only its id is kept, in one mapping per batch; the purge line
and user a receipt quotes are read back from the stream (``fetch``) for the rare entry whose
refill is evicted. (A mapping of its own per purge and the entries' whole field dicts, then
their lines and users, made up much of the drain's memory through a large backlog.)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.exceptions import RedisError

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Row
from drainbus.drain.purges import Purge
from drainbus.drain.receipts import receipt, target_part

__all__ = ["RefillReceipts", "read_entries"]

log = structlog.get_logger(__name__)

_QUEUED = 1024  # refill receipts waiting to be written, at most
# How much longer than the refill window a purge is remembered: a window's last evictions
# are reported as it closes, a moment after. Every purge of a busy drain is held this long:
# 5 s here were a quarter of the memory a 1,000,000-purge backlog took.
_SLACK_S = 2.0


async def read_entries(redis: RedisClient, stream: str, ids: Sequence[bytes]) -> list[Row]:
    """The entries ``ids`` of ``stream``, in one round trip; those trimmed since are left out."""
    async with redis.pipeline(transaction=False) as pipe:  # reads: MULTI would read the same
        for entry_id in ids:
            pipe.xrange(stream, entry_id, entry_id)
        replies = await pipe.execute()
    return [row for reply in replies for row in reply or ()]


class RefillReceipts:
    """Remembers the local group's recent purges and writes the receipts of their refills.

    ``append`` writes receipt records (the drain's own receipt writer); ``fetch`` reads
    entries back by id (those trimmed meanwhile are left out); ``node`` names this node in
    the receipts. :meth:`evicted` is what a refill guard calls; :meth:`run` writes until
    cancelled.
    """

    def __init__(
        self,
        refill_window: float,
        *,
        node: str,
        append: Callable[[Sequence[dict[str, Any]]], Awaitable[None]],
        fetch: Callable[[Sequence[bytes]], Awaitable[list[Row]]],
    ) -> None:
        self._keep_for = refill_window + _SLACK_S
        self._node = node
        self._append = append
        self._fetch = fetch
        # (monotonic time, {purge: its entries' ids}) per batch, oldest first.
        self._batches: deque[tuple[float, dict[Purge, list[bytes]]]] = deque()
        self._out: MemoryObjectSendStream[tuple[str, Purge, int]] | None = None

    def remember(self, purges: Iterable[Purge], batch: Mapping[Purge, Sequence[Row]]) -> None:
        """Remember the entries of ``purges`` (done, from ``batch``); forget what aged out."""
        now = time.monotonic()
        batches = self._batches
        while batches and batches[0][0] < now - self._keep_for:
            batches.popleft()
        kept = {purge: [row[0] for row in batch[purge]] for purge in purges}
        if kept:
            batches.append((now, kept))

    def entries(self, purge: Purge) -> list[bytes]:
        """The ids of the entries of the latest batch that carried out ``purge``; empty if it
        is no longer remembered."""
        for _, kept in reversed(self._batches):
            ids = kept.get(purge)
            if ids is not None:
                return ids
        return []

    def evicted(self, target: str, purge: Purge, count: int) -> None:
        """A refill guard evicted ``count`` stale refills of ``purge`` on ``target``.

        Called on the event loop by the guard: queued, never blocking it.
        """
        if self._out is None:  # not running
            return
        try:
            self._out.send_nowait((target, purge, count))
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            log.warning(
                "drain_refill_receipt_dropped",
                target=target,
                count=count,
                reason="too many refill receipts queued; the count is in stats",
            )

    async def run(self) -> None:
        """Write the receipt of every eviction reported, until cancelled."""
        self._out, refills = anyio.create_memory_object_stream[tuple[str, Purge, int]](_QUEUED)
        async with self._out, refills:
            await self._write(refills)

    async def _write(self, refills: MemoryObjectReceiveStream[tuple[str, Purge, int]]) -> None:
        async for target, purge, count in refills:
            part = target_part(target, "evicted", count=count)
            ids = self.entries(purge)
            if not ids:  # it failed here, or its window closed over _SLACK_S late
                log.warning("drain_refill_receipt_unmatched", target=target, count=count,
                            reason="the purge's entries are no longer remembered")  # fmt: skip
                continue
            try:
                records = [
                    receipt(
                        entry_id=i,
                        fields=f,
                        node=self._node,
                        role="local",
                        targets=[part],
                        refill=True,
                    )
                    for i, f in await self._fetch(ids)
                ]
                await self._append(records)
            except (RedisError, OSError) as exc:  # the eviction happened; only the news is lost
                log.warning("drain_refill_receipt_failed", target=target, error=str(exc))
