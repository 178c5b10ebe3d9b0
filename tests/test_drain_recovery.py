"""The drain's recovery paths: dead consumers, delivery limits, missed purges, dlq CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from drainbus.bus.streams import Keys
from drainbus.config import DrainSettings
from drainbus.drain.daemon import Drain
from drainbus.drain.dead_letters import list_dead_letters
from drainbus.drain.purges import Purge
from drainbus.drain.retry import DONE, Outcome
from drainbus.drain.target_stats import HttpPurgeStats
from drainbus.node import Node
from tests.conftest import User
from tests.nginx_env import NginxEnv
from tests.test_drain import cache_states, drain_config, prime, wait_drained

StartNode = Callable[..., Awaitable[Node]]
TOPIC = "cache-drain"


async def add_entry(redis: Redis, keys: Keys, data: str, user: str = "root") -> bytes:
    entry_id: Any = await redis.xadd(keys.stream(TOPIC), {"d": data, "u": user, "m": data})
    return bytes(entry_id)


async def test_entry_stuck_on_a_dead_consumer_is_reclaimed_and_carried_out(
    start_bus: StartNode, nginx_env: NginxEnv, redis: Redis, namespace: str
) -> None:
    """An entry another consumer read and never acked is claimed after retry_after."""
    keys = Keys(namespace)
    await redis.xgroup_create(keys.stream(TOPIC), "node-web1", id="$", mkstream=True)
    await add_entry(redis, keys, "acme-blog")
    read: Any = await redis.xreadgroup("node-web1", "crashed", {keys.stream(TOPIC): ">"}, count=10)
    assert len(read[0][1]) == 1  # delivered to "crashed", which then died
    prime(nginx_env)
    node = await start_bus(drain=drain_config(nginx_env))
    await wait_drained(node)
    assert cache_states(nginx_env)[("acme-blog.pages.example", "/")] == "MISS"
    assert node.drain is not None
    assert node.drain.stats.retries >= 1


async def test_entry_over_the_delivery_limit_is_dead_lettered(
    start_bus: StartNode, nginx_env: NginxEnv, redis: Redis, namespace: str
) -> None:
    """After max_deliveries deliveries an entry moves to the dead-letter stream, acked."""
    keys = Keys(namespace)
    stream = keys.stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    entry_id = await add_entry(redis, keys, "acme-blog")
    await redis.xreadgroup("node-web1", "crashed", {stream: ">"}, count=10)
    for _ in range(2):  # each claim is one more delivery: 3 in all, over the limit of 2
        await redis.xclaim(stream, "node-web1", "crashed", 0, [entry_id])
    node = await start_bus(drain=drain_config(nginx_env, max_deliveries=2))
    await wait_drained(node)
    letters = await list_dead_letters(redis, keys, TOPIC)
    assert [(d.origin_id, d.group, d.data) for d in letters] == [
        (entry_id.decode(), "node-web1", "acme-blog")
    ]
    assert "gave up after 3 deliveries" in letters[0].error


async def test_node_down_longer_than_retention_flushes_its_cache(
    start_bus: StartNode, nginx_env: NginxEnv, redis: Redis, namespace: str
) -> None:
    """If purges this node never read were trimmed away, it empties its local cache."""
    keys = Keys(namespace)
    stream = keys.stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    for n in range(10):
        await add_entry(redis, keys, f"gone-{n}")
    await redis.xtrim(stream, maxlen=2, approximate=False)  # 8 unread purges are lost
    prime(nginx_env)
    node = await start_bus(drain=drain_config(nginx_env))
    await wait_drained(node)
    assert node.drain is not None
    assert node.drain.stats.flushes == 1
    assert set(cache_states(nginx_env).values()) == {"MISS"}


async def test_node_that_kept_up_does_not_flush(
    start_bus: StartNode, nginx_env: NginxEnv, redis: Redis, namespace: str
) -> None:
    """Trimming only entries the group already read is no reason to flush."""
    keys = Keys(namespace)
    stream = keys.stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    for n in range(10):
        await add_entry(redis, keys, f"seen-{n}")
    rows: Any = await redis.xreadgroup("node-web1", "web1", {stream: ">"}, count=100)
    await redis.xack(stream, "node-web1", *[i for i, _ in rows[0][1]])
    await redis.xtrim(stream, maxlen=2, approximate=False)
    prime(nginx_env)
    node = await start_bus(drain=drain_config(nginx_env))
    await wait_drained(node)
    assert node.drain is not None
    assert node.drain.stats.flushes == 0
    assert set(cache_states(nginx_env).values()) == {"HIT"}


def drainbus_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drainbus", *args], capture_output=True, text=True, timeout=30,
        env={**os.environ, **env}, check=False,
    )  # fmt: skip


async def test_dlq_cli_lists_and_replays(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv,
    redis: Redis, redis_url: str, namespace: str,
) -> None:  # fmt: skip
    """`drainbus dlq ls --json` shows dead letters; `dlq replay ID` publishes them again."""
    keys = Keys(namespace)
    await redis.xgroup_create(keys.stream(TOPIC), "node-web1", id="$", mkstream=True)
    await add_entry(redis, keys, "tag:bad tag")  # malformed: the daemon dead-letters it
    node = await start_bus(drain=drain_config(nginx_env))
    await wait_drained(node)
    env = {"DRAINBUS_REDIS_URL": redis_url, "DRAINBUS_NAMESPACE": namespace}
    listed = await asyncio.to_thread(drainbus_cli, "dlq", "ls", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    letter = json.loads(listed.stdout)
    assert letter["data"] == "tag:bad tag"
    assert "invalid purge" in letter["error"]
    missing = await asyncio.to_thread(drainbus_cli, "dlq", "replay", "9-9", env=env)
    assert missing.returncode == 64
    replayed = await asyncio.to_thread(drainbus_cli, "dlq", "replay", letter["id"], env=env)
    assert (replayed.returncode, replayed.stdout.strip()) == (0, "replayed 1 dead letter(s)")
    await wait_drained(node)
    again = await list_dead_letters(redis, keys, TOPIC)
    assert [d.data for d in again] == ["tag:bad tag"]  # still invalid: dead-lettered again
    assert again[0].id != letter["id"]


class _GatedTarget:
    """A local target that holds its first batch until the test opens the gate."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.purged: list[str] = []
        self.flushes = 0

    async def apply(self, purges: Sequence[Purge]) -> list[Outcome]:
        self.entered.set()
        await self.gate.wait()
        self.purged += [sorted(p.keys)[0] for p in purges]
        return [DONE] * len(purges)

    async def flush_all(self) -> int:
        self.flushes += 1
        return 0

    def snapshot(self) -> dict[str, Any]:
        return {}

    def stats(self) -> HttpPurgeStats:
        return HttpPurgeStats(requests={}, retries=0, skipped=0, last_error=None)


