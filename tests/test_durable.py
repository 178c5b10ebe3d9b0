"""``sub TOPIC --durable NAME``: the server keeps the position, so a restart loop misses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.conftest import RunningBus, User, run_ssh, serve_process, ssh_argv
from tests.test_serve import write_config
from tests.test_workers import two_workers

StartBus = Callable[..., Awaitable[RunningBus]]


async def durable_json(
    node: RunningBus, user: User, topic: str, *args: str
) -> list[dict[str, str]]:
    result = await run_ssh(node.port, user.key_file, "sub", topic, "--json", *args)
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_a_durable_sub_resumes_after_the_last_message_it_sent(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """Each session starts after the previous one's last message, across packed entries."""
    alice = add_user("alice")
    node = await start_bus()
    await run_ssh(node.port, alice.key_file, "pub", "alice/d", stdin=b"1\n2\n3\n")
    first = await durable_json(node, alice, "alice/d", "--durable", "a", "--since", "all",
                               "--count", "2")  # fmt: skip
    assert [m["data"] for m in first] == ["1", "2"]
    await run_ssh(node.port, alice.key_file, "pub", "alice/d", stdin=b"4\n")
    # --since only places a new name: an existing one resumes where it was.
    second = await durable_json(node, alice, "alice/d", "--durable", "a", "--since", "all",
                                "--count", "2")  # fmt: skip
    assert [m["data"] for m in second] == ["3", "4"]
    # Another name, and another user's same name, are positions of their own.
    other = await durable_json(node, alice, "alice/d", "--durable", "b", "--since", "all",
                               "--count", "1")  # fmt: skip
    assert [m["data"] for m in other] == ["1"]


async def test_a_new_durable_name_starts_at_the_newest_message_and_keeps_that_place(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """Without --since a new name starts after the newest message, saved at once: what is
    published after the first session left is delivered to the next."""
    alice = add_user("alice")
    node = await start_bus()
    await run_ssh(node.port, alice.key_file, "pub", "alice/n", stdin=b"old\n")
    argv = ssh_argv(node.port, alice.key_file, "sub", "alice/n", "--durable", "x", "--json")
    pipe = subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe, stderr=pipe)
    async with asyncio.timeout(15):
        while not await node.bus.redis.exists(node.bus.keys.durable("alice/n", "alice", "x")):
            await asyncio.sleep(0.02)
    proc.kill()
    await proc.wait()
    await run_ssh(node.port, alice.key_file, "pub", "alice/n", stdin=b"new\n")
    got = await durable_json(node, alice, "alice/n", "--durable", "x", "--count", "1")
    assert [m["data"] for m in got] == ["new"]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("--durable", "'a b'"), 65, "durable name 'a b' is invalid"),
        (("--durable", "a:b"), 65, "durable name 'a:b' is invalid"),
        (("--durable", "-x"), 64, "expected one argument"),
        (("--durable", "a" * 65), 65, "1 to 64 letters"),
        (("--durable", "ok", "--receipts"), 64, "not --receipts"),
    ],
    ids=["space", "colon", "dash", "long", "receipts"],
)
async def test_bad_durable_names_and_combinations_are_refused(
    start_bus: StartBus, add_user: Callable[[str], User], args: tuple[str, ...], code: int,
    says: str,
) -> None:  # fmt: skip
    """A bad name is bad data (65) with a line saying what is allowed; misuse is 64."""
    alice = add_user("alice")
    node = await start_bus()
    result = await run_ssh(node.port, alice.key_file, "sub", "cache-drain", *args)
    assert result.code == code
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


