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

import time
from collections.abc import Callable, Sequence
from functools import partial

import anyio
import structlog
from redis.exceptions import RedisError, ResponseError

from drainbus.backoff import Backoff
from drainbus.bus.connection import BLOCK_MS, RedisClient, backend_error, reader_client
from drainbus.bus.streams import Keys, Row
from drainbus.config import DrainSettings
from drainbus.drain.call_acks import CallAcks, apply_to_targets
from drainbus.drain.fair import FairBacklog, keep_claimed
from drainbus.drain.groups import (
    claim_idle,
    deliveries,
    group_counts,
    own_pending,
    publish_status,
    trimmed_unread,
)
from drainbus.drain.ledger import Ledger
from drainbus.drain.missed import act_on_missed
from drainbus.drain.purges import Purge, check_scope, parse_purge
from drainbus.drain.receipt_writer import ReceiptWriter
from drainbus.drain.receipts import receipts_topic
from drainbus.drain.refill_receipts import RefillReceipts, read_entries
from drainbus.drain.roles import (
    GATHER_MAX,
    READ_COUNT,
    DrainStats,
    Role,
    never_busy,
    rows_of,
)
from drainbus.drain.targets import LocalCacheTarget, NginxTarget, Target
from drainbus.errors import DataError, PermissionDenied, StartupError
from drainbus.identity import user_key
from drainbus.metrics import PURGE_SECONDS

__all__ = ["Drain", "DrainStats", "Role"]

log = structlog.get_logger(__name__)

