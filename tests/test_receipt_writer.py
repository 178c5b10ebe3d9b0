"""The receipt stream: a batch's receipts packed in as few entries as hold them, trimmed to about
as many receipts as the topic keeps, and by age."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.asyncio import Redis

from drainbus.bus.streams import Keys
from drainbus.drain.receipt_writer import ReceiptWriter
from drainbus.drain.receipts import receipts_of, receipts_topic


@pytest.fixture
def stream(namespace: str) -> str:
    return Keys(namespace).stream(receipts_topic("cache-drain"))


def records(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"{n}-0", "purge": f"site-{n}", "node": "web1"} for n in range(start, count)]


async def stored(redis: Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries: Any = await redis.xrange(stream)
    return [(bytes(i), dict(f)) for i, f in entries]


async def test_a_batch_is_packed_a_thousand_receipts_per_entry(redis: Redis, stream: str) -> None:
    """2,001 receipts are three entries (1,000, 1,000 and 1), each receipt read back as one
    message, in order; the entries name no user (each receipt names its own)."""
    writer = ReceiptWriter(redis, stream, max_len=100_000, retention=3600)
    before_ms = int(time.time() * 1000)
    await writer.append(records(2001))
    entries = await stored(redis, stream)
    assert [len(receipts_of(i, f)) for i, f in entries] == [1000, 1000, 1]
    assert [r for i, f in entries for r in receipts_of(i, f)] == records(2001)
    assert [f.get(b"n") for _, f in entries] == [b"1000", b"1000", None]
    assert {f[b"u"] for _, f in entries} == {b""}
    assert len({f[b"m"] for _, f in entries}) == 3  # a message id of its own each
    assert {len(f[b"m"]) for _, f in entries} == {16}  # 16 hex digits, as pub's
    assert all(b"r" not in f for _, f in entries)  # lines of text, not a raw chunk
    assert all(int(f[b"t"]) >= before_ms for _, f in entries)


async def test_no_receipts_write_nothing(redis: Redis, stream: str) -> None:
    """An empty batch adds no entry (and does not even create the stream)."""
    await ReceiptWriter(redis, stream, max_len=10, retention=3600).append([])
    assert await redis.exists(stream) == 0


async def test_the_stream_keeps_about_max_len_receipts_not_entries(
    redis: Redis, stream: str
) -> None:
    """Batches of 10 receipts with max_len 300: the stream is trimmed to about 30 entries
    (300 receipts), not left at 300 entries (3,000 receipts) nor cut to a handful."""
    writer = ReceiptWriter(redis, stream, max_len=300, retention=3600)
    for batch in range(200):
        await writer.append(records(batch * 10 + 10, batch * 10))
    entries = await stored(redis, stream)
    kept = sum(len(receipts_of(i, f)) for i, f in entries)
    # Approximate trimming removes whole nodes of the stream: a little more than asked stays.
    assert 300 <= kept < 1000, kept
    assert receipts_of(*entries[-1])[-1]["id"] == "1999-0"  # the newest are kept


async def test_receipts_older_than_the_retention_are_trimmed_exactly(
    redis: Redis, stream: str
) -> None:
    """Receipts an hour and a minute and 30 ms old go at the next append when the retention
    is a minute; the new ones and one 30 s old stay, though all of them share the stream's
    first node."""
    now_ms = int(time.time() * 1000)
    await redis.xadd(stream, {"d": "old"}, id=f"{now_ms - 3_600_000}-0")
    await redis.xadd(stream, {"d": "just over"}, id=f"{now_ms - 60_030}-0")
    await redis.xadd(stream, {"d": "recent"}, id=f"{now_ms - 30_000}-0")
    await ReceiptWriter(redis, stream, max_len=100_000, retention=60).append(records(2))
    entries = await stored(redis, stream)
    assert [f[b"d"] for _, f in entries[:1]] == [b"recent"]
    assert [r["id"] for i, f in entries[1:] for r in receipts_of(i, f)] == ["0-0", "1-0"]
