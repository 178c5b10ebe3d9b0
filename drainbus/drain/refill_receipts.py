"""Receipts for stale refills: the entries a refill evicted by an nginx refill guard belongs to.

A refill guard (:mod:`drainbus.drain.refill`) evicts a stale copy up to ``refill_window``
seconds after its purge, long after the purge's entries were acknowledged. So the drain
remembers, for each batch its local group carried out, which entries asked for each purge,
for that long and a little more; when a guard reports an eviction, a receipt marked
``refill`` is appended for each of those entries.

Kept small on purpose: a busy drain carries out thousands of purges a second and remembers
each for about 15 s. Per entry only its id, purge line and user are kept, in one mapping per
batch, so nothing is allocated per purge beyond that (a mapping of its own per purge and the
entries' whole field dicts made up much of the drain's memory through a large backlog).
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

from drainbus.bus.streams import Row
from drainbus.drain.purges import Purge
from drainbus.drain.receipts import receipt, target_part

__all__ = ["RefillReceipts"]

log = structlog.get_logger(__name__)

_QUEUED = 1024  # refill receipts waiting to be written, at most
_SLACK_S = 5.0  # how much longer than the refill window a purge is remembered

# An entry as remembered: (id, purge line, user).
_Entry = tuple[bytes, bytes, bytes]


class RefillReceipts:
    """Remembers the local group's recent purges and writes the receipts of their refills.

    ``append`` writes receipt records (the drain's own receipt writer); ``node`` names this
    node in them. :meth:`evicted` is what a refill guard calls; :meth:`run` writes until
    cancelled.
    """

    def __init__(
        self,
        refill_window: float,
        *,
        node: str,
        append: Callable[[Sequence[dict[str, Any]]], Awaitable[None]],
    ) -> None:
        self._keep_for = refill_window + _SLACK_S
        self._node = node
        self._append = append
        # (monotonic time, {purge: its entries}) per batch, oldest first.
        self._batches: deque[tuple[float, dict[Purge, list[_Entry]]]] = deque()
        self._out: MemoryObjectSendStream[tuple[str, Purge, int]] | None = None

    def remember(self, purges: Iterable[Purge], batch: Mapping[Purge, Sequence[Row]]) -> None:
        """Remember the entries of ``purges`` (done, from ``batch``); forget what aged out."""
        now = time.monotonic()
        batches = self._batches
        while batches and batches[0][0] < now - self._keep_for:
            batches.popleft()
        kept = {
            purge: [(i, f.get(b"d", b""), f.get(b"u", b"")) for i, f in batch[purge]]
            for purge in purges
        }
        if kept:
            batches.append((now, kept))

    def entries(self, purge: Purge) -> list[Row]:
        """The entries of the latest batch that carried out ``purge``, as rows (id, fields
        with the purge line and user); empty if it is no longer remembered."""
        for _, kept in reversed(self._batches):
            entries = kept.get(purge)
            if entries is not None:
                return [(i, {b"d": d, b"u": u}) for i, d, u in entries]
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
            records = [
                receipt(
                    entry_id=i,
                    fields=f,
                    node=self._node,
                    role="local",
                    targets=[part],
                    refill=True,
                )
                for i, f in self.entries(purge)
            ]
            try:
                await self._append(records)
            except (RedisError, OSError) as exc:  # the eviction happened; only the news is lost
                log.warning("drain_refill_receipt_failed", target=target, error=str(exc))
