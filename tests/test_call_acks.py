"""The cdn group acknowledges call by call: a crash re-sends at most the calls in flight,
and a failing batch logs one line per call, not one per purge."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import structlog
from redis.asyncio import Redis

from drainbus.bus.streams import Keys
from drainbus.node import Node
from tests.conftest import User, run_ssh
from tests.fakes.cloudflare_api import FakeCloudflare
from tests.test_drain import drain_config

StartNode = Callable[..., Awaitable[Node]]
TOPIC = "cache-drain"
PER_CALL = 100  # tags per Cloudflare call


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def start_drain(config: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drainbus", "--log-level", "error", "drain", "--config",
        str(config), env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def cdn_pending(redis: Redis, keys: Keys) -> int | None:
    """Entries the cdn group read and has not acknowledged (None before it exists)."""
    for group in await redis.xinfo_groups(keys.stream(TOPIC)):
        if group["name"] == b"cdn":
            return int(group["pending"])
    return None


async def test_a_drain_killed_between_calls_resends_at_most_one_call(
    redis: Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """kill -9 after three of ten calls succeeded: Cloudflare gets at most one call's items
    twice (the call in flight), where acknowledging per batch re-sent all of them."""
    keys = Keys(namespace)
    tags = [f"t{i:04d}" for i in range(10 * PER_CALL)]
    async with FakeCloudflare(plan="enterprise", answer_delay=0.3) as fake:
        # All waiting before the drain starts, for a group that reads from the start: the
        # drain reads them as one batch of ten calls.
        await redis.xgroup_create(keys.stream(TOPIC), "cdn", id="0", mkstream=True)
        for tag in tags:
            await redis.xadd(keys.stream(TOPIC), {"d": tag, "u": "root", "m": tag})
        config = tmp_path / "drain.toml"
        config.write_text(
            '[server]\nadmins = ["root"]\n[drain]\nnode = "web1"\n[drain.cloudflare]\n'
            f'zone_id = "zone-a"\napi_token = "test-token"\napi_base = "{fake.api_base}"\n'
            'plan = "enterprise"\n'
        )
        env = {"DRAINBUS_REDIS_URL": redis_url, "DRAINBUS_NAMESPACE": namespace}
        drain = await start_drain(config, env)
        try:
            async with asyncio.timeout(20):
                # Until three calls' entries are acknowledged: the fourth call is in flight.
                while not 0 < (await cdn_pending(redis, keys) or 0) <= len(tags) - 3 * PER_CALL:
                    await asyncio.sleep(0.01)
            drain.send_signal(signal.SIGKILL)
            await drain.wait()
            drain = await start_drain(config, env)
            async with asyncio.timeout(20):
                while {item for r in fake.accepted for item in r.items} != set(tags):
                    await asyncio.sleep(0.02)
        finally:
            if drain.returncode is None:
                drain.terminate()
            await drain.wait()
    twice = [item for item, n in Counter(i for r in fake.received for i in r.items).items()
             if n > 1]  # fmt: skip
    assert len(twice) <= PER_CALL, f"{len(twice)} items sent twice"


async def test_a_failing_batch_logs_once_per_call_with_its_purge_count(
    start_bus: StartNode,
    add_user: Callable[[str], User],
    fresh_logging: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """600 purges Cloudflare will not take now: one line per call (naming the purges it
    carries) and one for the batch; each purge only at debug."""
    from drainbus.drain import cloudflare, daemon, ledger

    for module, name in ((cloudflare, "_log"), (daemon, "log"), (ledger, "log")):
        monkeypatch.setattr(module, name, structlog.get_logger(module.__name__))
    alice = add_user("alice")
    async with FakeCloudflare(plan="enterprise") as fake:
        # Each call is told to come back in five minutes, so it gives up at once.
        fake.fail_next(100, status=429, code=1134, headers={"Retry-After": "300"})
        with structlog.testing.capture_logs() as logs:
            node = await start_bus(drain=drain_config(cloudflare=fake, retry_after=60))
            lines = "".join(f"alice-{i}\n" for i in range(600)).encode()
            assert (await run_ssh(node.port, alice.key_file, "pub", TOPIC, stdin=lines)).code == 0
            async with asyncio.timeout(10):
                while not any(e["event"] == "drain_batch" and e["group"] == "cdn" for e in logs):
                    await asyncio.sleep(0.01)
    # Each key is a tag and a host (key_host): 12 calls of 100. The first 429 pauses the
    # bucket, so the other eleven give up without being sent; each is still one line.
    assert len(fake.received) == 1
    loud = Counter(e["event"] for e in logs if e["log_level"] in ("warning", "error"))
    assert loud == {"request_gave_up": 12, "drain_purge_retry_later": 1}
    assert {e["purges"] for e in logs if e["event"] == "request_gave_up"} == {100}
    (batch,) = [e for e in logs if e["event"] == "drain_purge_retry_later"]
    assert batch["purges"] == 600
    debug = [e for e in logs if e["event"] == "drain_purge" and e["group"] == "cdn"]
    assert (len(debug), {e["log_level"] for e in debug}) == (600, {"debug"})
