"""Receipts for stale refills: which entries a refill belongs to, for how long, and what is
written when one is evicted (the stream and receipt writer are real; the clock is a stub)."""

from __future__ import annotations

import types
from functools import partial
from typing import Any

import anyio
import pytest
import structlog
from redis.asyncio import Redis
from structlog.testing import capture_logs

from drainbus.bus.streams import Keys, Row
from drainbus.drain import refill_receipts
from drainbus.drain.purges import Purge, parse_purge
from drainbus.drain.receipt_writer import ReceiptWriter
from drainbus.drain.receipts import receipts_of, receipts_topic, target_part
from drainbus.drain.refill_receipts import RefillReceipts, read_entries

TOPIC = "cache-drain"
WINDOW = 10.0  # refill_window: a purge is remembered for it and 5 s more


class Clock:
    """time.monotonic for refill_receipts, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(refill_receipts, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return clock


async def publish(redis: Redis, stream: str, *lines: str, user: str = "acme") -> list[Row]:
    rows: list[Row] = []
    for line in lines:
        entry_id: Any = await redis.xadd(stream, {"d": line, "u": user, "m": line})
        rows.append((bytes(entry_id), {b"d": line.encode(), b"u": user.encode()}))
    return rows


def memory(purges: list[str], rows: list[Row]) -> tuple[list[Purge], dict[Purge, list[Row]]]:
    """A batch: purge i of ``purges`` with entry i of ``rows``."""
    batch = {parse_purge(line): [row] for line, row in zip(purges, rows, strict=True)}
    return list(batch), batch


def refills(clock: Clock | None = None, **kwargs: Any) -> RefillReceipts:
    async def no_append(records: Any) -> None:
        raise AssertionError("nothing is written here")

    async def no_fetch(ids: Any) -> list[Row]:
        raise AssertionError("nothing is read here")

    return RefillReceipts(WINDOW, node="web1", **{"append": no_append, "fetch": no_fetch, **kwargs})


async def test_read_entries_reads_back_those_still_in_the_stream(
    redis: Redis, namespace: str
) -> None:
    """In the order asked, without those trimmed (deleted) since; nothing for no ids."""
    stream = Keys(namespace).stream(TOPIC)
    rows = await publish(redis, stream, "a", "b", "c")
    await redis.xdel(stream, rows[1][0])
    read = await read_entries(redis, stream, [rows[2][0], rows[1][0], rows[0][0]])
    assert [(i, f[b"d"]) for i, f in read] == [(rows[2][0], b"c"), (rows[0][0], b"a")]
    assert await read_entries(redis, stream, []) == []


def test_the_latest_batch_that_carried_out_a_purge_names_its_entries(clock: Clock) -> None:
    """Only the purges done are remembered; a later batch's entries replace an earlier's."""
    memo = refills()
    one: Row = (b"1-0", {})
    two: Row = (b"2-0", {})
    three: Row = (b"3-0", {})
    purges, batch = memory(["tag:a", "tag:b"], [one, two])
    memo.remember(purges[:1], batch)  # tag:b was not done
    assert memo.entries(parse_purge("tag:a")) == [b"1-0"]
    assert memo.entries(parse_purge("tag:b")) == []
    clock.now += 1
    purges, batch = memory(["tag:a"], [three])
    memo.remember(purges, {purges[0]: [three, one]})
    assert memo.entries(parse_purge("tag:a")) == [b"3-0", b"1-0"]
    assert memo.entries(parse_purge("tag:never")) == []


def test_a_purge_is_remembered_for_the_refill_window_and_two_seconds(clock: Clock) -> None:
    """Batches older than refill_window + 2 s are forgotten at the next remember, all of
    them, oldest first; one exactly that old is kept."""
    memo = refills()
    for n, line in enumerate(["tag:a", "tag:b", "tag:c"]):
        clock.now = 1000.0 + n
        memo.remember(*memory([line], [(f"{n}-0".encode(), {})]))
    clock.now = 1002.0 + WINDOW + 2.0  # tag:a and tag:b aged out; tag:c is just that old
    memo.remember(*memory(["tag:d"], [(b"3-0", {})]))
    assert [memo.entries(parse_purge(f"tag:{t}")) for t in "abcd"] == [[], [], [b"2-0"], [b"3-0"]]


async def test_an_eviction_is_receipted_for_each_entry_of_its_purge(
    redis: Redis, namespace: str, clock: Clock
) -> None:
    """Each entry of the latest batch that carried the purge out gets a refill receipt naming
    the target and the count, with its line and publisher read back from the stream; an entry
    trimmed since gets none, and an eviction of a purge no longer remembered writes nothing."""
    keys = Keys(namespace)
    stream, receipts_key = keys.stream(TOPIC), keys.stream(receipts_topic(TOPIC))
    writer = ReceiptWriter(redis, receipts_key, max_len=1000, retention=3600)
    memo = refills(append=writer.append, fetch=partial(read_entries, redis, stream))
    rows = await publish(redis, stream, "tag:a", "tag:a", "tag:a", "tag:b")
    tag_a = parse_purge("tag:a")
    memo.remember([tag_a], {tag_a: rows[:3]})
    await redis.xdel(stream, rows[1][0])
    async with anyio.create_task_group() as tg:
        tg.start_soon(memo.run)
        await anyio.wait_all_tasks_blocked()  # run is waiting for evictions
        memo.evicted("pages", parse_purge("tag:b"), 1)  # never remembered
        memo.evicted("pages", tag_a, 3)
        with anyio.fail_after(5):
            while not await redis.exists(receipts_key):
                await anyio.sleep(0.01)  # the stream is the only sign of the write
        tg.cancel_scope.cancel()
    entries: Any = await redis.xrange(receipts_key)
    written = [r for i, f in entries for r in receipts_of(i, f)]
    assert written == [
        {"id": row[0].decode(), "purge": "tag:a", "user": "acme", "node": "web1",
         "role": "local", "targets": [target_part("pages", "evicted", count=3)], "refill": True}
        for row in (rows[0], rows[2])
    ]  # fmt: skip


async def test_an_eviction_reported_while_not_running_is_ignored() -> None:
    """Before run() (or after), a report is dropped quietly: there is no one to write it."""
    refills().evicted("pages", parse_purge("tag:a"), 1)


async def test_a_full_queue_drops_the_receipt_with_a_warning(
    fresh_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,024 reports wait at most (and one the writer is waiting for); the guard is never
    blocked: the next is dropped and logged, and those queued are still written."""
    monkeypatch.setattr(refill_receipts, "log", structlog.get_logger("drainbus.drain.daemon"))
    written: list[Any] = []

    async def fetch(ids: Any) -> list[Row]:
        return []

    async def append(records: Any) -> None:
        written.append(records)

    memo = refills(append=append, fetch=fetch)
    memo.remember(*memory(["tag:a"], [(b"1-0", {})]))
    async with anyio.create_task_group() as tg:
        tg.start_soon(memo.run)
        await anyio.wait_all_tasks_blocked()
        with capture_logs() as logs:
            for _ in range(1026):  # no await between: the writer cannot take any more
                memo.evicted("pages", parse_purge("tag:a"), 7)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert logs == [
        {"event": "drain_refill_receipt_dropped", "log_level": "warning", "target": "pages",
         "count": 7, "reason": "too many refill receipts queued; the count is in stats"}
    ]  # fmt: skip
    assert len(written) == 1025


