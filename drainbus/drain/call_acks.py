"""Acknowledging a cdn batch call by call, not when the whole batch is done.

A cdn batch holds up to 4,096 entries, which Cloudflare takes in dozens of calls spread over
minutes of rate limit. Acknowledged only at the end, a crash after the ninth call had every
entry delivered again and the nine calls' items sent (and their rate limit spent) twice. So
the Cloudflare target tells the daemon after each call which purges that call finished
(:data:`drainbus.drain.retry.OnSettled`), and the ones done are acknowledged at once, their
receipts first as always, before the next call of that lane is sent. A crash then repeats at
most the calls in flight, and a call stuck retrying holds back only its own entries.
Failures and refusals are left to the end of the batch, where the daemon handles them as
before.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import structlog

from drainbus.bus.streams import Row
from drainbus.drain.cloudflare import CloudflareForwarder
from drainbus.drain.purges import Purge
from drainbus.drain.receipts import target_receipt
from drainbus.drain.retry import Outcome, merge_outcomes
from drainbus.drain.targets import Target

__all__ = ["CallAcks", "apply_to_targets"]

log = structlog.get_logger("drainbus.drain.daemon")

WriteReceipts = Callable[[Sequence[tuple[Row, Sequence[dict[str, Any]]]]], Awaitable[None]]
Ack = Callable[[list[bytes]], Awaitable[None]]


class CallAcks:
    """One batch's early acknowledgements. ``done`` holds the purges already acknowledged."""

    def __init__(
        self,
        targets: Sequence[Target],
        purges: list[Purge],
        rows: dict[Purge, list[Row]],
        *,
        write_receipts: WriteReceipts,
        ack: Ack,
    ) -> None:
        self._purges = purges
        self._rows = rows
        self._write_receipts = write_receipts
        self._ack = ack
        self._started = time.monotonic()
        self.done: set[int] = set()
        self.entries = 0
        # Only a role whose one target is Cloudflare: with more targets a purge is done
        # only when all of them are, which the end of the batch decides.
        only = targets[0] if len(targets) == 1 else None
        self.target = only if isinstance(only, CloudflareForwarder) else None

    async def apply(self, target: Target, purges: Sequence[Purge]) -> list[Outcome]:
        """``target.apply(purges)``, hearing of each call's purges if it is the one target."""
        if target is self.target:
            return await self.target.apply(purges, self.settled)
        return await target.apply(purges)

    async def settled(self, outcomes: dict[int, Outcome]) -> None:
        """Write the receipts of the purges done, then acknowledge their entries."""
        assert self.target is not None
        # (Times are checked within bounds: a factor of 1001 for 1000 is below what they show.)
        ms = (time.monotonic() - self._started) * 1000
        done = sorted(i for i, outcome in outcomes.items() if outcome.status == "done")
        if not done:
            return
        receipts = [
            (row, [target_receipt(self.target.name, outcomes[i], ms)])
            for i in done
            for row in self._rows[self._purges[i]]
        ]
        await self._write_receipts(receipts)
        await self._ack([row[0] for row, _ in receipts])
        self.done.update(done)
        self.entries += len(receipts)


async def apply_to_targets(
    targets: Sequence[Target], purges: list[Purge], early: CallAcks
) -> tuple[list[Outcome], list[list[dict[str, Any]]]]:
    """Run ``purges`` on every target at once (the batch is done when the slowest is).

    Returns each purge's merged outcome, and for each purge the receipt part of every
    target (what it did, and how long the target took for the whole batch).
    """
    # Start values: run() sets each target's column and time, whatever the target does.
    columns: list[list[Outcome]] = [[] for _ in targets]
    took: list[float] = [0.0 for _ in targets]

    async def run(number: int, target: Target) -> None:
        started = time.monotonic()
        try:
            column = await early.apply(target, purges)
        except Exception as exc:  # a target bug must not kill the consumer: retry later
            log.exception("drain_target_failed", target=target.name)
            column = [Outcome("retry_later", f"{target.name}: {exc}")] * len(purges)
        columns[number] = column
        took[number] = (time.monotonic() - started) * 1000  # (1001 alike: see settled())

    if len(targets) == 1:
        await run(0, targets[0])
    else:
        async with anyio.create_task_group() as tg:
            for number, target in enumerate(targets):
                tg.start_soon(run, number, target)
    parts: list[list[dict[str, Any]]] = [[] for _ in purges]
    # strict= on zips of equal lengths (one column and time per target, an outcome per purge).
    for target, column, ms in zip(targets, columns, took, strict=True):
        # Most of a batch's purges end alike at a target (done, 0 or 1 evicted): one part,
        # shared by every receipt that says the same (they are serialised, never changed).
        same: dict[Outcome, dict[str, Any]] = {}
        for i, outcome in enumerate(column):
            part = same.get(outcome)
            if part is None:
                part = same[outcome] = target_receipt(target.name, outcome, ms)
            parts[i].append(part)
    if len(columns) == 1:  # one target: its outcomes are the purges' (merging one is a copy)
        return list(columns[0]), parts
    merged = [merge_outcomes(column) for column in zip(*columns, strict=True)]
    return merged, parts
