"""Where each drain entry ends: acknowledged or dead-lettered, its receipt always written first.

The daemon decides what happens to an entry; this records it in Redis in the order that keeps
the guarantees: an entry's receipt is appended before the entry is acknowledged or moved to
the dead-letter stream (so no acknowledged purge lacks its receipt), and a dead letter is
added and acknowledged in one transaction (so a crash between them cannot lose the entry).
It also remembers the last error of each entry still pending, for the dead letter it may
become after ``max_deliveries``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Final

import structlog

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Row
from drainbus.drain.purges import Purge
from drainbus.drain.receipt_writer import ReceiptWriter
from drainbus.drain.receipts import receipt, target_part
from drainbus.drain.retry import Outcome
from drainbus.drain.roles import DrainStats, Role, purge_kind

__all__ = ["Ledger"]

log = structlog.get_logger("drainbus.drain.daemon")

_DEAD_LETTER_MAX: Final = 100_000


class Ledger:
    """Acknowledges, dead-letters and writes receipts for one drain node's entries."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        stream: str,
        dead_letters: str,
        receipts: ReceiptWriter,
        node: str,
        stats: DrainStats,
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._dead = dead_letters
        self._receipts = receipts
        self._node = node
        self._stats = stats
        self.last_error: dict[bytes, str] = {}  # entry id -> why it is still pending

    async def ack(self, role: Role, ids: list[bytes]) -> None:
        """Acknowledge ``ids`` in ``role``'s group (receipts already written)."""
        await self._redis.xack(self._stream, role.group, *ids)
        for entry_id in ids:
            self.last_error.pop(entry_id, None)
        self._stats.entries_acked += len(ids)

    async def write_receipts(
        self, role: Role, receipts: Sequence[tuple[Row, Sequence[dict[str, Any]]]]
    ) -> None:
        """Append the receipts of these entries (entry, target parts) before any is acked.

        A failure raises (RedisError): the batch is then not acknowledged and is delivered
        again, so no acknowledged purge lacks its receipt.
        """
        await self._receipts.append(
            [
                receipt(
                    entry_id=entry_id,
                    fields=fields,
                    node=self._node,
                    role=role.name,
                    targets=targets,
                )
                for (entry_id, fields), targets in receipts
            ]
        )

    async def dead_letter(
        self, role: Role, row: Row, error: str, *, receipt_written: bool = False
    ) -> None:
        """Move ``row`` to the dead-letter stream with ``error``, and acknowledge it."""
        entry_id, fields = row
        if not receipt_written:
            part = target_part("(drain)", "dead-lettered", error=error[:2000])
            await self.write_receipts(role, [(row, [part])])
        record: dict[Any, Any] = {
            **fields,
            "origin_id": entry_id,
            "group": role.group,
            "error": error[:2000],
            "failed_at": int(time.time() * 1000),
        }
        # One transaction: without it only a crash between the two commands shows; the
        # bound (approximate) keeps a flood of dead letters from filling Redis.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self._dead, record, maxlen=_DEAD_LETTER_MAX, approximate=True)
            pipe.xack(self._stream, role.group, entry_id)
            await pipe.execute()
        self.last_error.pop(entry_id, None)
        self._stats.dead_lettered += 1
        self._stats.last_error = error
        log.error("drain_dead_letter", group=role.group, entry=entry_id.decode(), error=error)

    async def settle(
        self,
        role: Role,
        batch: Mapping[Purge, list[Row]],
        outcomes: Sequence[Outcome],
        acked_early: set[int],
        *,
        retry_after: float,
    ) -> tuple[list[bytes], dict[str, int], dict[str, int]]:
        """Record each purge's outcome: the entry ids to acknowledge (done, and not already
        acknowledged per call), dead letters for refusals, one warning for what is retried.
        Returns (ids to ack, purges per result, purges per kind)."""
        acked: list[bytes] = []
        results: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        retry_errors: list[str] = []
        retry_entries = 0
        debug = log.debug  # looked up once: each lookup on the lazy logger binds it anew
        # strict: one outcome per purge, always (apply_to_targets' contract).
        for i, (purge, outcome) in enumerate(zip(batch, outcomes, strict=True)):
            entries = batch[purge]
            results[outcome.status] += 1
            kind = purge_kind(purge)
            kinds[kind] += 1
            debug("drain_purge", group=role.group, kind=kind, result=outcome.status,
                      entries=len(entries), evicted=outcome.evicted,
                      error=outcome.error)  # fmt: skip
            if outcome.status == "done":
                acked += [] if i in acked_early else [r[0] for r in entries]
                self._stats.count(purge)
            elif outcome.status == "permanent":
                for row in entries:
                    await self.dead_letter(
                        role, row, outcome.error or "refused by the target", receipt_written=True
                    )
            else:
                self._stats.last_error = outcome.error
                retry_errors.append(outcome.error or "failed")
                retry_entries += len(entries)
                for row in entries:
                    self.last_error[row[0]] = outcome.error or "failed"
        if retry_errors:
            log.warning(
                "drain_purge_retry_later",
                group=role.group,
                purges=len(retry_errors),
                entries=retry_entries,
                error=retry_errors[0],
                retry_after=retry_after,
            )
        return acked, dict(results), dict(kinds)
