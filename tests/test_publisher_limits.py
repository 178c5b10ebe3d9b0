"""The publisher's limits and durability, in process: the purge rate limit, the storage quotas,
the byte cap, Redis Cluster's reservation, and what makes a batch count as stored.

The same behaviour is tested end to end through OpenSSH in test_limits, test_durability and
test_disk_full; these tests drive :class:`Publisher` directly against real servers (the
suite's Redis, a private embedded one where a test breaks its disk, the Redis Cluster, a
primary with a replica for the waits), fast enough to run for every mutant (scripts/mutate).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from drainbus.bus.connection import RedisClient, command_client
from drainbus.bus.embedded import EmbeddedRedis
from drainbus.bus.limits import ENTRY_OVERHEAD, Limits, PublishRefused
from drainbus.bus.persistence import Persistence
from drainbus.bus.publisher import APPEND_ENTRIES, Publisher, append_args
from drainbus.bus.streams import Keys, StreamId, parse_id, read_rows, text
from drainbus.errors import BackendUnavailable, NotDurable
from drainbus.metrics import PUBLISH_REFUSED
from drainbus.values import Durability
from tests.redis_topology import MakeServers, binaries

DRAIN = "cache-drain"
MESSAGE = 100  # bytes of each test message: an entry of it counts SIZE against the quotas
SIZE = MESSAGE + ENTRY_OVERHEAD
REDIS_7_0 = shutil.which("redis-server")  # Debian 12's 7.0: WAIT, but no WAITAOF


def lines(prefix: str, count: int) -> list[bytes]:
    """``count`` distinct messages of MESSAGE bytes each."""
    return [f"{prefix}-{n}-".encode().ljust(MESSAGE, b"x") for n in range(count)]


def publisher(redis: RedisClient, namespace: str, limits: Limits, **kw: Any) -> Publisher:
    return Publisher(redis, Keys(namespace), max_len=1000, retention=3600, limits=limits, **kw)


async def refusal(
    pub: Publisher, topic: str, messages: Sequence[bytes], user: str, **kw: Any
) -> PublishRefused:
    """The PublishRefused that publishing ``messages`` raises."""
    with pytest.raises(PublishRefused) as caught:
        await pub.publish(topic, messages, user=user, **kw)
    return caught.value


async def stored(redis: RedisClient, namespace: str, topic: str) -> list[tuple[StreamId, bytes]]:
    """(id, message) of each entry ``topic``'s stream holds."""
    rows = await read_rows(redis, Keys(namespace).stream(topic))
    return [(parse_id(entry_id), fields[b"d"]) for entry_id, fields in rows]


async def usage(redis: RedisClient, namespace: str, owner: str) -> dict[str, int]:
    """The bytes each topic of ``owner`` counts against their quota."""
    counted = await redis.hgetall(Keys(namespace).usage(owner))
    return {text(topic): int(size) for topic, size in counted.items()}


def refused_count(reason: str) -> float:
    return float(PUBLISH_REFUSED.labels(reason)._value.get())  # no public getter


# --- the receipts' append script ------------------------------------------------------------


async def test_append_entries_stores_each_field_map_as_an_entry_in_order(
    redis: Redis, namespace: str
) -> None:
    """append_args lays out MAXLEN, then each entry's field count and pairs; the script
    stores one entry per map, fields as given, and returns their ids in order."""
    stream = Keys(namespace).stream("receipts")
    entries: list[dict[Any, Any]] = [{"d": b"one", "u": "alice"}, {"d": b"two", "u": "bob", "n": 2}]
    args = append_args(7, entries)
    assert args == [7, 2, "d", b"one", "u", "alice", 3, "d", b"two", "u", "bob", "n", 2]

    ids = await redis.register_script(APPEND_ENTRIES)(keys=[stream], args=args)

    rows = await read_rows(redis, stream)
    assert ids == [entry_id for entry_id, _ in rows]
    assert [fields for _, fields in rows] == [
        {b"d": b"one", b"u": b"alice"},
        {b"d": b"two", b"u": b"bob", b"n": b"2"},
    ]


