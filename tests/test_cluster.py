"""The bus on a real Redis Cluster: nodes share it, topics spread over its primaries, the
drain's groups work, and a live ``sub`` rides out the failover of its topic's primary."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from drainbus.bus.streams import Keys
from drainbus.node import Node
from tests.conftest import Subscriber, User, publish_retrying, run_ssh, wait_subscribed
from tests.fakes.cloudflare_api import FakeCloudflare
from tests.nginx_env import run_nginx_env
from tests.redis_topology import Cluster, replicated, wait_until
from tests.test_drain import drain_config, prime, wait_drained

StartNode = Callable[..., Awaitable[Node]]
Subscribe = Callable[..., Awaitable[Subscriber]]


def topics_on_every_primary(cluster: Cluster, keys: Keys) -> list[str]:
    """One topic per primary: names whose streams hash to slots of different primaries."""
    by_primary: dict[int, str] = {}
    for number in range(1000):
        topic = f"alice/spread-{number}"
        by_primary.setdefault(cluster.primary_of(keys.stream(topic)).port, topic)
        if len(by_primary) == 3:
            return list(by_primary.values())
    raise AssertionError("no three topics on three primaries")


async def test_pub_on_one_node_reaches_sub_on_another(
    start_bus: StartNode, add_user: Callable[[str], User], subscribe: Subscribe,
    redis_cluster: Cluster,
) -> None:  # fmt: skip
    """Two bus nodes on one cluster: what one node stores, the other's subscriber gets."""
    alice = add_user("alice")
    one = await start_bus(redis_url=redis_cluster.url)
    two = await start_bus(redis_url=redis_cluster.url)
    sub = await subscribe(two.port, alice.key_file, "alice/news")
    await wait_subscribed(two.bus, "alice/news")

    result = await run_ssh(one.port, alice.key_file, "pub", "alice/news", stdin=b"hello\nworld\n")

    assert (result.code, result.stderr) == (0, "")
    assert await sub.lines(2) == [b"hello", b"world"]


async def test_topics_on_different_primaries_work_at_once(
    start_bus: StartNode, add_user: Callable[[str], User], subscribe: Subscribe,
    redis_cluster: Cluster,
) -> None:  # fmt: skip
    """Topics stored on three different primaries are published and followed together."""
    alice = add_user("alice")
    node = await start_bus(redis_url=redis_cluster.url)
    topics = topics_on_every_primary(redis_cluster, node.bus.keys)
    subs = [await subscribe(node.port, alice.key_file, topic) for topic in topics]
    for topic in topics:
        await wait_subscribed(node.bus, topic)

    results = await asyncio.gather(
        *(run_ssh(node.port, alice.key_file, "pub", t, stdin=t.encode()) for t in topics)
    )

    assert [r.code for r in results] == [0, 0, 0]
    assert [await sub.line() for sub in subs] == [t.encode() for t in topics]
    listing = await run_ssh(node.port, alice.key_file, "ls", "alice/", "--json")
    assert all(f'"topic": "{t}"' in listing.stdout.decode() for t in topics)


async def test_since_all_replays_history_then_follows(
    start_bus: StartNode, add_user: Callable[[str], User], subscribe: Subscribe,
    redis_cluster: Cluster,
) -> None:  # fmt: skip
    """``sub --since all`` gets the stored history, then what is published after, in order."""
    alice = add_user("alice")
    node = await start_bus(redis_url=redis_cluster.url)
    history = b"".join(b"%d\n" % n for n in range(500))
    assert (await run_ssh(node.port, alice.key_file, "pub", "alice/log", stdin=history)).code == 0

    sub = await subscribe(node.port, alice.key_file, "alice/log", "--since", "all")
    assert await sub.lines(500) == [b"%d" % n for n in range(500)]
    assert (await run_ssh(node.port, alice.key_file, "pub", "alice/log", stdin=b"new\n")).code == 0
    assert await sub.line() == b"new"