async def test_ls_shows_only_the_owners_positions_and_their_lag(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """ls lists the user's own durable positions with entries behind; others' stay hidden."""
    alice, bob = add_user("alice"), add_user("bob")
    node = await start_bus()
    for line in (b"1\n", b"2\n", b"3\n"):  # three pubs: three entries
        await run_ssh(node.port, alice.key_file, "pub", "shared/t", stdin=line)
    await durable_json(node, alice, "shared/t", "--durable", "audit", "--since", "all",
                       "--count", "1")  # fmt: skip
    await durable_json(node, bob, "shared/t", "--durable", "bobs", "--since", "all",
                       "--count", "3")  # fmt: skip
    result = await run_ssh(node.port, alice.key_file, "ls", "shared", "--json")
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    (mine,) = row["durable"]
    assert (mine["name"], mine["lag"]) == ("audit", 2)
    table = (await run_ssh(node.port, bob.key_file, "ls", "shared")).stdout.decode()
    assert "audit" not in table
    assert [line.split()[3] for line in table.splitlines() if line.startswith("bobs")] == ["0"]


async def test_a_durable_position_expires_after_the_retention_unused(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """The position's key lives topics.retention from its last save, no longer."""
    alice = add_user("alice")
    node = await start_bus(topics={"retention": "1h"})
    await run_ssh(node.port, alice.key_file, "pub", "alice/e", stdin=b"1\n")
    await durable_json(node, alice, "alice/e", "--durable", "e", "--since", "all", "--count", "1")
    ttl = await node.bus.redis.pttl(node.bus.keys.durable("alice/e", "alice", "e"))
    assert 3_500_000 < ttl <= 3_600_000


async def _durable_reader(port: Callable[[], int], key: Path, received: list[dict[str, str]],
                          sessions: list[int], stop: asyncio.Event) -> None:  # fmt: skip
    """``ssh bus sub … --durable audit --json`` in a restart loop, as an operator would run it
    (``port()``: where the bus listens now)."""
    while not stop.is_set():
        argv = ssh_argv(port(), key, "sub", "shared/audit", "--durable", "audit", "--json")
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        sessions.append(proc.pid)
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                received.append(json.loads(line))
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await asyncio.sleep(0.05)  # the loop's pause between sessions, as a shell loop has


async def _publish_until_stored(port: int, key: Path, data: bytes) -> None:
    """One ``pub``, again until it exits 0: a pub cut off by a kill may or may not be stored."""
    while (await run_ssh(port, key, "pub", "shared/audit", stdin=data)).code != 0:
        await asyncio.sleep(0.05)  # the pause before trying again, not a wait for a state


@asynccontextmanager
async def _reading(
    port: Callable[[], int], key: Path, redis_url: str, namespace: str
) -> AsyncIterator[tuple[list[dict[str, str]], list[int]]]:
    """A durable reader in a restart loop, once its position exists; stopped on exit."""
    received: list[dict[str, str]] = []
    sessions: list[int] = []
    stop = asyncio.Event()
    # Its first session creates the position at the newest message: wait for it.
    await _publish_until_stored(port(), key, b"before\n")
    reader = asyncio.create_task(_durable_reader(port, key, received, sessions, stop))
    redis = Redis.from_url(redis_url)
    async with asyncio.timeout(15):
        while not await redis.exists(f"{namespace}:{{shared/audit}}:durable:alice:audit"):
            await asyncio.sleep(0.02)
    await redis.aclose()
    try:
        yield received, sessions
    finally:
        stop.set()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _all_arrived(received: list[dict[str, str]], published: list[bytes]) -> None:
    async with asyncio.timeout(30):
        while not {m["data"].encode() for m in received} >= set(published):
            await asyncio.sleep(0.05)


def _assert_once_each_in_order(
    received: list[dict[str, str]], sessions: list[int], published: list[bytes]
) -> None:
    assert len(sessions) >= 3, "the sub survived the kills: nothing was tested"
    first_seen: dict[str, str] = {}
    for delivery in received:
        first_seen.setdefault(delivery["id"], delivery["data"])
    data = [d.encode() for d in first_seen.values()]
    # A pub cut off by a kill may have been stored and then sent again: the same data
    # twice, under two ids. Its first copy keeps its place.
    assert list(dict.fromkeys(data)) == published
    ids = list(first_seen)
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split(":")[0].split("-"))))


@pytest.mark.timeout(90)  # two rounds of killing both workers, waiting out their restarts
async def test_a_durable_sub_in_a_restart_loop_loses_nothing_when_workers_die(
    tmp_path: Path, users_dir: Path, add_user: Callable[[str], User], redis_url: str
) -> None:
    """Workers killed twice mid-stream: every published message arrives, in order; repeats
    carry the id they had, so dropping repeats by id leaves exactly what was published."""
    alice = add_user("alice")
    config = write_config(tmp_path, users_dir)
    published = [f"m{i}".encode() for i in range(60)]
    env = {"DRAINBUS_REDIS_URL": redis_url}
    async with (
        two_workers(config, env=env) as server,
        _reading(lambda: server.port, alice.key_file, redis_url, tmp_path.name) as (got, sessions),
    ):
        rounds = 0
        for i, message in enumerate(published):
            await _publish_until_stored(server.port, alice.key_file, message + b"\n")
            if i in (20, 40):
                starts = [e for e in server.log if e["event"] == "worker_started"]
                for pid in {e["worker"]: e["pid"] for e in starts}.values():
                    os.kill(pid, signal.SIGKILL)
                rounds += 1
                for index in (0, 1):
                    await server.wait_for_events("serving", 1 + rounds, timeout=30, worker=index)
        await _all_arrived(got, published)
    _assert_once_each_in_order(got, sessions, published)


@pytest.mark.timeout(90)  # two kill -9s of serve, each waiting for a new one to start
async def test_a_durable_sub_in_a_restart_loop_loses_nothing_when_serve_is_killed(
    tmp_path: Path, users_dir: Path, add_user: Callable[[str], User], redis_url: str
) -> None:
    """serve killed twice mid-stream and started again (on a new port, as a new node): the
    reader's next session resumes where the last one's bytes reached it."""
    alice = add_user("alice")
    config = write_config(tmp_path, users_dir)
    env = {"DRAINBUS_REDIS_URL": redis_url}
    published = [f"m{i}".encode() for i in range(45)]
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(serve_process("--config", str(config), env=env))]

        def port() -> int:  # the newest serve's
            return servers[-1].port

        async with _reading(port, alice.key_file, redis_url, tmp_path.name) as (got, sessions):
            for i, message in enumerate(published):
                await _publish_until_stored(port(), alice.key_file, message + b"\n")
                if i in (15, 30):
                    servers[-1].proc.kill()
                    await servers[-1].proc.wait()
                    servers.append(await stack.enter_async_context(
                        serve_process("--config", str(config), env=env)))  # fmt: skip
            await _all_arrived(got, published)
    _assert_once_each_in_order(got, sessions, published)
