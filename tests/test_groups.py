"""The drain's questions to Redis about its consumer groups, asked of a real server.

Each test builds a stream and groups in the state a drain meets (read, trimmed, pending on a
dead consumer, claimed again) and checks the answer the daemon acts on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from drainbus.bus.streams import Keys
from drainbus.drain.groups import (
    claim_idle,
    deliveries,
    group_counts,
    own_pending,
    publish_status,
    trimmed_unread,
)


@pytest.fixture
def stream(namespace: str) -> str:
    return Keys(namespace).stream("cache-drain")


async def add(redis: Redis, stream: str, count: int) -> list[bytes]:
    """``count`` entries added to ``stream``; their ids."""
    ids: list[Any] = [await redis.xadd(stream, {"d": f"site-{n}"}) for n in range(count)]
    return [bytes(i) for i in ids]


async def read(redis: Redis, stream: str, group: str, consumer: str, count: int) -> list[bytes]:
    """Deliver ``count`` new entries to ``consumer``; their ids (left pending)."""
    reply: Any = await redis.xreadgroup(group, consumer, {stream: ">"}, count=count)
    return [entry_id for entry_id, _ in reply[0][1]] if reply else []


# --- trimmed_unread -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("read_first", "kept", "missed"),
    [
        pytest.param(10, 2, False, id="read-all-then-trimmed"),
        pytest.param(8, 2, False, id="trimmed-up-to-the-last-read"),
        pytest.param(8, 1, True, id="one-unread-trimmed"),
        pytest.param(0, 2, True, id="none-read"),
        pytest.param(0, 10, False, id="never-trimmed"),
    ],
)
async def test_trimmed_unread_counts_entries_trimmed_before_the_group_read_them(
    redis: Redis, stream: str, read_first: int, kept: int, *, missed: bool
) -> None:
    """Of 10 entries the group read ``read_first``, then the stream was cut to ``kept``:
    a gap only if some entry went without the group reading it."""
    await redis.xgroup_create(stream, "g", id="$", mkstream=True)
    await add(redis, stream, 10)
    if read_first:
        await redis.xack(stream, "g", *await read(redis, stream, "g", "me", read_first))
    await redis.xtrim(stream, maxlen=kept, approximate=False)
    assert await trimmed_unread(redis, stream, "g") is missed


async def test_trimmed_unread_asks_about_the_named_group_only(redis: Redis, stream: str) -> None:
    """Another group's gap is not this group's; a group not on the stream has none."""
    await redis.xgroup_create(stream, "behind", id="$", mkstream=True)
    await redis.xgroup_create(stream, "ahead", id="$")
    await add(redis, stream, 10)
    await read(redis, stream, "ahead", "me", 10)
    await redis.xtrim(stream, maxlen=2, approximate=False)
    assert await trimmed_unread(redis, stream, "behind") is True
    assert await trimmed_unread(redis, stream, "ahead") is False
    assert await trimmed_unread(redis, stream, "absent") is False


@pytest.mark.parametrize(
    ("start", "missed"),
    [
        pytest.param(3, True, id="last-read-before-the-first-kept"),
        pytest.param(8, False, id="last-read-is-the-first-kept"),
        pytest.param(9, False, id="last-read-after-the-first-kept"),
    ],
)
async def test_without_a_read_count_the_gap_is_judged_by_position(
    redis: Redis, stream: str, start: int, *, missed: bool
) -> None:
    """A group Redis keeps no read count for (made at an id in the middle) has a gap if the
    last id it read lies before the stream's first entry."""
    ids = await add(redis, stream, 10)
    await redis.xgroup_create(stream, "g", id=ids[start])
    await redis.xtrim(stream, maxlen=2, approximate=False)  # ids[8] is now the first
    [group] = await redis.xinfo_groups(stream)
    assert group["entries-read"] is None
    assert await trimmed_unread(redis, stream, "g") is missed


async def test_an_emptied_stream_without_a_read_count_has_no_first_entry_to_judge_by(
    redis: Redis, stream: str
) -> None:
    """Every entry trimmed away: with no first entry left, no gap can be placed."""
    ids = await add(redis, stream, 4)
    await redis.xgroup_create(stream, "g", id=ids[1])
    await redis.xtrim(stream, maxlen=0, approximate=False)
    assert await trimmed_unread(redis, stream, "g") is False


# --- claim_idle, deliveries, own_pending ----------------------------------------------------