async def test_a_burst_of_purges_is_stored_one_entry_each_in_order(
    start_bus: StartNode, add_user: Callable[[str], User], redis_cluster: Cluster,
) -> None:  # fmt: skip
    """Lines on cache-drain are never packed: on a cluster too, each is an entry, in order."""
    root = add_user("root")
    node = await start_bus(redis_url=redis_cluster.url)
    purges = [b"site-%d" % n for n in range(300)]

    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"\n".join(purges))

    assert (result.code, result.stderr) == (0, "")
    stream = node.bus.keys.stream("cache-drain")
    entries: Any = await node.bus.redis.xrange(stream)
    assert [fields[b"d"] for _, fields in entries] == purges
    assert all(b"n" not in fields for _, fields in entries)


async def test_every_drain_node_evicts_its_cache_and_cloudflare_is_called_once(
    start_bus: StartNode, add_user: Callable[[str], User], redis_cluster: Cluster,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Each node's own group evicts its nginx; the shared cdn group calls Cloudflare once."""
    root = add_user("root")
    async with FakeCloudflare(plan="enterprise") as cloudflare:
        with run_nginx_env(tmp_path / "n1") as env1, run_nginx_env(tmp_path / "n2") as env2:
            nodes = [
                await start_bus(
                    redis_url=redis_cluster.url,
                    drain=drain_config(env, cloudflare=cloudflare, node=name),
                )
                for env, name in ((env1, "web1"), (env2, "web2"))
            ]
            for env in (env1, env2):
                prime(env)

            result = await run_ssh(
                nodes[0].port, root.key_file, "pub", "cache-drain", stdin=b"acme-blog\n"
            )

            assert result.code == 0
            await wait_drained(nodes[1])
            for env in (env1, env2):
                assert env.get("/", "acme-blog.pages.example").cache == "MISS"
                assert env.get("/", "acme-blog2.pages.example").cache == "HIT"
            # Once for the whole bus: the key's tag and its host (key_host), one call each.
            assert sorted((call.kind, call.items) for call in cloudflare.accepted) == [
                ("hosts", ["acme-blog.pages.example"]),
                ("tags", ["acme-blog"]),
            ]


async def test_sub_resumes_after_its_topic_primary_is_killed(
    start_bus: StartNode, add_user: Callable[[str], User], subscribe: Subscribe,
    redis_cluster: Cluster,
) -> None:  # fmt: skip
    """SIGKILL the primary serving a live sub's topic: its replica takes over, pub works again
    (after some exits 69 meanwhile), and the sub gets every later message exactly once."""
    alice = add_user("alice")
    node = await start_bus(redis_url=redis_cluster.url)
    topic = "alice/failover"
    sub = await subscribe(node.port, alice.key_file, topic)
    await wait_subscribed(node.bus, topic)
    assert (await run_ssh(node.port, alice.key_file, "pub", topic, stdin=b"before\n")).code == 0
    assert await sub.line() == b"before"

    primary = redis_cluster.primary_of(node.bus.keys.stream(topic))
    replica = redis_cluster.replica_of(primary)
    # Replication is asynchronous: a write the primary acknowledged (and a sub may already
    # have shown) but had not yet sent to its replica is gone once the replica takes over.
    # Waiting until the replica holds everything keeps this test about resuming.
    await asyncio.to_thread(wait_until, lambda: replicated(primary, replica), "replication")
    primary.kill()
    try:
        after = [b"after-%d" % n for n in range(5)]
        for message in after:
            result = await publish_retrying(node.port, alice.key_file, topic, message)
            assert (result.code, result.stderr) == (0, "")
        assert redis_cluster.primary_of(node.bus.keys.stream(topic)) is replica

        assert await sub.lines(len(after)) == after
        assert (await run_ssh(node.port, alice.key_file, "pub", topic, stdin=b"end\n")).code == 0
        assert await sub.line() == b"end", "a message was delivered twice"
    finally:
        await asyncio.to_thread(redis_cluster.restart, primary)
