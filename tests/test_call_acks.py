"""The cdn group acknowledges call by call: a crash re-sends at most the calls in flight,
and a failing batch logs one line per call, not one per purge; in process, what CallAcks and
apply_to_targets hand the daemon's receipts and acknowledgements, and when."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr
from redis.asyncio import Redis
from structlog.testing import capture_logs

from drainbus.bus.streams import Keys, Row
from drainbus.config import DrainSettings
from drainbus.drain import call_acks
from drainbus.drain.call_acks import Ack, CallAcks, WriteReceipts, apply_to_targets
from drainbus.drain.cloudflare import CloudflareForwarder, CloudflareZoneConfig
from drainbus.drain.nginx import NginxCache, NginxCacheConfig
from drainbus.drain.purges import Purge
from drainbus.drain.retry import RetryPolicy
from drainbus.drain.targets import NginxTarget
from drainbus.node import Node
from tests.conftest import User, run_ssh
from tests.fakes.cloudflare_api import FakeCloudflare
from tests.test_drain import drain_config

StartNode = Callable[..., Awaitable[Node]]
TOPIC = "cache-drain"
PER_CALL = 100  # tags per Cloudflare call


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


@pytest.mark.own_process
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


# --- in process: CallAcks and apply_to_targets against the local Cloudflare API ----------------


Log = list[tuple[str, Any]]


def recorder(log: Log) -> tuple[WriteReceipts, Ack]:
    """The daemon's write_receipts and ack, as steps recorded in ``log`` in the order made."""

    async def write_receipts(receipts: Sequence[tuple[Row, Sequence[dict[str, Any]]]]) -> None:
        log.append(("receipts", [(row[0], list(parts)) for row, parts in receipts]))

    async def ack(ids: list[bytes]) -> None:
        log.append(("ack", ids))

    return write_receipts, ack


def tag_purges(count: int) -> tuple[list[Purge], dict[Purge, list[Row]]]:
    """``count`` tag purges, each with its entry; the first has a second (a duplicate)."""
    purges = [Purge(tags=frozenset({f"t{n:03d}"})) for n in range(count)]
    rows = {p: [(f"{n}-0".encode(), {b"d": b"x"})] for n, p in enumerate(purges)}
    rows[purges[0]].append((b"0-1", {b"d": b"x"}))
    return purges, rows


@pytest.fixture
async def cloudflare() -> AsyncIterator[FakeCloudflare]:
    async with FakeCloudflare(plan="enterprise") as fake:
        yield fake


def forwarder(fake: FakeCloudflare) -> CloudflareForwarder:
    zone = CloudflareZoneConfig(
        zone_id="zone-a", api_base=fake.api_base, api_token=SecretStr("test-token")
    )
    return CloudflareForwarder([zone], retry=RetryPolicy(base=0.01, cap=0.05, max_attempts=1))


async def test_each_cloudflare_call_is_receipted_then_acknowledged_as_it_settles(
    cloudflare: FakeCloudflare,
) -> None:
    """Cloudflare the one target, 250 tag purges in three calls, the first failing: the
    second and third calls' purges are receipted, then their entries acknowledged, call by
    call; the failed call's purges are left to the end of the batch."""
    purges, rows = tag_purges(2 * PER_CALL + 50)
    cloudflare.fail_next(1, status=503)  # given up at once: one attempt
    log: Log = []
    write_receipts, ack = recorder(log)
    async with forwarder(cloudflare) as target:
        early = CallAcks([target], purges, rows, write_receipts=write_receipts, ack=ack)
        began = time.monotonic()
        outcomes, parts = await apply_to_targets([target], purges, early)
        took_ms = (time.monotonic() - began) * 1000
    assert [step for step, _ in log] == ["receipts", "ack", "receipts", "ack"]
    first = [i for i, p in enumerate(purges) if p.tags & set(cloudflare.received[0].body["tags"])]
    done = sorted(set(range(len(purges))) - set(first))
    assert sorted(early.done) == done
    assert [o.status for o in outcomes] == [
        "done" if i in done else "retry_later" for i in range(250)
    ]
    receipted = [entry_id for _, batch in log[::2] for entry_id, _ in batch]
    acked = [entry_id for _, ids in log[1::2] for entry_id in ids]
    assert receipted == acked == [row[0] for i in done for row in rows[purges[i]]]
    assert early.entries == len(acked)
    # Each call's receipts are Cloudflare's answer to it, timed from the batch's start.
    for (_, batch), call in zip(log[::2], cloudflare.received[1:], strict=True):
        for _, [part] in batch:
            assert (part["target"], part["result"]) == ("cloudflare", "accepted")
            assert part["reference"] == call.reference
            assert 0 < part["ms"] <= took_ms + 0.1
    # The batch's own receipt parts: every purge's, with the target's time for the batch.
    results = {"done": "accepted", "retry_later": "failed"}
    assert [part["result"] for [part] in parts] == [results[o.status] for o in outcomes]
    assert {part["ms"] for [part] in parts} == {parts[0][0]["ms"]}
    assert 0 < parts[0][0]["ms"] <= took_ms + 0.1


