"""Appending to a topic: batches stored whole, packed entries, the topic list, retention."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from structlog.testing import capture_logs

from drainbus.bus.publisher import ENTRY_BYTES, Publisher, pack_messages
from drainbus.bus.streams import Entry, Keys, read_rows
from drainbus.errors import BackendUnavailable

TOPIC = "alice/pub"


def publisher(
    redis: Redis, namespace: str, *, max_len: int = 100_000, retention: float = 3600
) -> Publisher:
    return Publisher(redis, Keys(namespace), max_len=max_len, retention=retention)


async def stored(redis: Redis, namespace: str, topic: str = TOPIC) -> list[Entry]:
    return [
        Entry.from_redis(i, f) for i, f in await read_rows(redis, Keys(namespace).stream(topic))
    ]


# --- packing --------------------------------------------------------------------------------

HALF = ENTRY_BYTES // 2 - 1  # two of these and their newlines fill an entry exactly


@pytest.mark.parametrize(
    ("sizes", "entries"),
    [
        pytest.param([], [], id="nothing"),
        pytest.param([3, 4], [[3, 4]], id="small-share"),
        pytest.param([HALF, HALF], [[HALF, HALF]], id="exactly-full"),
        pytest.param([HALF + 1, HALF], [[HALF + 1], [HALF]], id="one-byte-over"),
        pytest.param([HALF, HALF, HALF], [[HALF, HALF], [HALF]], id="counts-every-message"),
        pytest.param(
            [ENTRY_BYTES - 1, HALF, HALF],
            [[ENTRY_BYTES - 1], [HALF, HALF]],
            id="a-new-entry-starts-empty",
        ),
        pytest.param([ENTRY_BYTES * 2, 1], [[ENTRY_BYTES * 2], [1]], id="longer-alone"),
    ],
)
def test_pack_messages_fills_entries_up_to_entry_bytes(
    sizes: list[int], entries: list[list[int]]
) -> None:
    """Messages share an entry while they and their newlines fit in ENTRY_BYTES, in order."""
    messages = [bytes([65 + n]) * size for n, size in enumerate(sizes)]
    packed = pack_messages(messages)
    assert [[len(m) for m in entry] for entry in packed] == entries
    assert [m for entry in packed for m in entry] == messages


# --- publishing -----------------------------------------------------------------------------


async def test_nothing_to_publish_stores_nothing(redis: Redis, namespace: str) -> None:
    """An empty batch returns no ids and creates no stream."""
    assert await publisher(redis, namespace).publish(TOPIC, [], user="alice") == []
    assert not await redis.exists(Keys(namespace).stream(TOPIC))


@pytest.mark.parametrize("count", [1, 2, 3], ids=["one", "two", "three"])
async def test_each_message_is_an_entry_of_its_own_by_default(
    redis: Redis, namespace: str, count: int
) -> None:
    """Without pack, each message is one plain entry; the ids returned are the stored ones."""
    messages = [b"m%d" % n for n in range(count)]
    before = int(time.time() * 1000)
    ids = await publisher(redis, namespace).publish(TOPIC, messages, user="alice")

    entries = await stored(redis, namespace)
    assert ids == [e.id for e in entries]
    assert [e.data for e in entries] == messages
    assert all(e.user == "alice" and not e.raw and not e.packed for e in entries)
    assert all(e.received_ms >= before for e in entries)
    message_ids = [e.message_id for e in entries]
    assert len(set(message_ids)) == count
    assert all(int(m, 16) >= 0 for m in message_ids)


async def test_pack_shares_entries_and_raw_never_packs(redis: Redis, namespace: str) -> None:
    """pack puts lines in one entry; a raw batch stays one chunk per entry even with pack."""
    pub = publisher(redis, namespace)
    await pub.publish(TOPIC, [b"a", b"b", b"c"], user="alice", pack=True)
    await pub.publish(TOPIC, [b"x", b"y"], user="alice", raw=True, pack=True)

    entries = await stored(redis, namespace)
    assert [(e.messages(), e.packed, e.raw) for e in entries] == [
        ([b"a", b"b", b"c"], True, False),
        ([b"x"], False, True),
        ([b"y"], False, True),
    ]


async def test_each_append_trims_to_max_len(redis: Redis, namespace: str) -> None:
    """The stream is kept near max_len (approximately: whole nodes), by one XADD or several."""
    pub = publisher(redis, namespace, max_len=10)
    for n in range(300):
        await pub.publish(TOPIC, [b"%d" % n], user="alice")
    assert await redis.xlen(Keys(namespace).stream(TOPIC)) < 300
    for n in range(0, 300, 3):
        await pub.publish("alice/batches", [b"%d" % n, b"%d" % (n + 1), b"%d" % (n + 2)],
                          user="alice")  # fmt: skip
    assert await redis.xlen(Keys(namespace).stream("alice/batches")) < 300


async def test_the_topic_is_listed_once_published(redis: Redis, namespace: str) -> None:
    """Publishing adds the topic to the topic list (what ``ls`` shows), every time it must."""
    keys = Keys(namespace)
    pub = publisher(redis, namespace)
    await pub.publish(TOPIC, [b"1"], user="alice")
    assert await redis.smembers(keys.topics) == {TOPIC.encode()}
    await redis.delete(keys.topics)  # e.g. Redis lost it: this process does not re-add it
    await pub.publish(TOPIC, [b"2"], user="alice")
    await publisher(redis, namespace).publish("bob/pub", [b"3"], user="bob")
    assert await redis.smembers(keys.topics) == {b"bob/pub"}


@pytest.mark.usefixtures("fresh_logging")
async def test_a_housekeeping_failure_is_logged_and_loses_nothing(
    redis: Redis, namespace: str
) -> None:
    """If the topic list cannot be updated the messages are still stored, and it is logged."""
    keys = Keys(namespace)
    await redis.set(keys.topics, "not a set")  # SADD on it fails with WRONGTYPE
    with capture_logs() as logs:
        ids = await publisher(redis, namespace).publish(TOPIC, [b"kept"], user="alice")

    assert [e.id for e in await stored(redis, namespace)] == ids
    failures = [log for log in logs if log["event"] == "topic_housekeeping_failed"]
    assert len(failures) == 1
    assert failures[0]["topic"] == TOPIC
    assert "WRONGTYPE" in failures[0]["error"]
    assert failures[0]["log_level"] == "warning"


async def test_retention_trims_old_entries_once_per_interval(redis: Redis, namespace: str) -> None:
    """Entries older than the retention go at the first publish; then not again for a while."""
    key = Keys(namespace).stream(TOPIC)
    now = int(time.time() * 1000)
    old, recent = now - 120_000, now - 30_000  # the retention is a minute
    for ms in (old, recent):
        for n in range(300):
            await redis.xadd(key, {"d": b"%d" % ms}, id=f"{ms}-{n}")
    pub = publisher(redis, namespace, retention=60)

    [new] = await pub.publish(TOPIC, [b"new"], user="alice")
    entries = await stored(redis, namespace)
    assert entries[-1].id == new
    assert [e.id[0] for e in entries].count(recent) == 300
    assert [e.id[0] for e in entries].count(old) < 300  # approximately: whole nodes went

    # Within the interval nothing is trimmed, even what is now past the retention.
    pub_now = publisher(redis, namespace, retention=0)
    for n in range(300):
        await pub_now.publish(TOPIC, [b"%d" % n], user="alice")
    before = len(await stored(redis, namespace))
    for n in range(300):
        await pub_now.publish(TOPIC, [b"%d" % n], user="alice")
    assert len(await stored(redis, namespace)) == before + 300


async def test_retention_is_due_per_topic(redis: Redis, namespace: str) -> None:
    """Trimming one topic by age does not put off the first trim of another."""
    key = Keys(namespace).stream("alice/other")
    old = int(time.time() * 1000) - 120_000
    for n in range(300):
        await redis.xadd(key, {"d": b"old"}, id=f"{old}-{n}")
    pub = publisher(redis, namespace, retention=60)

    await pub.publish(TOPIC, [b"first"], user="alice")
    await pub.publish("alice/other", [b"new"], user="alice")

    assert await redis.xlen(key) < 300  # approximately: whole nodes went


async def test_an_unreachable_redis_is_backend_unavailable() -> None:
    """No Redis: BackendUnavailable (exit 69) naming the topic and the client's error."""
    dead = Redis(unix_socket_path="/nonexistent/redis.sock", retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await publisher(dead, "t").publish(TOPIC, [b"lost"], user="alice")
    finally:
        await dead.aclose()
    message = str(caught.value)
    assert message.startswith(
        f"backend unavailable: Redis did not answer while publishing to '{TOPIC}' ("
    )
    assert "No such file or directory" in message