# --- the purge rate limit -------------------------------------------------------------------

# 60 a minute: one token a second, so nothing refills within a test's few milliseconds.
RATE = Limits(drain_topic=DRAIN, purges_per_minute=60, purge_burst=3, admins=frozenset({"root"}))


async def test_over_the_rate_the_burst_is_stored_and_the_rest_refused(
    redis: Redis, namespace: str
) -> None:
    """A user sending more purges than the burst gets exactly the burst stored and a
    refusal saying which limit, how many of each and when one more fits; another user has
    a bucket of their own."""
    pub = publisher(redis, namespace, RATE)
    before = refused_count("rate")
    purges = lines("acme", 5)

    refused = await refusal(pub, DRAIN, purges, "acme")

    assert (refused.reason, refused.stored, refused.refused) == ("rate", 3, 2)
    assert refused.message == (
        "over user acme's purge rate limit (drain.max_purges_per_user: 60 per minute, bursts of 3)"
    )
    assert refused.retry_after == 1.0  # the bucket is empty: one token takes 1,000 ms
    assert refused.per_minute == 60
    assert (refused.user, refused.topic, refused.exit_code) == ("acme", DRAIN, 75)
    assert await stored(redis, namespace, DRAIN) == list(zip(refused.ids, purges[:3], strict=True))
    assert refused_count("rate") - before == 2
    assert len(await pub.publish(DRAIN, lines("beta", 3), user="beta")) == 3
    assert len(await pub.publish("acme/notes", lines("n", 5), user="acme")) == 5  # no limit


async def test_packed_purges_cost_one_token_per_line(redis: Redis, namespace: str) -> None:
    """An entry packing two lines takes two tokens: with one left, it is refused whole."""
    pub = publisher(redis, namespace, RATE)
    await pub.publish(DRAIN, [b"acme-a", b"acme-b"], user="acme", pack=True)

    refused = await refusal(pub, DRAIN, [b"acme-c", b"acme-d"], "acme", pack=True)

    assert (refused.stored, refused.refused, refused.ids) == (0, 2, [])
    assert refused.retry_after is not None
    assert 0.9 < refused.retry_after <= 1.0  # one more token: a second, less what refilled
    assert [d for _, d in await stored(redis, namespace, DRAIN)] == [b"acme-a\nacme-b"]


async def test_admins_are_not_rate_limited(redis: Redis, namespace: str) -> None:
    """server.admins publish every purge they send."""
    pub = publisher(redis, namespace, RATE)
    assert len(await pub.publish(DRAIN, lines("x", 10), user="Root")) == 10


async def test_more_refused_input_is_counted_on_the_refusal(redis: Redis, namespace: str) -> None:
    """refuse_more adds the lines a session never offered after a refusal to its count and
    to the metric."""
    pub = publisher(redis, namespace, RATE)
    refused = await refusal(pub, DRAIN, lines("acme", 4), "acme")
    before = refused_count("rate")

    pub.refuse_more(refused, 7)

    assert (refused.stored, refused.refused) == (3, 8)
    assert refused_count("rate") - before == 7


# --- the storage quotas ---------------------------------------------------------------------


async def test_over_the_byte_quota_what_fits_is_stored(redis: Redis, namespace: str) -> None:
    """The quota counts every entry's size on the owner's topics; the entries that fit are
    stored, the rest refused with the quota named; other owners are not touched."""
    pub = publisher(redis, namespace, Limits(max_user_bytes=3 * SIZE))
    before = refused_count("bytes")
    messages = lines("a", 5)

    refused = await refusal(pub, "alice/x", messages, "alice")

    assert (refused.reason, refused.stored, refused.refused) == ("bytes", 3, 2)
    assert refused.message == (
        "over the storage quota of alice's topics (server.max_user_bytes: 492 B); older "
        "messages make room as retention trims them"
    )
    assert (refused.retry_after, refused.per_minute) == (None, None)
    assert await stored(redis, namespace, "alice/x") == list(
        zip(refused.ids, messages[:3], strict=True)
    )
    assert await usage(redis, namespace, "alice") == {"alice/x": 3 * SIZE}
    assert refused_count("bytes") - before == 2
    assert await redis.smembers(Keys(namespace).topics) == {b"alice/x"}
    assert len(await pub.publish("bob/x", lines("b", 3), user="bob")) == 3


