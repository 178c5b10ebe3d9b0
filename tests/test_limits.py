"""Sharing a bus fairly: the per-user purge rate limit and the storage quotas, kept in Redis.

Driven through the real OpenSSH client (and ``drainbus pub``) against real bus nodes sharing
the tests' Redis; the memory test runs a private embedded server of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis.asyncio import Redis
from structlog.testing import capture_logs

from drainbus.bus.embedded import EmbeddedRedis, default_maxmemory
from drainbus.bus.limits import Limits, PublishRefused, RefusalLog
from drainbus.bus.publisher import Publisher
from drainbus.bus.streams import Keys, Row, read_rows
from drainbus.hooks.watch import Attempt, Watcher
from drainbus.metrics import PUBLISH_REFUSED
from tests.conftest import RunningBus, User, run_ssh
from tests.redis_topology import Cluster
from tests.test_hooks import (
    bus_args,
    clean_env,
    drainbus,
    hooks_settings,
    known_hosts_for,
    next_delivery,
    running,
)

StartBus = Callable[..., Awaitable[RunningBus]]
AddUser = Callable[[str], User]

# One purge a minute in bursts of five: nothing refills within a test.
RATE = {"drain": {"max_purges_per_user": 1, "purge_burst_per_user": 5}}


def purges(user: str, n: int) -> bytes:
    return b"".join(b"%s-site%d\n" % (user.encode(), i) for i in range(n))


async def rows_of(node: RunningBus, topic: str) -> list[Row]:
    """The entries of ``topic``'s stream, as stored."""
    return await read_rows(node.bus.redis, node.bus.keys.stream(topic))


async def stored_by(node: RunningBus, topic: str, user: str | None = None) -> int:
    """How many entries ``topic``'s stream holds (from ``user`` only, if given)."""
    rows = await rows_of(node, topic)
    return sum(1 for _, fields in rows if user is None or fields[b"u"] == user.encode())


def refused_count(reason: str) -> float:
    value = PUBLISH_REFUSED.labels(reason)._value.get()  # the client keeps no public getter
    return float(value)


# --- the purge rate limit ------------------------------------------------------------------


async def test_user_over_the_purge_rate_gets_75_and_exactly_what_fits_is_stored(
    start_bus: StartBus, add_user: AddUser
) -> None:
    """Over the burst, pub stores the first lines that fit, refuses the rest with 75, and says
    how many of each, which limit and when to retry; another user's purge still goes in."""
    acme, beta = add_user("acme"), add_user("beta")
    node = await start_bus(**RATE)
    before = refused_count("rate")

    over = await run_ssh(node.port, acme.key_file, "pub", "cache-drain", stdin=purges("acme", 8))
    other = await run_ssh(node.port, beta.key_file, "pub", "cache-drain", stdin=purges("beta", 1))

    assert over.code == 75
    [line] = over.stderr.splitlines()
    assert "5 message(s) stored, 3 refused" in line
    assert "drain.max_purges_per_user" in line
    assert "retry the refused ones in" in line
    assert await stored_by(node, "cache-drain", "acme") == 5
    assert (other.code, other.stderr) == (0, "")
    assert await stored_by(node, "cache-drain", "beta") == 1
    assert refused_count("rate") - before == 3


async def test_a_refused_session_refuses_the_rest_of_its_input_and_counts_it(
    start_bus: StartBus, add_user: AddUser
) -> None:
    """Lines after the first refused batch are refused too (stored lines are a prefix of the
    input, so a retry resends the tail), and the count covers every one of them."""
    acme = add_user("acme")
    node = await start_bus(**RATE)

    result = await run_ssh(
        node.port, acme.key_file, "pub", "cache-drain", stdin=purges("acme", 5000)
    )

    assert result.code == 75
    assert "5 message(s) stored, 4995 refused" in result.stderr
    assert "(all 4995 fit in about 4995 min at 1 a minute)" in result.stderr
    rows = await rows_of(node, "cache-drain")
    assert [fields[b"d"] for _, fields in rows] == purges("acme", 5).split()


async def test_nodes_share_one_budget_per_user(start_bus: StartBus, add_user: AddUser) -> None:
    """The bucket lives in Redis: what a user spent on one node is gone on the other."""
    acme = add_user("acme")
    first = await start_bus(**RATE)
    second = await start_bus(**RATE)

    one = await run_ssh(first.port, acme.key_file, "pub", "cache-drain", stdin=purges("acme", 3))
    two = await run_ssh(second.port, acme.key_file, "pub", "cache-drain", stdin=purges("acme", 3))

    assert (one.code, two.code) == (0, 75)
    assert "2 message(s) stored, 1 refused" in two.stderr
    assert await stored_by(first, "cache-drain", "acme") == 5


