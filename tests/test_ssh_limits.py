"""Sharing a bus: no user can lock out or impersonate another, driven by real clients."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import RunningBus, Subscriber, User, run_ssh, ssh_argv, wait_subscribed

StartBus = Callable[..., Awaitable[RunningBus]]
Subscribe = Callable[..., Awaitable[Subscriber]]
Held = Callable[..., Awaitable[asyncio.subprocess.Process]]


async def until(check: Callable[[], bool], timeout: float = 15) -> None:
    """Wait until ``check()`` holds: the server's own state, polled (it has no event to await)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


@pytest.fixture
async def hold() -> AsyncIterator[Held]:
    """Start ``ssh -N`` (logged in, no session) processes; kill whatever is left after."""
    started: list[asyncio.subprocess.Process] = []

    async def start(port: int, key: Path, *options: str) -> asyncio.subprocess.Process:
        argv = ssh_argv(port, key)
        host = argv.pop()
        proc = await asyncio.create_subprocess_exec(
            *argv, "-N", *options, host,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def logged_in(node: RunningBus, user: str) -> int:
    """How many logged-in connections ``user`` holds on ``node``."""
    return len(node.door._connections_by_user.get(user, ()))


async def test_connections_per_user_are_limited(
    start_bus: StartBus, add_user: Callable[[str], User], hold: Held
) -> None:
    """One user holding max_connections_per_user idle connections locks out only themself."""
    alice = add_user("alice")
    bob = add_user("bob")
    node = await start_bus(server={"max_connections_per_user": 3, "max_connections": 5})
    for _ in range(3):
        await hold(node.port, alice.key_file)
    await until(lambda: logged_in(node, "alice") == 3)
    refused = await run_ssh(node.port, alice.key_file, "whoami")
    assert refused.code == 255
    assert "too many connections for user 'alice' (limit 3)" in refused.stderr
    allowed = await run_ssh(node.port, bob.key_file, "whoami")
    assert allowed.code == 0, allowed.stderr
    assert "user: bob" in allowed.stdout.decode()


async def test_idle_connection_is_closed(
    start_bus: StartBus, add_user: Callable[[str], User], hold: Held, subscribe: Subscribe
) -> None:
    """A connection with no session is closed after idle_timeout; one with a session stays."""
    alice = add_user("alice")
    node = await start_bus(server={"idle_timeout": 1})
    sub = await subscribe(node.port, alice.key_file, "alice/x")
    await wait_subscribed(node.bus, "alice/x")
    idle = await hold(node.port, alice.key_file)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(idle.wait(), 15)
    assert asyncio.get_running_loop().time() - started >= 0.9
    assert idle.returncode == 255
    # The subscriber connected before the idle one and outlived it: sessions keep it open.
    result = await run_ssh(node.port, alice.key_file, "pub", "alice/x", stdin=b"still here\n")
    assert result.code == 0, result.stderr
    assert await sub.line() == b"still here"