_Batch = dict[Purge, list[Row]]  # a batch's distinct purges, each with its entries


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
        # Defaults for callers that do not say (open_drain always does); a batch window is
        # read only with cdn_busy_for, so without one any window waits 0 s.
        cdn_batch_window: float = 0.0,
        receipts_max_len: int = 100_000,
        receipts_retention: float = 7 * 86400.0,
        cdn_busy_for: Callable[[], float] | None = None,
        cdn_batch_size: int = GATHER_MAX,
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
        self._receipts = ReceiptWriter(
            redis,
            keys.stream(receipts_topic(settings.topic)),
            max_len=receipts_max_len,
            retention=receipts_retention,
        )
        self._ledger = Ledger(
            redis,
            stream=self._stream,
            dead_letters=keys.dead_letters(settings.topic),
            receipts=self._receipts,
            node=self.consumer,
            stats=self.stats,
        )
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
            cdn_size = max(1, min(cdn_batch_size, GATHER_MAX))
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
                    busy_for=cdn_busy_for or never_busy,
                )
            )
        self.ready = anyio.Event()
        self._flush_owed: set[str] = set()  # groups recreated whose flush has not succeeded
        # A stale refill evicted later is added to its purge's receipts: see refill_receipts.
        self._refills: RefillReceipts | None = None
        # Built without a guard to feed it (`or`, `>= 0`), it would only remember purges.
        if settings.refill_window > 0 and any(isinstance(t, NginxTarget) for t in local_targets):
            self._refills = RefillReceipts(
                settings.refill_window,
                node=self.consumer,
                append=self._receipts.append,
                fetch=partial(read_entries, self._redis, self._stream),
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
            # id="$" is also redis-py's default: said here because it is the contract.
            await self._redis.xgroup_create(self._stream, role.group, id="$", mkstream=True)
            log.info("drain_group_created", group=role.group)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._check_missed(role)
        await self._process_own_pending(role)

    async def _check_missed(self, role: Role) -> None:
        """Act on purges this group can no longer read: flush local caches, or alert."""
        if not role.gap_handled and await trimmed_unread(self._redis, self._stream, role.group):
            await self._missed(role)
            role.gap_handled = True

    async def _missed(self, role: Role) -> None:
        await act_on_missed(role, self._local_targets, self.stats)

    async def _process_own_pending(self, role: Role) -> None:
        """After a crash: entries delivered to this consumer but never acknowledged.

        They pass the delivery limit first, so an entry that crashes the process is
        dead-lettered after ``max_deliveries`` restarts instead of crashing it forever.
        """
        # READ_COUNT is a page size: how many entries per round trip, not which.
        pages = own_pending(self._redis, self._stream, role.group, self.consumer, READ_COUNT)
        async for rows, trimmed in pages:
            if trimmed:  # entries trimmed since came back with no fields: acted on, so
                await self._missed(role)  # acknowledged, or the reclaim reports them again
                await self._redis.xack(self._stream, role.group, *trimmed)
            if rows:
                log.info("drain_resuming_pending", group=role.group, entries=len(rows))
                # Into the backlog, not carried out here: a read-ahead's worth of entries
                # would hold up the start (and the other role) for as long as they take.
                role.backlog.add(await self._dead_letter_exhausted(role, rows))

    # --- the loop ----------------------------------------------------------------------

    async def _consume(self, role: Role) -> None:
        backoff = Backoff("drain_redis_retry", base=0.1, cap=5.0)  # cap: after 6 failures in a row
        next_claim = 0.0  # due at once: monotonic time is past 0 (or 1)
        busy = False  # the last read found entries: the bus is busy, not idle (None: idle too)
        while True:
            client = reader_client(self._redis_url)
            try:
                while True:
                    if time.monotonic() >= next_claim:  # > alike: the clock moves on
                        await self._reclaim(role)
                        await self._publish_status()
                        # Any period under retry_after finds the idle entries in time (/ 3 too).
                        next_claim = time.monotonic() + self.settings.retry_after / 2
                    if role.group in self._flush_owed:  # a recreated group's failed flush
                        await self._missed(role)
                        self._flush_owed.discard(role.group)
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
                # The group is gone: NOGROUP from a read, or "no such key" from the check
                # before it (XINFO GROUPS) when the stream went with it.
                gone = "NOGROUP" in str(exc) or "no such key" in str(exc)
                if gone and await self._recreate_group(role):
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
        self._flush_owed.add(role.group)  # until done: the group back, no read says NOGROUP
        try:
            await self._prepare(role)
            await self._missed(role)
        except (RedisError, OSError) as exc:
            log.warning("drain_group_recreate_failed", group=role.group, error=str(exc))
            return False
        self._flush_owed.discard(role.group)
        return True

    async def _wait_for_room(self, role: Role, next_claim: float) -> None:
        """After a batch, wait (never past the next reclaim) for the rate limit's room."""
        wait = role.room_in(next_claim - time.monotonic())
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
        # Redis times a blocked read out at its hz (100 ms): 1 or 2 ms (or s / 1000) wait alike.
        wait_ms = int(min(BLOCK_MS, max(1.0, (next_claim - time.monotonic()) * 1000)))
        rows = rows_of(
            await client.xreadgroup(
                role.group,
                self.consumer,
                {self._stream: ">"},
                count=backlog.room,
                block=None if backlog else wait_ms,
            )
        )
        if rows:
            role.gap_handled = False  # None alike: only its truth is read
            backlog.add(rows)

    async def _reclaim(self, role: Role) -> None:
        """Claim entries idle for ``retry_after`` (failed here, or on a dead consumer)."""
        min_idle_ms = int(self.settings.retry_after * 1000)  # * 1001: a thousandth later
        pages = claim_idle(self._redis, self._stream, role.group, self.consumer,
                           min_idle_ms=min_idle_ms, count=READ_COUNT)  # fmt: skip
        async for rows, lost in pages:
            if lost:
                log.error(
                    "drain_entries_lost",
                    group=role.group,
                    count=lost,
                    reason="pending entries were trimmed from the stream before success",
                )
                await self._missed(role)
            if rows:
                self.stats.retries += len(rows)
                role.backlog.add(await self._dead_letter_exhausted(role, rows))
            # A full backlog: the rest is claimed on a later round (stopping with room too would
            # only claim a page per round; READ_COUNT, the page, bounds a reply, not which).
            if not role.backlog.room:
                return

    async def _dead_letter_exhausted(self, role: Role, rows: list[Row]) -> list[Row]:
        """Move entries delivered more than ``max_deliveries`` times; return the rest."""
        counts = await deliveries(self._redis, self._stream, role.group, [r[0] for r in rows])
        keep = []
        for row in rows:
            count = counts.get(row[0], 0)  # always there: each row is pending (read or claimed)
            if count > self.settings.max_deliveries:
                error = self._ledger.last_error.get(row[0], "no success within the delivery limit")
                await self._ledger.dead_letter(
                    role, row, f"gave up after {count - 1} deliveries: {error}"
                )
            else:
                keep.append(row)
        return keep

    async def _handle(self, role: Role, rows: list[Row]) -> None:
        """Carry out one read's entries as one batch: parse and check each entry once,
        coalesce them into distinct purges, hand the whole batch to every target of the role
        in one call each, write the receipts, then acknowledge every entry whose purge is
        done with one XACK. An entry that failed is left pending (or dead-lettered) without
        holding back the others. Logs one ``drain_batch`` line at info; each purge only at
        debug.
        """
        started = time.monotonic()
        batch, invalid = await self._parse_batch(role, rows)
        if not batch:
            if invalid:
                log.info("drain_batch", group=role.group, entries=len(rows), invalid=invalid)
            return
        purges = list(batch)
        early = CallAcks(role.targets, purges, batch, ack=partial(self._ledger.ack, role),
                         write_receipts=partial(self._ledger.write_receipts, role))  # fmt: skip
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_claimed, role, lambda: [r[0] for r in rows])
            outcomes, parts = await apply_to_targets(role.targets, purges, early)
            tg.cancel_scope.cancel()
        await self._ledger.write_receipts(role, [(row, parts[i]) for i, p in enumerate(purges)
                                          if i not in early.done for row in batch[p]])  # fmt: skip
        acked, results, kinds = await self._ledger.settle(
            role, batch, outcomes, early.done, retry_after=self.settings.retry_after
        )
        if role.name == "local" and self._refills is not None:
            self._refills.remember(
                # strict: one outcome per purge, always (apply_to_targets' contract).
                [p for p, o in zip(purges, outcomes, strict=True) if o.status == "done"],
                batch,
            )
        if acked:
            await self._ledger.ack(role, acked)
        if acked or early.done:
            self._observe_purge_latency(role, batch)
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

    async def _parse_batch(self, role: Role, rows: list[Row]) -> tuple[dict[Purge, list[Row]], int]:
        """The distinct purges of ``rows``, each with its entries; and how many were invalid
        (those are dead-lettered)."""
        batch: _Batch = {}
        invalid = 0
        for row in rows:
            purge = await self._parse(role, row)
            if purge is None:
                invalid += 1
            else:
                batch.setdefault(purge, []).append(row)
        return batch, invalid

    def _observe_purge_latency(self, role: Role, batch: _Batch) -> None:
        """Time from each entry's arrival to now, for the purge latency histogram."""
        now_ms = time.time() * 1000
        observe = PURGE_SECONDS.labels(role.name).observe
        for entries in batch.values():
            for row in entries:
                received = row[1].get(b"t")
                if received:  # a floor of 1 ms, or / 1001: a thousandth off, below what is read
                    observe(max(0.0, now_ms - int(received)) / 1000)
        self.stats.last_purge_ms = int(time.time() * 1000)

    async def _parse(self, role: Role, row: Row) -> Purge | None:
        """The entry's purge, checked again against its publisher's scope; None if invalid."""
        fields = row[1]
        user = fields.get(b"u", b"").decode("utf-8", "replace")  # "UTF-8": the same codec
        try:
            purge = parse_purge(fields.get(b"d", b"").decode("utf-8"))  # "UTF-8" alike
            check_scope(purge, user=user, is_admin=user_key(user) in self._admins, rule=self._rule)
        except (DataError, PermissionDenied, UnicodeDecodeError) as exc:
            await self._ledger.dead_letter(role, row, f"invalid purge: {exc}")
            return None
        return purge

    async def _keep_claimed(self, role: Role, ids: Callable[[], Sequence[bytes]]) -> None:
        # Resets the entries' idle time so no consumer reclaims them while held or in flight.
        await keep_claimed(
            self._redis, self._stream, group=role.group, consumer=self.consumer, ids=ids,
            every=self.settings.retry_after / 3,  # any period well under retry_after (/ 4 too)
        )  # fmt: skip

    async def _publish_status(self) -> None:
        """Refresh group lag/pending and share this node's status for ``ssh bus stats``."""
        self.stats.groups = await group_counts(self._redis, self._stream)
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
        ttl = max(30.0, self.settings.retry_after * 3)
        await publish_status(self._redis, self._keys, self.consumer, status, ttl=ttl)