async def test_admin_is_not_rate_limited(start_bus: StartBus, add_user: AddUser) -> None:
    """server.admins publish as many purges as they send."""
    root = add_user("root")  # an admin in the tests' settings
    node = await start_bus(**RATE)

    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=purges("x", 50))

    assert (result.code, result.stderr) == (0, "")
    assert await stored_by(node, "cache-drain", "root") == 50


async def test_drainbus_pub_and_git_hook_see_the_same_refusal(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path
) -> None:
    """`drainbus pub` and `drainbus hook git` end with the bus's 75 and its stderr line."""
    acme = add_user("acme")
    node = await start_bus(**RATE)
    env = clean_env(DRAINBUS_HOOKS__KNOWN_HOSTS=str(known_hosts_for(node, tmp_path)))
    args = bus_args(node.port, acme.key_file)

    pub = await drainbus("pub", *args, "cache-drain", stdin=purges("acme", 6), env=env)
    pushed = f"{'a' * 40} {'b' * 40} refs/heads/main\n".encode()
    hook = await drainbus("hook", "git", *args, "--branch", "main=acme-blog", stdin=pushed, env=env)

    assert pub.code == 75
    assert "5 message(s) stored, 1 refused" in pub.stderr
    assert hook.code == 75
    assert "0 message(s) stored, 1 refused" in hook.stderr
    assert await stored_by(node, "cache-drain", "acme") == 5


async def test_hook_watch_resends_only_what_the_rate_limit_refused(
    start_bus: StartBus, add_user: AddUser, tmp_path: Path
) -> None:
    """A watcher's batch over the burst: the keys stored leave the spool, only the refused
    ones are sent again, so each changed site is purged once and none is lost."""
    acme = add_user("acme")
    node = await start_bus(drain={"max_purges_per_user": 600, "purge_burst_per_user": 5})
    keys = [f"acme-s{n}" for n in range(8)]
    settings = hooks_settings(node.port, acme, tmp_path)
    settings.spool_path.parent.mkdir(parents=True)
    settings.spool_path.write_text("\n".join(keys) + "\n")  # one batch of 8 at start
    (tmp_path / "sites").mkdir()
    attempts: asyncio.Queue[Attempt] = asyncio.Queue()
    watcher = Watcher(
        tmp_path / "sites", settings, on_attempt=attempts.put_nowait, retry_initial=0.3
    )

    async with running(watcher):
        first = await attempts.get()
        await next_delivery(attempts)

    assert (first.exit_code, first.stored) == (75, 5)
    rows = await rows_of(node, "cache-drain")
    assert sorted(fields[b"d"].decode() for _, fields in rows) == keys
    assert settings.spool_path.read_text() == ""


def test_refusals_are_logged_per_user_topic_and_interval() -> None:
    """Many refusals make one log line per interval with their total, not one per line."""
    refusals = RefusalLog(interval=3600)

    def refusal(user: str) -> PublishRefused:
        return PublishRefused(
            "over", reason="rate", user=user, topic="cache-drain", stored=0, refused=0, ids=[]
        )

    with capture_logs() as logs:
        for _ in range(100):
            refusals.add(refusal("acme"), 10)
        refusals.add(refusal("beta"), 1)
        refusals.close()

    counts = [(e["user"], e["refused"]) for e in logs if e["event"] == "publish_refused"]
    assert counts == [("acme", 10), ("beta", 1), ("acme", 990)]


# --- storage quotas ------------------------------------------------------------------------


async def test_raw_publisher_filling_their_quota_is_refused_and_others_still_publish(
    start_bus: StartBus, add_user: AddUser
) -> None:
    """A user's --raw flood stops at server.max_user_bytes with 75 naming the quota; what they
    stored before stays, on every topic of theirs; other users publish as before."""
    alice, bob = add_user("alice"), add_user("bob")
    node = await start_bus(server={"max_user_bytes": 256 * 1024, "max_message_bytes": 16384})
    await run_ssh(node.port, bob.key_file, "pub", "bob/notes", stdin=b"kept\n")

    flood = await run_ssh(
        node.port, alice.key_file, "pub", "alice/blob", "--raw", stdin=b"x" * (1024 * 1024)
    )
    # What is left of the quota is less than one more chunk: a second topic cannot take it.
    again = await run_ssh(
        node.port, alice.key_file, "pub", "alice/other", stdin=b"m" * 16000 + b"\n"
    )
    bob_after = await run_ssh(node.port, bob.key_file, "pub", "bob/notes", stdin=b"fine\n")

    assert flood.code == 75
    [line] = flood.stderr.splitlines()
    assert "server.max_user_bytes" in line
    assert "256 KiB" in line
    stored = await stored_by(node, "alice/blob")
    assert 0 < stored < 64  # 16 KiB chunks: the quota holds a few, far from all 64
    assert f"{stored} message(s) stored" in line
    held = sum(len(f[b"d"]) for _, f in await rows_of(node, "alice/blob"))
    assert held <= 256 * 1024
    assert again.code == 75
    assert "server.max_user_bytes" in again.stderr
    assert await stored_by(node, "alice/other") == 0
    assert (bob_after.code, bob_after.stderr) == (0, "")
    assert await stored_by(node, "bob/notes") == 2
    assert await stored_by(node, "alice/blob") == stored  # refusals trim nothing