def local_drain(redis: Redis, redis_url: str, keys: Keys, target: _GatedTarget) -> Drain:
    """A drain of node web1 whose only target is ``target``."""
    return Drain(
        DrainSettings(node="web1", retry_after=5.0), redis=redis, redis_url=redis_url,
        keys=keys, admins=frozenset({"root"}), local_targets=[target],
    )  # fmt: skip


async def purged(target: _GatedTarget, key: str, timeout: float = 10) -> None:
    """Wait until ``target`` has carried out the purge of ``key``."""
    async with asyncio.timeout(timeout):
        while key not in target.purged:
            await asyncio.sleep(0.01)  # the target records; polling it is the wait


async def test_running_drain_that_falls_behind_the_trimming_flushes(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """Purges trimmed while the daemon was busy are not skipped silently: it flushes."""
    keys = Keys(namespace)
    target = _GatedTarget()
    drain = local_drain(redis, redis_url, keys, target)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        await add_entry(redis, keys, "site-0")
        await target.entered.wait()  # the daemon is busy with site-0
        for n in range(1, 50):
            await add_entry(redis, keys, f"site-{n}")
        await redis.xtrim(keys.stream(TOPIC), maxlen=5, approximate=False)
        target.gate.set()
        await purged(target, "site-49")
        tg.cancel_scope.cancel()
    assert target.flushes == 1
    assert target.purged == ["site-0", *(f"site-{n}" for n in range(45, 50))]


class _RecordingTarget(_GatedTarget):
    """A local target that carries purges out at once and signals each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.gate.set()
        self.flushed = asyncio.Event()

    async def flush_all(self) -> int:
        self.flushed.set()
        return await super().flush_all()


@pytest.mark.parametrize("loss", ["group destroyed", "stream deleted"])
async def test_drain_whose_group_vanished_recreates_it_and_flushes(
    redis: Redis, redis_url: str, namespace: str, loss: str
) -> None:
    """A failover that lost the group (or the stream): flush the local caches, read on."""
    keys = Keys(namespace)
    stream = keys.stream(TOPIC)
    target = _RecordingTarget()
    drain = local_drain(redis, redis_url, keys, target)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        if loss == "group destroyed":
            await redis.xgroup_destroy(stream, "node-web1")
        else:
            await redis.delete(stream)
        await add_entry(redis, keys, "site-lost")  # may land before the group is back
        async with asyncio.timeout(10):
            await target.flushed.wait()
        await add_entry(redis, keys, "site-after")
        await purged(target, "site-after")
        tg.cancel_scope.cancel()
    assert target.flushes == 1
    groups = await redis.xinfo_groups(stream)
    assert [g["name"] for g in groups] == [b"node-web1"]


async def test_pending_entries_trimmed_while_the_node_was_down_are_missed_purges(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """Entries delivered to this node before it stopped, then trimmed before it came back:
    it flushes its caches (they are missed purges) and dead-letters nothing (they are not
    invalid ones); the entry left is carried out."""
    keys = Keys(namespace)
    stream = keys.stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    for n in range(3):
        await add_entry(redis, keys, f"site-{n}")
    await redis.xreadgroup("node-web1", "web1", {stream: ">"}, count=10)  # then it stopped
    await redis.xtrim(stream, maxlen=1, approximate=False)
    target = _RecordingTarget()
    drain = local_drain(redis, redis_url, keys, target)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await purged(target, "site-2")
        tg.cancel_scope.cancel()
    assert target.purged == ["site-2"]
    # Once: acted on, they are acknowledged, so the first reclaim does not report them again.
    assert target.flushes == 1
    assert await list_dead_letters(redis, keys, TOPIC) == []


@pytest.mark.own_process
async def test_drain_start_up_refused_by_redis_is_one_line_and_a_code(
    redis: Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """`drainbus drain` whose stream key holds a string: one line and exit 71, no traceback."""
    keys = Keys(namespace)
    await redis.set(keys.stream(TOPIC), "not a stream")
    config = tmp_path / "drain.toml"
    config.write_text(
        '[drain]\nnode = "web1"\n[[drain.http_purge]]\nurl = "http://127.0.0.1:9/{path}"\n'
    )
    env = {"DRAINBUS_REDIS_URL": redis_url, "DRAINBUS_NAMESPACE": namespace}
    ran = await asyncio.to_thread(
        drainbus_cli, "--log-level", "error", "drain", "--config", str(config), env=env
    )
    assert ran.returncode == 71, ran.stderr
    assert "Traceback" not in ran.stderr
    line = ran.stderr.strip()
    assert line.startswith(f"drainbus: cannot drain '{TOPIC}': Redis refused"), line
    assert "must be a stream" in line
    assert "\n" not in line
