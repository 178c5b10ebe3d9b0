"""The drain shares its work fairly: one publisher's burst cannot hold back another's purge.

The purges are published over real SSH into a stream whose consumer groups already exist,
before any drain runs, so the whole burst is queued when the drain starts: the order in which
it then carries the purges out (its receipts, nginx's cache, the calls the local Cloudflare
API receives) shows whether it took them strictly in stream order or in turns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from drainbus.bus.streams import Keys
from drainbus.config import DrainSettings
from drainbus.drain.daemon import Drain
from drainbus.drain.receipts import receipts_of, receipts_topic
from drainbus.node import Node
from tests.conftest import User, run_ssh
from tests.fakes.cloudflare_api import FakeCloudflare
from tests.nginx_env import NginxEnv
from tests.test_drain import drain_config, wait_drained
from tests.test_drain_recovery import _GatedTarget

StartNode = Callable[..., Awaitable[Node]]
BATCH = 1000  # a local batch: the purges the drain hands nginx at once


async def queue_purges(
    start_bus: StartNode, groups: list[str], *published: tuple[User, list[str]]
) -> Node:
    """Publish each user's lines, in turn, on a node without a drain, into a stream whose
    ``groups`` already exist (as if the drain were down): the purges wait, in this order."""
    bus = await start_bus(drain={"key_host": "{key}.pages.example"})  # scope, no targets
    stream = bus.bus.keys.stream("cache-drain")
    for group in groups:
        await bus.bus.redis.xgroup_create(stream, group, id="$", mkstream=True)
    for user, lines in published:
        result = await run_ssh(
            bus.port, user.key_file, "pub", "cache-drain", stdin="\n".join(lines).encode()
        )
        assert (result.code, result.stderr) == (0, "")
    return bus


async def test_a_burst_does_not_hold_back_another_users_purge_on_nginx(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv
) -> None:
    """With acme's 5,000 purges queued first, other's one purge is carried out in the first
    batch: fewer than a batch of acme's purges have receipts before it, not all 5,000."""
    acme, other = add_user("acme"), add_user("other")
    nginx_env.prime("/x", "other.pages.example")
    burst = [f"url:http://acme-blog.pages.example/p{n}" for n in range(5000)]
    await queue_purges(
        start_bus,
        ["node-web1"],
        (acme, burst),
        (other, ["url:http://other.pages.example/x"]),
    )
    node = await start_bus(drain=drain_config(nginx_env))
    await wait_drained(node, timeout=25)
    receipts: Any = await node.bus.redis.xrange(node.bus.keys.stream(receipts_topic("cache-drain")))
    users = [
        r["user"] for i, fields in receipts if fields is not None for r in receipts_of(i, fields)
    ]
    assert sorted(users) == ["acme"] * 5000 + ["other"]
    assert users.index("other") < BATCH
    assert nginx_env.get("/x", "other.pages.example").cache == "MISS"


async def test_each_cloudflare_call_carries_a_share_of_every_waiting_publisher(
    start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """acme's 3,000 URL purges, then carol's 200, then other's one, all queued: the first call
    to Cloudflare carries other's URL and items of both acme and carol, where in stream order
    it would carry acme's alone and other's URL would go last."""
    acme, carol, other = add_user("acme"), add_user("carol"), add_user("other")
    await queue_purges(
        start_bus,
        ["cdn"],
        (acme, [f"url:http://acme-blog.pages.example/p{n}" for n in range(3000)]),
        (carol, [f"url:http://carol.pages.example/p{n}" for n in range(200)]),
        (other, ["url:http://other.pages.example/x"]),
    )
    async with FakeCloudflare(plan="enterprise") as cloudflare:
        node = await start_bus(drain=drain_config(cloudflare=cloudflare))
        await wait_drained(node, timeout=25)
    first = cloudflare.accepted[0]
    hosts = {url.split("/")[2] for url in first.items}
    assert "http://other.pages.example/x" in first.items
    assert {"acme-blog.pages.example", "carol.pages.example"} <= hosts
    sent = [url for call in cloudflare.accepted for url in call.items]
    assert len(sent) == len(set(sent)) == 3201
    assert all(call.kind == "files" for call in cloudflare.accepted)


async def test_entries_waiting_in_the_backlog_are_not_reclaimed_as_abandoned(
    start_bus: StartNode, namespace: str, redis_url: str
) -> None:
    """While a batch is held for several retry_after periods, the 1,500 entries read ahead
    behind it stay claimed: none is delivered again, each is carried out exactly once."""
    bus = await start_bus()
    redis, keys = bus.bus.redis, Keys(namespace)
    stream = keys.stream("cache-drain")
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    for n in range(2500):
        await redis.xadd(stream, {"d": f"site-{n}", "u": f"user{n % 2}", "m": "x"})
    target = _GatedTarget()  # holds its first batch until the gate opens
    drain = Drain(
        DrainSettings(node="web1", retry_after=0.3), redis=redis, redis_url=redis_url,
        keys=keys, admins=frozenset({"user0", "user1"}), local_targets=[target],
    )  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await target.entered.wait()
        # Time itself is what is tested: four retry_after periods pass with the batch held.
        await anyio.sleep(1.2)
        target.gate.set()
        await wait_drained(bus, timeout=20)
        tg.cancel_scope.cancel()
    assert sorted(target.purged) == sorted(f"site-{n}" for n in range(2500))
    assert drain.stats.retries == 0