async def test_idle_entries_are_claimed_page_by_page(redis: Redis, stream: str) -> None:
    """Entries a dead consumer left pending are claimed for this one, ``count`` at a time, in
    id order; entries still being worked on (not idle long enough) are left alone."""
    await redis.xgroup_create(stream, "g", id="$", mkstream=True)
    ids = await add(redis, stream, 5)
    await read(redis, stream, "g", "dead", 5)
    pages = [
        (rows, lost)
        async for rows, lost in claim_idle(redis, stream, "g", "me", min_idle_ms=0, count=2)
    ]
    assert [[i for i, _ in rows] for rows, _ in pages] == [ids[:2], ids[2:4], ids[4:]]
    assert [lost for _, lost in pages] == [0, 0, 0]
    assert pages[0][0][0][1] == {b"d": b"site-0"}
    pending: Any = await redis.xpending_range(stream, "g", min="-", max="+", count=10)
    assert {p["consumer"] for p in pending} == {b"me"}
    busy = [page async for page in claim_idle(redis, stream, "g", "x", min_idle_ms=60_000, count=2)]
    assert busy == [([], 0)]


async def test_claiming_counts_pending_entries_trimmed_meanwhile(redis: Redis, stream: str) -> None:
    """Pending entries trimmed from the stream cannot be claimed: they are counted as lost."""
    await redis.xgroup_create(stream, "g", id="$", mkstream=True)
    ids = await add(redis, stream, 3)
    await read(redis, stream, "g", "dead", 3)
    await redis.xtrim(stream, maxlen=1, approximate=False)
    pages = [page async for page in claim_idle(redis, stream, "g", "me", min_idle_ms=0, count=10)]
    assert [([i for i, _ in rows], lost) for rows, lost in pages] == [([ids[2]], 2)]


async def test_deliveries_counts_each_entry_among_other_consumers_entries(
    redis: Redis, stream: str
) -> None:
    """Each id's delivery count, however the group's other pending entries lie between."""
    await redis.xgroup_create(stream, "g", id="$", mkstream=True)
    ids = await add(redis, stream, 4)
    for n, entry_id in enumerate(ids):
        await read(redis, stream, "g", f"c{n % 2}", 1)
        for _ in range(n):
            await redis.xclaim(stream, "g", f"c{n % 2}", 0, [entry_id])
    counts = await deliveries(redis, stream, "g", [ids[0], ids[2], ids[3]])
    assert counts == {ids[0]: 1, ids[2]: 3, ids[3]: 4}
    assert await deliveries(redis, stream, "g", []) == {}


async def test_own_pending_pages_through_this_consumers_unacknowledged_entries(
    redis: Redis, stream: str
) -> None:
    """After a crash: this consumer's unacknowledged entries, page by page, never another
    consumer's; a page with entries trimmed since names them and skips them."""
    await redis.xgroup_create(stream, "g", id="$", mkstream=True)
    ids = await add(redis, stream, 6)
    mine = await read(redis, stream, "g", "me", 5)
    await read(redis, stream, "g", "other", 1)
    await redis.xack(stream, "g", mine[1])
    await redis.xdel(stream, mine[3])
    pages = [
        ([i for i, _ in rows], trimmed)
        async for rows, trimmed in own_pending(redis, stream, "g", "me", 2)
    ]
    assert pages == [([ids[0], ids[2]], []), ([ids[4]], [ids[3]])]
    assert [page async for page in own_pending(redis, stream, "g", "nobody", 2)] == []


# --- group_counts, publish_status ------------------------------------------------------------


async def test_group_counts_gives_each_groups_lag_and_pending(redis: Redis, stream: str) -> None:
    """(lag, pending) per group by name; lag None where Redis cannot tell it."""
    ids = await add(redis, stream, 5)
    await redis.xgroup_create(stream, "behind", id="0")
    await redis.xgroup_create(stream, "unknown", id=ids[2])
    await read(redis, stream, "behind", "me", 2)
    assert await group_counts(redis, stream) == {"behind": (3, 2), "unknown": (None, 0)}


async def test_publish_status_shares_the_status_and_keeps_the_live_nodes(
    redis: Redis, namespace: str
) -> None:
    """The node's status is stored (as JSON, for ttl seconds) and the node marked live now;
    nodes not heard from within ttl are dropped from the live set, the others kept."""
    keys = Keys(namespace)
    now_ms = int(time.time() * 1000)
    await redis.zadd(keys.drain_nodes, {"gone": now_ms - 31_000, "recent": now_ms - 29_000})
    await publish_status(redis, keys, "web1", {"path": Path("/x"), "n": 1}, ttl=30)
    status: Any = await redis.get(keys.drain_status("web1"))
    assert json.loads(status) == {"path": "/x", "n": 1}
    assert 29_000 < await redis.pttl(keys.drain_status("web1")) <= 30_000
    scored: Any = await redis.zrange(keys.drain_nodes, 0, -1, withscores=True)
    nodes = dict(scored)
    assert set(nodes) == {b"recent", b"web1"}
    assert now_ms <= nodes[b"web1"] <= time.time() * 1000
