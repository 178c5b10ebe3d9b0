"""Pooled Redis connections a burst opened are closed once idle (`redis_idle_timeout`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from drainbus.bus.idle_pool import prune_idle
from drainbus.node import Node
from tests.conftest import User, run_ssh
from tests.redis_topology import MakeServers, Server, binaries

StartNode = Callable[..., Awaitable[Node]]


def clients(server: Server) -> int:
    """Connections the server has open, but for the one asking (CLIENT LIST)."""
    with server.client() as client:
        return len(client.client_list()) - 1


async def test_connections_a_burst_opened_are_closed_after_the_idle_timeout(
    make_servers: MakeServers, start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """12 concurrent `pub` sessions make the pool grow; once they are gone, the server sees
    the node's connections fall back to what an idle node holds."""
    alice = add_user("alice")
    (server,) = make_servers(binaries()[0], appendonly="no")
    node = await start_bus(redis_url=f"redis://{server.address}", redis_idle_timeout="1s")
    idle = clients(server)
    # Each pub holds a pooled connection while its command runs; a blocking read on the
    # pool (what a slow command looks like) keeps them busy at once.
    held = [node.bus.redis.blpop([f"{node.bus.keys.namespace}:nothing"], timeout=0.5)
            for _ in range(12)]  # fmt: skip
    pubs = [run_ssh(node.port, alice.key_file, "pub", "alice/x", stdin=b"m\n") for _ in range(4)]
    (*_,) = await asyncio.gather(*held, *pubs)
    assert clients(server) >= idle + 12
    async with asyncio.timeout(10):  # 1 s idle, checked every 0.5 s
        while clients(server) > idle:
            await asyncio.sleep(0.1)
    assert clients(server) <= idle


async def test_only_connections_idle_for_the_timeout_are_closed(
    make_servers: MakeServers, start_bus: StartNode
) -> None:
    """Connections used a moment ago stay open; the same ones, once idle long enough, close."""
    (server,) = make_servers(binaries()[0], appendonly="no")
    node = await start_bus(redis_url=f"redis://{server.address}", redis_idle_timeout=0)
    key = f"{node.bus.keys.namespace}:nothing"
    await asyncio.gather(*(node.bus.redis.blpop([key], timeout=0.2) for _ in range(8)))
    busy = clients(server)
    assert await prune_idle(node.bus.redis, 60) == 0
    assert clients(server) == busy
    await asyncio.sleep(0.3)  # the idleness being measured, not a wait for an event
    closed = await prune_idle(node.bus.redis, 0.2)
    assert closed >= 8
    async with asyncio.timeout(5):  # the server notices each close a moment later
        while clients(server) > busy - closed:
            await asyncio.sleep(0.05)
    assert await node.bus.redis.ping()  # the pool opens a new one when it needs it
