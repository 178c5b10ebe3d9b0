"""The drain daemon: consume the cache-drain topic and carry out every purge, at least once.

Two roles, each a consumer group on the topic's stream:

- **local** (group ``node-NAME``, one per node): every node evicts its own caches (nginx,
  HTTP PURGE). Each node must act, so each node has its own group.
- **cdn** (group ``cdn``, shared): Cloudflare is called once per purge across all nodes, so
  every node is a consumer of the same group and Redis hands each entry to one of them.

An entry is acknowledged only after every target of its role carried it out, or after it
was moved to the dead-letter stream. After a crash a consumer first works through its own
pending entries; entries left pending (by a failure here, or by a consumer that died) are
claimed again with XAUTOCLAIM once idle for ``retry_after``, and after ``max_deliveries``
deliveries they go to the dead-letter stream with the last error. While a batch is in
flight its entries are re-claimed periodically, so a slow target (Cloudflare waiting out a
rate limit) is not mistaken for a dead consumer.

Duplicates within a batch are coalesced; every action is idempotent, because at-least-once
means a purge can arrive twice.

Before an entry is acknowledged (or dead-lettered), its receipt (what each target did with
it: see :mod:`drainbus.drain.receipts`) is appended to the topic's receipt stream, so a crash
cannot lose the receipt of an acknowledged purge.

Each role reads ahead of its work, up to ``read_ahead`` entries, into a backlog that serves the
publishers round-robin (:mod:`drainbus.drain.fair`): one user's burst cannot sit in front of
another user's purge. Batches are taken from the backlog, at most ``Role.batch_size`` entries
(``Role.shared_batch_size`` while several publishers wait).

The cdn role batches like Nagle's algorithm, not on a timer: a purge read while nothing is in
flight goes to Cloudflare at once, with whatever else is already waiting in the stream. While
a batch is being carried out (a call in flight, or waiting for rate-limit tokens) the loop
reads nothing, so what arrives meanwhile waits in the stream and the next read takes all of
it; a cdn batch is what the rate limit sends in about a quarter of a second, so a purge read
behind it is not held for a whole backlog's calls. After a batch, if the bucket it
spent from has no room (``Role.busy_for``), the loop may wait up to ``Role.batch_window`` for
room before reading, so the next call gathers what arrives meanwhile; an idle bus never waits.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import anyio
import structlog
from redis.exceptions import RedisError, ResponseError

from drainbus.backoff import Backoff
from drainbus.bus.connection import BLOCK_MS, RedisClient, backend_error, reader_client
from drainbus.bus.publisher import APPEND_ENTRIES, append_args
from drainbus.bus.streams import Keys, entry_fields, parse_id, stream_info, text
from drainbus.config import DrainSettings
from drainbus.drain.call_acks import CallAcks
from drainbus.drain.fair import FairBacklog, Row, keep_claimed
from drainbus.drain.purges import Purge, check_scope, parse_purge
from drainbus.drain.receipts import receipt, receipts_topic, target_part, target_receipt
from drainbus.drain.refill_receipts import RefillReceipts
from drainbus.drain.retry import Outcome, merge_outcomes
from drainbus.drain.targets import LocalCacheTarget, NginxTarget, Target
from drainbus.errors import DataError, PermissionDenied, StartupError
from drainbus.identity import user_key
from drainbus.metrics import PURGE_SECONDS

__all__ = ["Drain", "DrainStats", "Role"]

log = structlog.get_logger(__name__)

_Row = Row
# A local batch holds up to this many entries: each target gets the whole batch in one
# call, and one XACK acknowledges it. Also the page size of reads of pending entries.
_READ_COUNT = 1000
# A local batch while several publishers wait: a purge that just got its turn is carried out
# after a quarter of a batch's work, not a whole one (the batch's receipts come at its end).
_SHARED_BATCH = 250
# At most this many entries join one cdn batch; a backlog is read on in the next one.
_GATHER_MAX = 4096
_DEAD_LETTER_MAX = 100_000
_RECEIPTS_TRIM_EVERY = 30.0  # seconds between trims of the receipt stream by age
_RECEIPTS_PER_CALL = 1000


@dataclass
class Role:
    """One consumer group and the targets its entries are carried out on.

    ``busy_for`` (set for the cdn role) says how many seconds until the targets' rate limit
    has room for a call, 0 if it has room now; a role with it gathers every entry already
    waiting into each batch. ``batch_window`` is the longest, in seconds, the loop waits
    after a batch for that room before reading the next one (0: never waits).
    """

    name: str
    group: str
    targets: Sequence[Target]
    backlog: FairBacklog
    batch_size: int = _READ_COUNT
    shared_batch_size: int = _SHARED_BATCH
    batch_window: float = 0.0
    busy_for: Callable[[], float] | None = None
    flush_if_missed: bool = False
    # Set once a gap of missed purges was acted on; cleared by the next read, which jumps
    # the gap (until then every check would see the same gap again).
    gap_handled: bool = False


@dataclass
class DrainStats:
    """Counters an operator (``ls``, metrics) can read."""

    purges_done: int = 0
    entries_acked: int = 0
    dead_lettered: int = 0
    retries: int = 0
    flushes: int = 0
    last_purge_ms: int | None = None
    last_error: str | None = None
    by_kind: dict[str, int] = field(default_factory=dict)
    groups: dict[str, tuple[int | None, int]] = field(default_factory=dict)  # lag, pending


class Drain:
    """Runs the roles this node has targets for, until cancelled."""

    def __init__(
        self,
        settings: DrainSettings,
        *,
        redis: RedisClient,
        redis_url: str,
        keys: Keys,
        admins: frozenset[str],
        local_targets: Sequence[LocalCacheTarget] = (),
        cdn_targets: Sequence[Target] = (),
        cdn_batch_window: float = 0.0,
        receipts_max_len: int = 100_000,
        receipts_retention: float = 7 * 86400.0,
        cdn_busy_for: Callable[[], float] | None = None,
        cdn_batch_size: int = _GATHER_MAX,
    ) -> None:
        """``receipts_max_len`` and ``receipts_retention`` (seconds): how many receipts the
        receipt stream keeps (about), and for how long, like the topic's stream.
        ``cdn_batch_size``: most purges per cdn batch (at most 4,096)."""
        self.settings = settings
        self.consumer = settings.node
        self.stats = DrainStats()
        self._redis = redis
        self._redis_url = redis_url
        self._keys = keys
        self._admins = admins
        self._rule = settings.scope_rule
        self._stream = keys.stream(settings.topic)
        self._dead = keys.dead_letters(settings.topic)
        self._receipts = keys.stream(receipts_topic(settings.topic))
        self._receipts_max_len = receipts_max_len
        self._receipts_retention_ms = int(receipts_retention * 1000)
        self._receipts_trimmed = 0.0  # monotonic time of the last trim by age
        self._append_entries = redis.register_script(APPEND_ENTRIES)
        self._last_error: dict[bytes, str] = {}
        self._local_targets = local_targets
        self.all_targets: list[Target] = [*local_targets, *cdn_targets]
        self.roles: list[Role] = []
        if local_targets:
            self.roles.append(
                Role(
                    "local",
                    f"node-{settings.node}",
                    local_targets,
                    FairBacklog(settings.read_ahead),
                    flush_if_missed=True,
                )
            )
        if cdn_targets:
            cdn_size = max(1, min(cdn_batch_size, _GATHER_MAX))
            self.roles.append(
                Role(
                    "cdn",
                    "cdn",
                    cdn_targets,
                    FairBacklog(settings.read_ahead),
                    batch_size=cdn_size,
                    # Already what the rate limit sends in a moment; smaller calls would
                    # waste the per-call bucket of tag and host purges.
                    shared_batch_size=cdn_size,
                    batch_window=cdn_batch_window,
                    busy_for=cdn_busy_for or _never_busy,
                )
            )
        self.ready = anyio.Event()
        # A stale refill evicted later is added to its purge's receipts: see refill_receipts.
        self._refills: RefillReceipts | None = None
        if settings.refill_window > 0 and any(isinstance(t, NginxTarget) for t in local_targets):
            self._refills = RefillReceipts(
                settings.refill_window, node=self.consumer, append=self._append_receipts
            )
            for target in local_targets:
                if isinstance(target, NginxTarget):
                    target.watch_refills(self._refills.evicted)

    async def run(self) -> None:
        """Consume until cancelled. ``ready`` is set once every group is being read."""
        await self._start_up()
        async with anyio.create_task_group() as tg:
            for role in self.roles:
                tg.start_soon(self._consume, role)
                tg.start_soon(self._keep_claimed, role, role.backlog.ids)
            if self._refills is not None:
                tg.start_soon(self._refills.run)
            self.ready.set()

    # --- start-up ----------------------------------------------------------------------

    async def _start_up(self) -> None:
        """Make the groups, catch up on what they missed, and say this node is live.

        Raises StartupError (one line, exit 71) when Redis refuses the groups, e.g. because
        the stream's key holds something else, and BackendUnavailable (69) when it does not
        answer: not a traceback.
        """
        try:
            for role in self.roles:
                await self._prepare(role)
            # Publishers waiting for receipts count the nodes whose status is fresh: say
            # this one is live before saying it is ready.
            await self._publish_status()
        except ResponseError as exc:
            raise StartupError(
                f"cannot drain '{self.settings.topic}': Redis refused to set up consumer groups "
                f"on {self._stream} ({exc}); that key must be a stream (or not exist)"
            ) from exc
        except (RedisError, OSError) as exc:
            raise backend_error(exc, f"setting up the drain of '{self.settings.topic}'") from exc

    async def _prepare(self, role: Role) -> None:
        try:
            await self._redis.xgroup_create(self._stream, role.group, id="$", mkstream=True)
            log.info("drain_group_created", group=role.group)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._check_missed(role)
        await self._process_own_pending(role)

    async def _check_missed(self, role: Role) -> None:
        """Act on purges this group can no longer read: flush local caches, or alert."""
        if not role.gap_handled and await self._missed_purges(role):
            await self._missed(role)
            role.gap_handled = True

    async def _missed(self, role: Role) -> None:
        if role.flush_if_missed:
            await self._flush_local(role)
            return
        self.stats.last_error = "purges were trimmed from the stream before this group read them"
        log.error(
            "drain_purges_missed",
            group=role.group,
            reason="purges were trimmed before this group read them (down or behind longer "
            "than the retention); purge the CDN by hand if stale pages matter",
        )

    async def _missed_purges(self, role: Role) -> bool:
        """True if entries this group never read were trimmed away (node down too long)."""
        info = await stream_info(self._redis, self._stream)
        groups = await self._redis.xinfo_groups(self._stream)
        mine = next((g for g in groups if text(g["name"]) == role.group), None)
        if info is None or mine is None or not info.was_trimmed:
            return False
        entries_read = mine.get("entries-read")
        if entries_read is None:
            # Redis lost count (entries were deleted in the middle): decide by position.
            last_read = parse_id(mine["last-delivered-id"])
            return info.first_id is not None and last_read < info.first_id
        # Every entry ever added was either read by this group, is still in the stream, or
        # was trimmed before this group read it: the last kind are missed purges.
        return info.entries_added - int(entries_read) - info.length > 0

    async def _flush_local(self, role: Role) -> None:
        log.warning(
            "drain_missed_purges_flushing",
            group=role.group,
            reason="purges this node had not read were trimmed from the stream "
            "(down or behind longer than the retention); flushing the local caches instead of "
            "serving stale pages",
        )
        for target in self._local_targets:
            removed = await target.flush_all()
            log.warning("drain_flushed", target=target.name, removed=removed)
        self.stats.flushes += 1

    async def _process_own_pending(self, role: Role) -> None:
        """After a crash: entries delivered to this consumer but never acknowledged.

        They pass the delivery limit first, so an entry that crashes the process is
        dead-lettered after ``max_deliveries`` restarts instead of crashing it forever.
        """
        position = "0"
        while True:
            reply: Any = await self._redis.xreadgroup(
                role.group, self.consumer, {self._stream: position}, count=_READ_COUNT
            )
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes] | None]], reply[0][1] if reply else []
            )
            if not entries:
                return
            # Entries trimmed since come back with no fields: skip them, keep paging.
            position = text(entries[-1][0])
            rows: list[_Row] = [(i, f) for i, f in entries if f is not None]
            if len(rows) < len(entries):
                await self._missed(role)
            if rows:
                log.info("drain_resuming_pending", group=role.group, entries=len(rows))
                # Into the backlog, not carried out here: a read-ahead's worth of entries
                # would hold up the start (and the other role) for as long as they take.
                role.backlog.add(await self._dead_letter_exhausted(role, rows))

    # --- the loop ----------------------------------------------------------------------

    async def _consume(self, role: Role) -> None:
        backoff = Backoff("drain_redis_retry", base=0.1, cap=5.0)
        next_claim = 0.0
        busy = False  # the last read found entries: the bus is busy, not idle
        while True:
            client = reader_client(self._redis_url)
            try:
                while True:
                    if time.monotonic() >= next_claim:
                        await self._reclaim(role)
                        await self._publish_status()
                        next_claim = time.monotonic() + self.settings.retry_after / 2
                    if busy:
                        await self._wait_for_room(role, next_claim)
                    # Before every read: once XREADGROUP jumps a trimmed gap, Redis counts the
                    # gap as read and the loss can no longer be seen.
                    await self._check_missed(role)
                    await self._read_ahead(client, role, next_claim)
                    backlog = role.backlog
                    shared = backlog.users > 1
                    rows = backlog.take(role.shared_batch_size if shared else role.batch_size)
                    busy = bool(rows)
                    backoff.succeeded()
                    if rows:
                        await self._handle(role, rows)
            except (RedisError, OSError) as exc:
                if "NOGROUP" in str(exc) and await self._recreate_group(role):
                    backoff.succeeded()
                    continue
                await backoff.failed(exc, group=role.group)
            finally:
                with anyio.CancelScope(shield=True):
                    await client.aclose()

    async def _recreate_group(self, role: Role) -> bool:
        """The group is gone: make it again, and handle what it may have missed as missed.

        A Redis failover loses the writes the replica had not copied yet (a group created
        just before, or the whole stream), and a Redis restarted without persistence loses
        everything. Which purges went unread cannot be known, so this node does what it does
        for purges trimmed unread: flush its local caches, or say so for the CDN. Returns
        False if Redis failed meanwhile (the caller retries).
        """
        log.error(
            "drain_group_lost",
            group=role.group,
            reason="the consumer group vanished from Redis (a failover lost writes not yet "
            "replicated, Redis restarted empty, or the stream was deleted); recreating it",
        )
        role.backlog.clear()  # their pending entries went with the group: none can be acked
        try:
            await self._prepare(role)
            await self._missed(role)
        except (RedisError, OSError) as exc:
            log.warning("drain_group_recreate_failed", group=role.group, error=str(exc))
            return False
        return True

    async def _wait_for_room(self, role: Role, next_claim: float) -> None:
        """After a batch, wait up to ``role.batch_window`` for the rate limit to have room.

        The next call could not leave sooner, and what arrives meanwhile joins it. Never
        past the next reclaim, so stuck entries and the status are not held up.
        """
        if role.busy_for is None or role.batch_window <= 0:
            return
        wait = min(role.busy_for(), role.batch_window, next_claim - time.monotonic())
        if wait > 0:
            log.debug("drain_waiting_for_rate_limit", group=role.group, seconds=round(wait, 3))
            await anyio.sleep(wait)

    async def _read_ahead(self, client: RedisClient, role: Role, next_claim: float) -> None:
        """Read every entry waiting, up to the backlog's room, into the backlog; block (until
        the next reclaim at most) only when the backlog is empty.

        All that waits, not one batch's worth: a purge behind another user's burst must be
        in the backlog to get its turn. One read, not many pages: each await lets a busy
        publisher in the same process run, and page by page a burst's second batch started
        seconds late.
        """
        backlog = role.backlog
        if not backlog.room:
            return
        wait_ms = int(min(BLOCK_MS, max(1.0, (next_claim - time.monotonic()) * 1000)))
        rows = _rows(
            await client.xreadgroup(
                role.group,
                self.consumer,
                {self._stream: ">"},
                count=backlog.room,
                block=None if backlog else wait_ms,
            )
        )
        if rows:
            role.gap_handled = False
            backlog.add(rows)

    async def _reclaim(self, role: Role) -> None:
        """Claim entries idle for ``retry_after`` (failed here, or on a dead consumer)."""
        cursor = "0-0"
        min_idle = int(self.settings.retry_after * 1000)
        while True:
            reply = await self._redis.xautoclaim(
                self._stream,
                role.group,
                self.consumer,
                min_idle,
                start_id=cursor,
                count=_READ_COUNT,
            )
            cursor = text(reply[0])
            rows = cast(list[_Row], [r for r in reply[1] if r and r[1] is not None])
            if len(reply) > 2 and reply[2]:
                log.error(
                    "drain_entries_lost",
                    group=role.group,
                    count=len(reply[2]),
                    reason="pending entries were trimmed from the stream before success",
                )
                await self._missed(role)
            if rows:
                self.stats.retries += len(rows)
                role.backlog.add(await self._dead_letter_exhausted(role, rows))
            if cursor == "0-0" or not role.backlog.room:
                return  # a full backlog: the rest is claimed on a later round

    async def _dead_letter_exhausted(self, role: Role, rows: list[_Row]) -> list[_Row]:
        """Move entries delivered more than ``max_deliveries`` times; return the rest."""
        # One XPENDING per id: in a shared group other consumers' entries lie between ours,
        # so a range query could stop short of some of them.
        async with self._redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.xpending_range(self._stream, role.group, min=row[0], max=row[0], count=1)
            replies = await pipe.execute()
        deliveries = {p["message_id"]: int(p["times_delivered"]) for r in replies for p in r}
        keep = []
        for row in rows:
            count = deliveries.get(row[0], 0)
            if count > self.settings.max_deliveries:
                error = self._last_error.get(row[0], "no success within the delivery limit")
                await self._dead_letter(role, row, f"gave up after {count - 1} deliveries: {error}")
            else:
                keep.append(row)
        return keep

    # --- one batch ---------------------------------------------------------------------

    async def _handle(self, role: Role, rows: list[_Row]) -> None:
        """Carry out one read's entries as one batch: parse and check each entry once,
        coalesce them into distinct purges, hand the whole batch to every target of the role
        in one call each, write the receipts, then acknowledge every entry whose purge is
        done with one XACK. An entry that failed is left pending (or dead-lettered) without
        holding back the others. Logs one ``drain_batch`` line at info; each purge only at
        debug.
        """
        started = time.monotonic()
        batch: dict[Purge, list[_Row]] = {}
        invalid = 0
        for row in rows:
            purge = await self._parse(role, row)
            if purge is None:
                invalid += 1
            else:
                batch.setdefault(purge, []).append(row)
        if not batch:
            if invalid:
                log.info("drain_batch", group=role.group, entries=len(rows), invalid=invalid)
            return
        purges = list(batch)
        early = CallAcks(role.targets, purges, batch, ack=partial(self._ack, role),
                         write_receipts=partial(self._write_receipts, role))  # fmt: skip
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_claimed, role, lambda: [r[0] for r in rows])
            outcomes, parts = await self._apply(role, purges, early)
            tg.cancel_scope.cancel()
        await self._write_receipts(role, [(row, parts[i]) for i, p in enumerate(purges)
                                          if i not in early.done for row in batch[p]])  # fmt: skip
        acked: list[bytes] = []
        results: dict[str, int] = {}
        kinds: dict[str, int] = {}
        retry_errors: list[str] = []
        retry_entries = 0
        for i, (purge, outcome) in enumerate(zip(purges, outcomes, strict=True)):
            entries = batch[purge]
            results[outcome.status] = results.get(outcome.status, 0) + 1
            kind = _kind(purge)
            kinds[kind] = kinds.get(kind, 0) + 1
            log.debug(
                "drain_purge",
                group=role.group,
                kind=kind,
                result=outcome.status,
                entries=len(entries),
                evicted=outcome.evicted,
                error=outcome.error,
            )
            if outcome.status == "done":
                acked += [] if i in early.done else [r[0] for r in entries]
                self._count(purge)
            elif outcome.status == "permanent":
                for row in entries:
                    await self._dead_letter(
                        role, row, outcome.error or "refused by the target", receipt_written=True
                    )
            else:
                self.stats.last_error = outcome.error
                retry_errors.append(outcome.error or "failed")
                retry_entries += len(entries)
                for row in entries:
                    self._last_error[row[0]] = outcome.error or "failed"
        if retry_errors:
            log.warning(
                "drain_purge_retry_later",
                group=role.group,
                purges=len(retry_errors),
                entries=retry_entries,
                error=retry_errors[0],
                retry_after=self.settings.retry_after,
            )
        if role.name == "local" and self._refills is not None:
            self._refills.remember(
                [p for p, o in zip(purges, outcomes, strict=True) if o.status == "done"], batch
            )
        if acked:
            await self._ack(role, acked)
        if acked or early.done:
            now_ms = time.time() * 1000
            observe = PURGE_SECONDS.labels(role.name).observe
            for entries in batch.values():
                for row in entries:
                    received = row[1].get(b"t")
                    if received:
                        observe(max(0.0, now_ms - int(received)) / 1000)
            self.stats.last_purge_ms = int(time.time() * 1000)
        log.info(
            "drain_batch",
            group=role.group,
            entries=len(rows),
            invalid=invalid,
            purges=len(purges),
            kinds=kinds,
            results=results,
            acked=len(acked) + early.entries,
            seconds=round(time.monotonic() - started, 4),
        )

    async def _ack(self, role: Role, ids: list[bytes]) -> None:  # (also per call: call_acks.py)
        await self._redis.xack(self._stream, role.group, *ids)
        for entry_id in ids:
            self._last_error.pop(entry_id, None)
        self.stats.entries_acked += len(ids)

    async def _apply(
        self, role: Role, purges: list[Purge], early: CallAcks
    ) -> tuple[list[Outcome], list[list[dict[str, Any]]]]:
        """Run ``purges`` on every target of ``role``.

        Returns each purge's merged outcome, and for each purge the receipt part of every
        target (what it did, and how long the target took for the whole batch).
        """
        columns: list[list[Outcome]] = [[] for _ in role.targets]
        took: list[float] = [0.0 for _ in role.targets]

        async def run(number: int, target: Target) -> None:
            started = time.monotonic()
            try:
                column = await early.apply(target, purges)
            except Exception as exc:  # a target bug must not kill the consumer: retry later
                log.exception("drain_target_failed", target=target.name)
                column = [Outcome("retry_later", f"{target.name}: {exc}")] * len(purges)
            columns[number] = column
            took[number] = (time.monotonic() - started) * 1000

        # The targets of a role work at once: the batch is done when the slowest is.
        if len(role.targets) == 1:
            await run(0, role.targets[0])
        else:
            async with anyio.create_task_group() as tg:
                for number, target in enumerate(role.targets):
                    tg.start_soon(run, number, target)
        parts: list[list[dict[str, Any]]] = [[] for _ in purges]
        for target, column, ms in zip(role.targets, columns, took, strict=True):
            for i, outcome in enumerate(column):
                parts[i].append(target_receipt(target.name, outcome, ms))
        merged = [merge_outcomes(column) for column in zip(*columns, strict=True)]
        return merged, parts

    async def _write_receipts(
        self, role: Role, receipts: Sequence[tuple[_Row, Sequence[dict[str, Any]]]]
    ) -> None:
        """Append the receipts of these entries (entry, target parts) before any is acked.

        A failure raises (RedisError): the batch is then not acknowledged and is delivered
        again, so no acknowledged purge lacks its receipt.
        """
        await self._append_receipts(
            [
                receipt(
                    entry_id=entry_id,
                    fields=fields,
                    node=self.consumer,
                    role=role.name,
                    targets=targets,
                )
                for (entry_id, fields), targets in receipts
            ]
        )

    async def _append_receipts(self, records: Sequence[dict[str, Any]]) -> None:
        # One command per chunk (a server-side loop of XADDs), not one XADD per receipt:
        # a batch of 1,000 receipts spent most of its time packing and parsing commands.
        for start in range(0, len(records), _RECEIPTS_PER_CALL):
            entries = [
                entry_fields(
                    json.dumps(record).encode(),
                    user=record["user"],
                    message_id=secrets.token_hex(8),
                    raw=False,
                )
                for record in records[start : start + _RECEIPTS_PER_CALL]
            ]
            if len(entries) == 1:
                await self._redis.xadd(
                    self._receipts, entries[0], maxlen=self._receipts_max_len, approximate=True
                )
            else:
                await self._append_entries(
                    keys=[self._receipts], args=append_args(self._receipts_max_len, entries)
                )
        if time.monotonic() - self._receipts_trimmed >= _RECEIPTS_TRIM_EVERY:
            self._receipts_trimmed = time.monotonic()
            oldest_kept = int(time.time() * 1000) - self._receipts_retention_ms
            # Exact, every 30 s: it removes only what aged out since, and a small stream
            # would never lose a whole node to approximate trimming.
            await self._redis.xtrim(self._receipts, minid=f"{oldest_kept}-0", approximate=False)

    async def _parse(self, role: Role, row: _Row) -> Purge | None:
        """The entry's purge, checked again against its publisher's scope; None if invalid."""
        fields = row[1]
        user = fields.get(b"u", b"").decode("utf-8", "replace")
        try:
            purge = parse_purge(fields.get(b"d", b"").decode("utf-8"))
            check_scope(purge, user=user, is_admin=user_key(user) in self._admins, rule=self._rule)
        except (DataError, PermissionDenied, UnicodeDecodeError) as exc:
            await self._dead_letter(role, row, f"invalid purge: {exc}")
            return None
        return purge

    async def _keep_claimed(self, role: Role, ids: Callable[[], Sequence[bytes]]) -> None:
        # Resets the entries' idle time so no consumer reclaims them while held or in flight.
        await keep_claimed(
            self._redis, self._stream, group=role.group, consumer=self.consumer, ids=ids,
            every=self.settings.retry_after / 3,
        )  # fmt: skip

    async def _dead_letter(
        self, role: Role, row: _Row, error: str, *, receipt_written: bool = False
    ) -> None:
        entry_id, fields = row
        if not receipt_written:
            part = target_part("(drain)", "dead-lettered", error=error[:2000])
            await self._write_receipts(role, [(row, [part])])
        record: dict[Any, Any] = {
            **fields,
            "origin_id": entry_id,
            "group": role.group,
            "error": error[:2000],
            "failed_at": int(time.time() * 1000),
        }
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self._dead, record, maxlen=_DEAD_LETTER_MAX, approximate=True)
            pipe.xack(self._stream, role.group, entry_id)
            await pipe.execute()
        self._last_error.pop(entry_id, None)
        self.stats.dead_lettered += 1
        self.stats.last_error = error
        log.error("drain_dead_letter", group=role.group, entry=entry_id.decode(), error=error)

    async def _publish_status(self) -> None:
        """Refresh group lag/pending and share this node's status for ``ssh bus stats``."""
        groups = await self._redis.xinfo_groups(self._stream)
        self.stats.groups = {
            text(g["name"]): (None if g.get("lag") is None else int(g["lag"]), int(g["pending"]))
            for g in groups
        }
        status = {
            "node": self.consumer,
            "roles": [r.name for r in self.roles],
            "local_targets": [t.name for t in self._local_targets],
            "cdn_targets": [t.name for r in self.roles if r.name == "cdn" for t in r.targets],
            "last_purge_ms": self.stats.last_purge_ms,
            "purges_done": self.stats.purges_done,
            "dead_lettered": self.stats.dead_lettered,
            "last_error": self.stats.last_error,
            "targets": {t.name: t.snapshot() for t in self.all_targets},
        }
        ttl_ms = int(max(30.0, self.settings.retry_after * 3) * 1000)
        now_ms = int(time.time() * 1000)
        await self._redis.set(
            self._keys.drain_status(self.consumer), json.dumps(status, default=str), px=ttl_ms
        )
        await self._redis.zadd(self._keys.drain_nodes, {self.consumer: now_ms})
        await self._redis.zremrangebyscore(self._keys.drain_nodes, "-inf", now_ms - ttl_ms)

    def _count(self, purge: Purge) -> None:
        self.stats.purges_done += 1
        for kind in ("keys", "tags", "urls", "prefixes", "hosts"):
            if getattr(purge, kind):
                self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1
        if purge.everything:
            self.stats.by_kind["everything"] = self.stats.by_kind.get("everything", 0) + 1


_KINDS = ("urls", "tags", "keys", "prefixes", "hosts")


def _kind(purge: Purge) -> str:
    """The purge's kind for the batch log: ``url``, ``tag``, …, ``everything`` or ``mixed``."""
    if purge.everything:
        return "everything"
    kinds = [
        kind[:-1] if kind != "prefixes" else "prefix" for kind in _KINDS if getattr(purge, kind)
    ]
    return kinds[0] if len(kinds) == 1 else "mixed"


def _never_busy() -> float:
    return 0.0


def _rows(reply: Any) -> list[_Row]:
    rows: list[_Row] = []
    for _key, entries in reply or ():
        rows += [(i, f) for i, f in entries if f is not None]
    return rows