async def test_a_failed_append_stores_and_counts_nothing(redis: Redis, namespace: str) -> None:
    """When Redis fails the append script, none of the batch is stored or counted."""
    keys = Keys(namespace)
    pub = publisher(redis, namespace, Limits(max_user_bytes=100 * SIZE))
    await pub.publish("alice/x", lines("a", 1), user="alice")
    await redis.delete(keys.stream_bytes("alice/x"))
    await redis.hset(keys.stream_bytes("alice/x"), "not", "a count")  # its GET fails

    with pytest.raises(BackendUnavailable, match="WRONGTYPE"):
        await pub.publish("alice/x", lines("b", 2), user="alice")

    assert len(await stored(redis, namespace, "alice/x")) == 1
    assert await usage(redis, namespace, "alice") == {"alice/x": SIZE}


async def test_a_new_topic_over_the_topic_quota_is_refused_whole(
    redis: Redis, namespace: str
) -> None:
    """At max_topics_per_user (one owner whatever the case), a third topic stores nothing and
    is not listed; the owner's topics stay usable."""
    pub = publisher(redis, namespace, Limits(max_user_bytes=1 << 20, max_topics_per_user=2))
    await pub.publish("alice/a", [b"1"], user="alice")
    await pub.publish("Alice/b", [b"2"], user="alice")

    refused = await refusal(pub, "alice/c", [b"3", b"4"], "alice")

    assert (refused.reason, refused.stored, refused.refused) == ("topics", 0, 2)
    assert refused.message == (
        "'alice' already stores 2 topics (server.max_topics_per_user); a topic stops "
        "counting once nothing of it is stored"
    )
    assert await stored(redis, namespace, "alice/c") == []
    assert b"alice/c" not in await redis.smembers(Keys(namespace).topics)
    assert len(await pub.publish("alice/a", [b"5"], user="alice")) == 1


async def test_an_admin_is_never_refused_but_their_bytes_count(
    redis: Redis, namespace: str
) -> None:
    """An admin writing past alice's quota into her topic is stored; the bytes are hers."""
    limits = Limits(max_user_bytes=3 * SIZE, max_topics_per_user=1, admins=frozenset({"root"}))
    pub = publisher(redis, namespace, limits)
    assert len(await pub.publish("alice/x", lines("r", 5), user="root")) == 5
    assert len(await pub.publish("alice/y", lines("r", 1), user="root")) == 1  # a 2nd topic

    assert await usage(redis, namespace, "alice") == {"alice/x": 5 * SIZE, "alice/y": SIZE}
    assert (await refusal(pub, "alice/x", [b"a"], "alice")).reason == "bytes"
    assert (await refusal(pub, "alice/z", [b"a"], "alice")).reason == "topics"