async def test_a_receipt_redis_refused_is_logged_and_the_next_is_written(
    redis: Redis, namespace: str, fresh_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eviction happened; only its news is lost: a warning, and the writer goes on."""
    monkeypatch.setattr(refill_receipts, "log", structlog.get_logger("drainbus.drain.daemon"))
    keys = Keys(namespace)
    stream, receipts_key = keys.stream(TOPIC), keys.stream(receipts_topic(TOPIC))
    writer = ReceiptWriter(redis, receipts_key, max_len=1000, retention=3600)
    memo = refills(append=writer.append, fetch=partial(read_entries, redis, stream))
    rows = await publish(redis, stream, "tag:a")
    memo.remember(*memory(["tag:a"], rows))
    await redis.set(receipts_key, "not a stream")  # XADD fails: WRONGTYPE
    async with anyio.create_task_group() as tg:
        tg.start_soon(memo.run)
        await anyio.wait_all_tasks_blocked()
        with capture_logs() as logs:
            memo.evicted("pages", parse_purge("tag:a"), 1)
            with anyio.fail_after(5):
                while not logs:
                    await anyio.sleep(0.01)  # the log is the only sign of the failure
        await redis.delete(receipts_key)
        memo.evicted("pages", parse_purge("tag:a"), 2)
        with anyio.fail_after(5):
            while not await redis.exists(receipts_key):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    [failed] = logs
    assert (failed["event"], failed["log_level"], failed["target"]) == (
        "drain_refill_receipt_failed",
        "warning",
        "pages",
    )
    assert "WRONGTYPE" in failed["error"]
    entries: Any = await redis.xrange(receipts_key)
    assert [r["targets"][0]["count"] for i, f in entries for r in receipts_of(i, f)] == [2]


async def test_a_refill_of_a_purge_no_longer_remembered_says_so(
    fresh_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No receipt can be written for it: a warning says so, rather than nothing at all."""
    monkeypatch.setattr(refill_receipts, "log", structlog.get_logger("drainbus.drain.daemon"))
    memo = refills()  # appending or fetching anything fails the test
    async with anyio.create_task_group() as tg:
        tg.start_soon(memo.run)
        await anyio.wait_all_tasks_blocked()
        with capture_logs() as logs:
            memo.evicted("pages", parse_purge("tag:gone"), 2)
            await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert logs == [
        {"event": "drain_refill_receipt_unmatched", "log_level": "warning", "target": "pages",
         "count": 2, "reason": "the purge's entries are no longer remembered"}
    ]  # fmt: skip