async def test_a_call_with_nothing_done_acknowledges_nothing(cloudflare: FakeCloudflare) -> None:
    """A call failing all its purges: nothing receipted or acknowledged early."""
    purges, rows = tag_purges(3)
    cloudflare.fail_next(1, status=503)  # given up at once: one attempt
    log: Log = []
    write_receipts, ack = recorder(log)
    async with forwarder(cloudflare) as target:
        early = CallAcks([target], purges, rows, write_receipts=write_receipts, ack=ack)
        outcomes, _ = await apply_to_targets([target], purges, early)
    assert {o.status for o in outcomes} == {"retry_later"}
    assert (log, early.done, early.entries) == ([], set(), 0)


async def test_with_several_targets_the_batch_settles_at_its_end(
    cloudflare: FakeCloudflare, fresh_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two targets run at once, nothing acknowledged early (a purge is done only when both
    are); a target that raises is logged and its purges retried later; each purge's outcome
    is the worse of the two, and its receipt has a part per target."""
    monkeypatch.setattr(call_acks, "log", structlog.get_logger("drainbus.drain.daemon"))
    purges, rows = tag_purges(2)
    log: Log = []
    write_receipts, ack = recorder(log)
    broken = forwarder(cloudflare)  # never opened: apply raises RuntimeError
    broken.name = "broken"
    async with forwarder(cloudflare) as target:
        early = CallAcks([target, broken], purges, rows, write_receipts=write_receipts, ack=ack)
        with capture_logs() as logs:
            outcomes, parts = await apply_to_targets([target, broken], purges, early)
    assert early.target is None
    assert (log, early.done) == ([], set())
    assert [o.status for o in outcomes] == ["retry_later", "retry_later"]
    assert all(o.error is not None and o.error.startswith("broken: ") for o in outcomes)
    assert [[(p["target"], p["result"]) for p in per_purge] for per_purge in parts] == [
        [("cloudflare", "accepted"), ("broken", "failed")]
    ] * 2
    [failed] = [e for e in logs if e["event"] == "drain_target_failed"]
    assert (failed["target"], failed["log_level"]) == ("broken", "error")
    assert len(cloudflare.accepted) == 1


async def test_one_target_that_is_not_cloudflare_settles_at_the_batch_end(
    tmp_path: Path,
) -> None:
    """Early acknowledgements are Cloudflare's alone: another single target (an nginx cache)
    is applied as it is, and nothing is acknowledged before the batch's end."""
    purges, rows = tag_purges(2)
    log: Log = []
    write_receipts, ack = recorder(log)
    (tmp_path / "cache").mkdir()
    config = NginxCacheConfig(cache_path=tmp_path / "cache", key="$scheme$host$request_uri")
    async with NginxCache(config, refill_window=0) as cache:
        target = NginxTarget(cache, DrainSettings(node="web1").scope_rule, "edge")
        early = CallAcks([target], purges, rows, write_receipts=write_receipts, ack=ack)
        outcomes, parts = await apply_to_targets([target], purges, early)
    assert early.target is None
    assert (log, early.done, early.entries) == ([], set(), 0)
    assert [(o.status, o.evicted) for o in outcomes] == [("done", 0), ("done", 0)]
    assert [[(p["target"], p["result"]) for p in per] for per in parts] == [
        [("edge", "none-cached")]
    ] * 2