async def test_a_drifted_count_is_recounted_at_most_once_a_minute(
    redis: Redis, namespace: str
) -> None:
    """Before a quota refusal stands, the owner's usage is counted again from the streams and
    the rest of the batch offered again; within the minute after, a refusal stands as
    counted."""
    keys = Keys(namespace)
    pub = publisher(redis, namespace, Limits(max_user_bytes=5 * SIZE))
    await pub.publish("alice/x", lines("old", 2), user="alice")
    await redis.hincrby(keys.usage("alice"), "alice/x", 2 * SIZE)  # e.g. a batch cut off
    messages = [b"n" * MESSAGE, b"n" * 50, b"n" * 60, b"n" * 150]  # sizes differ: each counts

    refused = await refusal(pub, "alice/x", messages, "alice")

    # 1 fitted as counted; after the recount the next two did (2 * SIZE left), the last not.
    assert (refused.reason, refused.stored, refused.refused) == ("bytes", 3, 1)
    held = await stored(redis, namespace, "alice/x")
    assert held[2:] == list(zip(refused.ids, messages[:3], strict=True))
    counted = 3 * SIZE + 50 + 60 + 2 * ENTRY_OVERHEAD
    assert await usage(redis, namespace, "alice") == {"alice/x": counted}

    await redis.hdel(keys.usage("alice"), "alice/x")  # under-counted now: room for all
    await redis.hincrby(keys.usage("alice"), "alice/x", 6 * SIZE)  # over-counted again
    again = await refusal(pub, "alice/x", [b"z"], "alice")
    assert (again.stored, again.refused) == (0, 1)
    assert await usage(redis, namespace, "alice") == {"alice/x": 6 * SIZE}  # not recounted


async def test_a_topic_refusal_is_recounted_too(redis: Redis, namespace: str) -> None:
    """A topic still counted though nothing of it is stored goes at the recount, and the
    new topic it kept out is stored."""
    keys = Keys(namespace)
    pub = publisher(redis, namespace, Limits(max_user_bytes=1 << 20, max_topics_per_user=1))
    await redis.hset(keys.usage("alice"), "alice/gone", SIZE)

    [entry] = await pub.publish("alice/x", [b"m"], user="alice")

    assert await stored(redis, namespace, "alice/x") == [(entry, b"m")]
    assert await usage(redis, namespace, "alice") == {"alice/x": 1 + ENTRY_OVERHEAD}


@pytest.mark.usefixtures("fresh_logging")
async def test_a_failed_recount_is_logged_and_the_refusal_stands(
    redis: Redis, namespace: str
) -> None:
    """A recount that fails leaves the count as it was; the refusal is the counted one."""
    keys = Keys(namespace)
    pub = publisher(redis, namespace, Limits(max_user_bytes=2 * SIZE))
    await redis.hset(keys.usage("alice"), "alice/gone", 10 * SIZE)
    await redis.hset(keys.stream_bytes("alice/gone"), "not", "a count")  # GET fails: WRONGTYPE

    with capture_logs() as logs:
        refused = await refusal(pub, "alice/x", [b"m"], "alice")

    assert (refused.reason, refused.stored) == ("bytes", 0)
    [failed] = [e for e in logs if e["event"] == "quota_recount_failed"]
    assert (failed["owner"], failed["log_level"]) == ("alice", "warning")
    assert "WRONGTYPE" in failed["error"]


async def test_the_byte_cap_keeps_the_newest_entries_and_frees_their_quota(
    redis: Redis, namespace: str
) -> None:
    """topics.max_bytes trims a stream to the newest entries within it; the bytes trimmed no
    longer count against the owner."""
    pub = publisher(redis, namespace, Limits(max_user_bytes=100 * SIZE, max_topic_bytes=3 * SIZE))
    messages = lines("m", 5)

    await pub.publish("alice/x", messages, user="alice")

    assert [d for _, d in await stored(redis, namespace, "alice/x")] == messages[2:]
    assert await usage(redis, namespace, "alice") == {"alice/x": 3 * SIZE}


# --- Redis Cluster: the usage hash in another slot than the stream ------------------------


@pytest.fixture
async def cluster(redis_cluster_url: str) -> AsyncIterator[RedisClient]:
    """A client of the tests' Redis Cluster, closed after the test."""
    client = command_client(redis_cluster_url)
    yield client
    await client.aclose()