async def test_topic_count_per_user_is_limited(start_bus: StartBus, add_user: AddUser) -> None:
    """A third topic is refused at max_topics_per_user = 2; the two stay usable."""
    alice = add_user("alice")
    node = await start_bus(server={"max_topics_per_user": 2})

    codes = [
        (await run_ssh(node.port, alice.key_file, "pub", topic, stdin=b"m\n")).code
        for topic in ("alice/a", "Alice/b")  # one owner, whatever the case
    ]
    third = await run_ssh(node.port, alice.key_file, "pub", "alice/c", stdin=b"m\n")
    first_again = await run_ssh(node.port, alice.key_file, "pub", "alice/a", stdin=b"m\n")

    assert codes == [0, 0]
    assert third.code == 75
    assert "server.max_topics_per_user" in third.stderr
    assert "0 message(s) stored" in third.stderr
    assert await stored_by(node, "alice/c") == 0
    assert first_again.code == 0
    listed = await run_ssh(node.port, alice.key_file, "ls")
    assert b"alice/a" in listed.stdout
    assert b"alice/c" not in listed.stdout  # refused whole: not a topic


async def test_admin_is_never_refused_but_what_they_store_counts(
    start_bus: StartBus, add_user: AddUser
) -> None:
    """An admin writing into alice's topic goes past her quota; the bytes are hers, so
    alice is refused after it."""
    root, alice = add_user("root"), add_user("alice")
    node = await start_bus(server={"max_user_bytes": 4096})

    by_admin = await run_ssh(node.port, root.key_file, "pub", "alice/x", stdin=b"r" * 6000)
    by_alice = await run_ssh(node.port, alice.key_file, "pub", "alice/x", stdin=b"a\n")

    assert (by_admin.code, by_admin.stderr) == (0, "")
    assert by_alice.code == 75
    assert "server.max_user_bytes" in by_alice.stderr
    assert await stored_by(node, "alice/x") == 1


async def test_topic_byte_cap_trims_the_oldest_and_gives_the_owner_room_back(
    start_bus: StartBus, add_user: AddUser
) -> None:
    """topics.max_bytes keeps the newest messages of a stream within the cap; what it trims
    no longer counts against its owner's quota, so publishing can go on."""
    alice = add_user("alice")
    node = await start_bus(topics={"max_bytes": 8 * 1024}, server={"max_user_bytes": 16 * 1024})
    line = b"y" * 1000 + b"\n"

    results = [
        await run_ssh(node.port, alice.key_file, "pub", "alice/log", stdin=line * 4)
        for _ in range(10)  # 40 KB through a 16 KiB quota
    ]

    assert [r.code for r in results] == [0] * 10
    rows = await rows_of(node, "alice/log")
    held = sum(len(f[b"d"]) for _, f in rows)
    assert 4000 <= held <= 8 * 1024
    usage = await node.bus.redis.hgetall(node.bus.keys.usage("alice"))
    assert int(usage[b"alice/log"]) <= 8 * 1024 + 64 * 4  # sizes count 64 bytes per entry


async def test_a_leaked_reservation_is_recounted_before_it_refuses(
    redis_url: str, namespace: str
) -> None:
    """A batch cut off between reserving and appending leaves its bytes counted; before that
    refuses anyone, the owner's streams are counted again, and the publish goes through."""
    client = Redis.from_url(redis_url)
    keys = Keys(namespace)
    limits = Limits(max_user_bytes=10_000)
    publisher = Publisher(client, keys, max_len=1000, retention=3600, limits=limits)
    try:
        await publisher.publish("alice/x", [b"a" * 1000], user="alice")
        await client.hincrby(keys.usage("alice"), "alice/x", 50_000)  # a batch cut off

        await publisher.publish("alice/x", [b"b" * 1000], user="alice")

        assert await client.hgetall(keys.usage("alice")) == {b"alice/x": b"%d" % (2 * 1064)}
        assert await client.xlen(keys.stream("alice/x")) == 2
    finally:
        await client.aclose()


