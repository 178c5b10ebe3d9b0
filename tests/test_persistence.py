"""The persistence check pub runs after each batch: shared by concurrent publishers, and
never reading a state from before the batch's reply."""

from __future__ import annotations

import asyncio

from drainbus.bus.connection import command_client
from drainbus.bus.persistence import Persistence
from tests.redis_topology import MakeServers, binaries


def info_calls(client_info: dict[str, dict[str, int]]) -> int:
    return int(client_info.get("cmdstat_info", {}).get("calls", 0))


async def test_concurrent_confirms_share_reads_and_each_waits_for_a_fresh_one(
    make_servers: MakeServers,
) -> None:
    """50 publishers confirming at once cost two INFO reads, not 50: those who asked before
    the first read began share it, those who asked during it share the second."""
    (server,) = make_servers(binaries()[0], appendonly="yes")
    redis = command_client(f"redis://{server.address}")
    try:
        persistence = Persistence(redis)
        with server.client() as admin:
            before = info_calls(admin.info("commandstats"))
        await asyncio.gather(*(persistence.confirm("t") for _ in range(50)))
        with server.client() as admin:
            after = info_calls(admin.info("commandstats")) - 1  # (the read just above)
        assert 1 <= after - before <= 2
        assert persistence.state.ok
        asked = persistence.state.checked
        await persistence.confirm("t")  # alone: a read of its own, after it asked
        assert persistence.state.checked > asked
    finally:
        await redis.aclose()