async def test_on_redis_cluster_the_quotas_hold_and_admins_pass(
    cluster: RedisClient, namespace: str
) -> None:
    """The bytes are reserved in the owner's slot first: the longest prefix that fits is
    stored, a topic over the topic quota is refused whole, an admin is stored and counted."""
    limits = Limits(max_user_bytes=3 * SIZE, max_topics_per_user=2, admins=frozenset({"root"}))
    pub = publisher(cluster, namespace, limits)
    await pub.publish("alice/a", lines("a", 2), user="alice")
    messages = lines("b", 2)

    over_bytes = await refusal(pub, "alice/b", messages, "alice")
    over_topics = await refusal(pub, "alice/c", [b"c"], "alice")
    by_admin = await pub.publish("alice/a", lines("r", 2), user="root")
    purges = await pub.publish(DRAIN, [b"alice-a", b"alice-b"], user="alice")  # no owner

    assert (over_bytes.reason, over_bytes.stored, over_bytes.refused) == ("bytes", 1, 1)
    assert await stored(cluster, namespace, "alice/b") == [(over_bytes.ids[0], messages[0])]
    assert (over_topics.reason, over_topics.stored) == ("topics", 0)
    assert await stored(cluster, namespace, "alice/c") == []
    assert len(by_admin) == 2
    assert [i for i, _ in await stored(cluster, namespace, DRAIN)] == purges
    assert await usage(cluster, namespace, "alice") == {"alice/a": 4 * SIZE, "alice/b": SIZE}


async def test_on_redis_cluster_trimmed_and_failed_bytes_are_given_back(
    cluster: RedisClient, namespace: str
) -> None:
    """What the byte cap trims is credited back to the owner, and so is a reservation whose
    append failed."""
    keys = Keys(namespace)
    pub = publisher(cluster, namespace, Limits(max_user_bytes=100 * SIZE, max_topic_bytes=3 * SIZE))
    messages = lines("m", 5)

    await pub.publish("alice/x", messages, user="alice")
    await cluster.set(keys.stream("carol/x"), "not a stream")
    with pytest.raises(BackendUnavailable, match="WRONGTYPE"):
        await pub.publish("carol/x", [b"lost"], user="carol")

    assert [d for _, d in await stored(cluster, namespace, "alice/x")] == messages[2:]
    assert await usage(cluster, namespace, "alice") == {"alice/x": 3 * SIZE}
    assert await usage(cluster, namespace, "carol") == {}


@pytest.mark.usefixtures("fresh_logging")
async def test_on_redis_cluster_a_failed_give_back_is_logged_and_loses_nothing(
    cluster: RedisClient, namespace: str
) -> None:
    """A credit the owner's hash refuses (here: lowering a corrupt count would overflow it)
    leaves the count high, is logged, and the batch is stored as published."""
    keys = Keys(namespace)
    limits = Limits(max_user_bytes=100 * SIZE)
    await publisher(cluster, namespace, limits).publish("alice/x", lines("old", 10), user="alice")
    await cluster.hset(keys.usage("alice"), "alice/x", -(2**63) + 100)
    capped = publisher(cluster, namespace, replace(limits, max_topic_bytes=SIZE))

    with capture_logs() as logs:
        [new] = await capped.publish("alice/x", [b"new"], user="alice")

    assert await stored(cluster, namespace, "alice/x") == [(new, b"new")]
    [failed] = [e for e in logs if e["event"] == "quota_credit_failed"]
    assert (failed["topic"], failed["bytes"], failed["log_level"]) == (
        "alice/x",
        10 * SIZE,
        "warning",
    )
    assert "overflow" in failed["error"]


# --- durability -----------------------------------------------------------------------------


@pytest.fixture
async def private_redis(short_tmp: Path) -> AsyncIterator[tuple[Redis, Path]]:
    """A private embedded server (its data dir too), for tests that count its commands or
    break its disk."""
    data_dir = short_tmp / f"pl-{secrets.token_hex(4)}"
    with EmbeddedRedis(data_dir, maxmemory=64 * 1024 * 1024) as server:
        client = Redis.from_url(server.url)
        yield client, data_dir
        await client.aclose()