async def test_quotas_hold_on_redis_cluster(
    start_bus: StartBus, add_user: AddUser, redis_cluster: Cluster
) -> None:
    """On Redis Cluster a user's topics and their usage are in different slots: the bytes are
    reserved first, and the quotas hold the same way."""
    alice = add_user("alice")
    node = await start_bus(
        redis_url=redis_cluster.url,
        server={"max_user_bytes": 4096, "max_topics_per_user": 2},
    )
    chunk = b"c" * 1500 + b"\n"

    fits = [
        (await run_ssh(node.port, alice.key_file, "pub", topic, stdin=chunk)).code
        for topic in ("alice/a", "alice/b")
    ]
    over_bytes = await run_ssh(node.port, alice.key_file, "pub", "alice/b", stdin=chunk)
    over_topics = await run_ssh(node.port, alice.key_file, "pub", "alice/c", stdin=b"m\n")

    assert fits == [0, 0]
    assert over_bytes.code == 75
    assert "0 message(s) stored, 1 refused" in over_bytes.stderr
    assert "server.max_user_bytes" in over_bytes.stderr
    assert over_topics.code == 75
    assert "server.max_topics_per_user" in over_topics.stderr
    assert [await stored_by(node, t) for t in ("alice/a", "alice/b", "alice/c")] == [1, 1, 0]


async def test_a_lowered_byte_cap_trims_many_entries_at_once_keeping_the_newest(
    redis_url: str, namespace: str
) -> None:
    """Lowering topics.max_bytes under what a stream holds cuts it back at the next publish:
    exactly the newest entries that fit stay, however many have to go."""
    client = Redis.from_url(redis_url)
    keys = Keys(namespace)
    uncapped = Publisher(client, keys, max_len=1000, retention=3600)
    capped = Publisher(
        client, keys, max_len=1000, retention=3600, limits=Limits(max_topic_bytes=10 * 164)
    )
    try:
        for n in range(60):
            await uncapped.publish("t/log", [b"%03d" % n + b"x" * 97], user="alice")
        await capped.publish("t/log", [b"new" + b"x" * 97], user="alice")

        kept = [fields[b"d"][:3] for _, fields in await read_rows(client, keys.stream("t/log"))]
        assert kept == [b"%03d" % n for n in range(51, 60)] + [b"new"]  # 10 of 164 bytes each
    finally:
        await client.aclose()


# --- the embedded server's memory -----------------------------------------------------------


async def test_embedded_server_runs_with_noeviction_and_a_maxmemory(short_tmp: Path) -> None:
    """maxmemory is derived from the machine (or set), and full means refused, not evicted."""
    derived = EmbeddedRedis(short_tmp / "mm-default")
    set_ = EmbeddedRedis(short_tmp / "mm-set", maxmemory=64 * 1024 * 1024)
    with derived, set_:
        for server, expected in ((derived, default_maxmemory()), (set_, 64 * 1024 * 1024)):
            client = Redis.from_url(server.url)
            try:
                assert await client.config_get("maxmemory") == {"maxmemory": str(expected)}
                policy = await client.config_get("maxmemory-policy")
                assert policy == {"maxmemory-policy": "noeviction"}
            finally:
                await client.aclose()


async def fill_until_refused(publisher: Publisher, topic: str) -> tuple[int, PublishRefused]:
    """Publish 60 kB messages until one is refused; return how many were stored, and why."""
    stored = 0
    async with asyncio.timeout(20):
        while True:
            try:
                await publisher.publish(topic, [b"z" * 60_000], user="alice")
            except PublishRefused as refused:
                return stored, refused
            stored += 1


async def test_a_full_server_is_a_clear_75_and_loses_nothing(short_tmp: Path) -> None:
    """Out of memory, publish raises PublishRefused ("memory", exit 75); what was stored
    before is all still there."""
    with EmbeddedRedis(short_tmp / "oom", maxmemory=4 * 1024 * 1024) as server:
        client = Redis.from_url(server.url)
        publisher = Publisher(
            client, Keys("oom"), max_len=100_000, retention=3600,
            limits=Limits(max_user_bytes=1 << 40, max_topic_bytes=0),
        )  # fmt: skip
        try:
            stored, refused = await fill_until_refused(publisher, "alice/fill")
            assert refused.reason == "memory"
            assert refused.exit_code == 75
            assert refused.message == "the bus's Redis is out of memory (maxmemory); retry later"
            assert stored > 0
            assert await client.xlen(Keys("oom").stream("alice/fill")) == stored
        finally:
            await client.aclose()
