"""`topics.durability`: `pub` waits for the AOF fsync ("fsync") or a replica ("replica"),
and a server that cannot do what is configured stops the node at start with 78."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from drainbus.bus import open_bus
from drainbus.config import Settings
from drainbus.errors import ConfigError, ExitCode
from drainbus.node import Node
from tests.conftest import User, run_ssh
from tests.redis_topology import MakeServers, Server, binaries

StartNode = Callable[..., Awaitable[Node]]
REDIS_7_0 = shutil.which("redis-server")  # Debian 12's 7.0: WAIT, but no WAITAOF


def calls(server: Server, command: str) -> int:
    """How often ``server`` ran ``command`` (INFO commandstats)."""
    with server.client() as client:
        return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def url(server: Server) -> str:
    return f"redis://{server.address}"


async def test_fsync_mode_waits_for_the_aof_on_its_topics_only(
    make_servers: MakeServers, start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """A topic matching an "fsync" pattern is published with WAITAOF 1 0 (one line or several,
    one entry each on the drain topic); another topic is not."""
    alice = add_user("alice")
    (primary,) = make_servers(binaries()[0], appendonly="yes")
    node = await start_bus(
        redis_url=url(primary),
        topics={"durability": {"shared/sure/**": "fsync", "cache-drain": "fsync"}},
    )
    before = calls(primary, "waitaof")
    sure = await run_ssh(node.port, alice.key_file, "pub", "shared/sure/x", stdin=b"a\n")
    assert (sure.code, sure.stderr) == (0, "")
    assert calls(primary, "waitaof") == before + 1
    purges = await run_ssh(node.port, alice.key_file, "pub", "cache-drain",
                           stdin=b"alice-a\nalice-b\nalice-c\n")  # fmt: skip
    assert (purges.code, purges.stderr) == (0, "")
    assert calls(primary, "waitaof") == before + 2
    other = await run_ssh(node.port, alice.key_file, "pub", "shared/other", stdin=b"b\n")
    assert other.code == 0
    assert calls(primary, "waitaof") == before + 2
    stream = node.bus.keys.stream("cache-drain")
    assert await node.bus.redis.xlen(stream) == 3


async def test_replica_mode_returns_once_the_replica_has_the_message(
    make_servers: MakeServers, start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """With "replica", the message is on the replica by the time `pub` exits 0."""
    alice = add_user("alice")
    primary, replica = make_servers(binaries()[0], appendonly="yes", replica=True)
    node = await start_bus(redis_url=url(primary), topics={"durability": "replica"})
    before = calls(primary, "waitaof")  # (the bus asked once at start whether it has it)
    result = await run_ssh(node.port, alice.key_file, "pub", "alice/x", stdin=b"kept\n")
    assert (result.code, result.stderr) == (0, "")
    with replica.client() as client:
        assert client.xlen(node.bus.keys.stream("alice/x")) == 1
    assert calls(primary, "waitaof") == before + 1


async def test_replica_mode_without_a_replica_exits_75_after_the_timeout(
    make_servers: MakeServers, start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """No replica confirms: `pub` exits 75 and says what was not confirmed, and that none of
    its messages counts as stored."""
    alice = add_user("alice")
    (primary,) = make_servers(binaries()[0], appendonly="yes")
    node = await start_bus(
        redis_url=url(primary),
        topics={"durability": {"alice/**": "replica"}, "durability_timeout": "200ms"},
    )
    result = await run_ssh(node.port, alice.key_file, "pub", "alice/x", stdin=b"lost?\n")
    assert result.code == ExitCode.TEMPFAIL
    assert "not confirmed by a replica within 200 ms" in result.stderr
    assert "0 message(s) of this session were stored" in result.stderr


@pytest.mark.skipif(REDIS_7_0 is None, reason="needs redis-server (7.0, without WAITAOF)")
async def test_replica_mode_on_a_server_without_waitaof_waits_with_wait(
    make_servers: MakeServers, start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """Redis 7.0 has no WAITAOF: "replica" waits with WAIT 1, and the replica has it."""
    alice = add_user("alice")
    assert REDIS_7_0 is not None
    primary, replica = make_servers(Path(REDIS_7_0), appendonly="no", replica=True)
    node = await start_bus(redis_url=url(primary), topics={"durability": "replica"})
    result = await run_ssh(node.port, alice.key_file, "pub", "alice/x", stdin=b"kept\n")
    assert (result.code, result.stderr) == (0, "")
    assert calls(primary, "wait") == 1
    with replica.client() as client:
        assert client.xlen(node.bus.keys.stream("alice/x")) == 1


@pytest.mark.parametrize(
    ("server", "appendonly", "expected"),
    [
        pytest.param("redis-7.0", "yes", "needs WAITAOF", id="no-waitaof"),
        pytest.param("valkey", "no", "runs with appendonly no", id="aof-off"),
    ],
)
async def test_fsync_on_a_server_that_cannot_fsync_stops_the_start_with_78(
    make_servers: MakeServers, settings_for: Callable[..., Settings], server: str,
    appendonly: str, expected: str,
) -> None:  # fmt: skip
    """The bus does not start, and says why in one line, exit code 78."""
    if server == "redis-7.0" and REDIS_7_0 is None:
        pytest.skip("needs redis-server (7.0, without WAITAOF)")
    binary = Path(REDIS_7_0) if server == "redis-7.0" and REDIS_7_0 else binaries()[0]
    (primary,) = make_servers(binary, appendonly=appendonly)
    settings = settings_for(redis_url=url(primary), topics={"durability": {"cache-drain": "fsync"}})
    with pytest.raises(ConfigError) as raised:
        async with open_bus(settings):
            pass
    assert expected in raised.value.message
    assert "\n" not in raised.value.message
    assert raised.value.exit_code == ExitCode.CONFIG


async def test_a_redis_user_without_info_stops_the_start_with_78(
    make_servers: MakeServers, settings_for: Callable[..., Settings]
) -> None:
    """pub cannot tell what is durable without INFO: say so at start, not with 75 per pub."""
    (primary,) = make_servers(binaries()[0], appendonly="yes")
    with primary.client() as admin:
        admin.acl_setuser("bus", enabled=True, passwords=["+secret"], keys=["*"],
                          channels=["*"], commands=["+@all", "-info"])  # fmt: skip
    settings = settings_for(redis_url=f"redis://bus:secret@{primary.address}")
    with pytest.raises(ConfigError) as raised:
        async with open_bus(settings):
            pass
    assert "ACL: +info" in raised.value.message
    assert "secret" not in raised.value.message