async def calls(redis: Redis, *commands: str) -> list[int]:
    """How often the server ran each of ``commands``, read with one INFO commandstats (so
    each reading adds one INFO call to the next)."""
    stats = await redis.info("commandstats")
    return [int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in commands]


def modes(**by_prefix: Durability) -> Callable[[str], Durability]:
    """A topic's durability: by its first segment, else "os"."""
    return lambda topic: by_prefix.get(topic.partition("/")[0], "os")


async def test_fsync_waits_for_the_aof_and_os_reads_the_persistence_state(
    private_redis: tuple[Redis, Path],
) -> None:
    """An "fsync" topic's batch is followed by WAITAOF on its connection (no INFO needed);
    an "os" topic's by one INFO persistence, which confirm=False leaves to confirm()."""
    redis, _ = private_redis
    persistence = Persistence(redis)
    await persistence.check_support({"fsync"})
    pub = publisher(redis, "d", Limits(), persistence=persistence, durability=modes(sure="fsync"))
    waits, infos = await calls(redis, "waitaof", "info")

    await pub.publish("sure/x", [b"a", b"b"], user="alice")
    assert await calls(redis, "waitaof", "info") == [waits + 1, infos + 1]  # (+1: the reading)
    await pub.publish("other/x", [b"c"], user="alice")
    assert await calls(redis, "waitaof", "info") == [waits + 1, infos + 3]
    await pub.publish("other/x", [b"d"], user="alice", confirm=False)
    assert await calls(redis, "info") == [infos + 4]
    await pub.confirm("other/x")
    assert await calls(redis, "info") == [infos + 6]
    assert [d for _, d in await stored(redis, "d", "sure/x")] == [b"a", b"b"]


async def test_replica_without_a_replica_is_not_durable(
    private_redis: tuple[Redis, Path],
) -> None:
    """No replica confirms within the timeout: NotDurable (75) saying what was missing."""
    redis, _ = private_redis
    await redis.config_set("appendfsync", "always")  # fsynced at once: only the replica lacks
    persistence = Persistence(redis, timeout=0.05)
    await persistence.check_support({"replica"})
    pub = publisher(redis, "d", Limits(), persistence=persistence, durability=modes(x="replica"))

    with pytest.raises(NotDurable) as caught:
        await pub.publish("x/y", [b"unconfirmed"], user="alice")

    assert caught.value.message == (
        "not durable: the write was not confirmed by a replica within 50 ms "
        '(topics.durability = "replica")'
    )
    assert caught.value.topic == "x/y"


async def test_replica_waits_until_the_replica_confirms_the_batch(
    make_servers: MakeServers,
) -> None:
    """ "replica" sends WAITAOF 1 1 after the batch on its connection, outside MULTI (inside
    one it would not wait for the batch, only for what came before): it returns once the
    replica confirms the batch; a replica that then stops makes the next one not durable."""
    primary, replica = make_servers(binaries()[0], appendonly="yes", replica=True)
    assert replica.process is not None
    # One connection: the test's own WAITAOF below waits for the publisher's writes too.
    redis = Redis(host="127.0.0.1", port=primary.port, max_connections=1)
    try:
        await redis.config_set("appendfsync", "always")  # the local fsync is never the wait
        patient, hasty = [
            publisher(redis, "d", Limits(), persistence=Persistence(redis, timeout=seconds),
                      durability=modes(x="replica"))
            for seconds in (5, 0.2)
        ]  # fmt: skip
        await Persistence(redis).check_support({"replica"})  # (this server can: WAITAOF, AOF)

        # (~1 s: a replica confirms its AOF once a second)
        await patient.publish("x/y", [b"confirmed"], user="alice")
        with replica.client() as client:
            assert client.xlen(Keys("d").stream("x/y")) == 1
        waited = await redis.execute_command("WAITAOF", 1, 1, 5000)  # type: ignore[no-untyped-call]
        assert waited == [1, 1]  # at once: the replica confirmed all this connection wrote
        replica.process.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(NotDurable, match="not confirmed by a replica within 200 ms"):
                await hasty.publish("x/y", [b"unconfirmed"], user="alice")
        finally:
            replica.process.send_signal(signal.SIGCONT)
    finally:
        await redis.aclose()


async def test_without_persistence_a_reply_counts_as_stored(redis: Redis, namespace: str) -> None:
    """A publisher given durability modes but no persistence takes Redis's reply as stored."""
    pub = publisher(redis, namespace, Limits(), durability=modes(x="replica"))
    assert len(await pub.publish("x/y", [b"a"], user="alice")) == 1


@pytest.mark.skipif(REDIS_7_0 is None, reason="needs redis-server (7.0, without WAITAOF)")
async def test_without_waitaof_replica_waits_with_wait_then_reads_the_state(
    make_servers: MakeServers,
) -> None:
    """Redis 7.0 has no WAITAOF: "replica" waits with WAIT 1, and, WAIT saying nothing of the
    AOF, INFO persistence is read after it too."""
    assert REDIS_7_0 is not None
    primary, _replica = make_servers(Path(REDIS_7_0), appendonly="no", replica=True)
    redis = Redis(host="127.0.0.1", port=primary.port)
    try:
        persistence = Persistence(redis, timeout=5)
        await persistence.check_support({"replica"})
        pub = publisher(
            redis, "d", Limits(), persistence=persistence, durability=modes(x="replica")
        )
        waits, infos = await calls(redis, "wait", "info")

        await pub.publish("x/y", [b"replicated"], user="alice")

        assert await calls(redis, "wait", "info") == [waits + 1, infos + 2]  # (+1: the reading)
    finally:
        await redis.aclose()


async def break_rdb_saves(redis: Redis, data_dir: Path) -> None:
    """Make the server's snapshots fail (its dump.rdb is a directory it cannot replace) and
    take one, so that it reports rdb_last_bgsave_status:err."""
    (data_dir / "dump.rdb").mkdir()
    (data_dir / "dump.rdb" / "in-the-way").write_text("")
    await redis.bgsave()
    async with asyncio.timeout(5):
        while (await redis.info("persistence"))["rdb_bgsave_in_progress"]:
            await asyncio.sleep(0.01)  # the server says when its child is done only if asked


async def test_a_failing_disk_makes_publishing_not_durable(
    private_redis: tuple[Redis, Path],
) -> None:
    """A write Redis took while its persistence fails is not durable; once it refuses writes
    (MISCONF) the publisher says so, or says the backend failed if it has no persistence;
    other write errors are the backend's."""
    redis, data_dir = private_redis
    persistence = Persistence(redis)
    pub = publisher(redis, "d", Limits(), persistence=persistence)
    await break_rdb_saves(redis, data_dir)

    with pytest.raises(NotDurable) as taken:
        await pub.publish("x/y", [b"taken"], user="alice")
    await redis.config_set("save", "3600 1")  # with save points, a failed save stops writes
    with pytest.raises(NotDurable) as refused:
        await pub.publish("x/y", [b"refused"], user="alice")
    with pytest.raises(BackendUnavailable) as unwatched:
        await publisher(redis, "d", Limits()).publish("x/y", [b"refused"], user="alice")
    await redis.config_set("save", "")
    await redis.set(Keys("d").stream("x/z"), "not a stream")
    with pytest.raises(BackendUnavailable, match="WRONGTYPE"):
        await pub.publish("x/z", [b"wrong"], user="alice")

    assert taken.value.message == (
        "not durable: Redis persistence is failing: rdb_last_bgsave_status=err"
    )
    assert taken.value.topic == "x/y"
    assert refused.value.message.startswith("not durable: the server refused the write (MISCONF ")
    assert refused.value.topic == "x/y"
    assert not persistence.state.ok
    assert "MISCONF" in unwatched.value.message
    assert [d for _, d in await stored(redis, "d", "x/y")] == [b"taken"]
