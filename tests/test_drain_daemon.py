"""The drain daemon in process, against the suite's Redis, with targets that answer as told:
retries and dead letters, resuming after a crash, missed purges, batch sizes, the cdn role's
wait for rate-limit room, Redis failing under the loop, refill receipts, start-up errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from pydantic import SecretStr
from redis.asyncio import Redis
from structlog.testing import capture_logs

from drainbus.bus.streams import Keys
from drainbus.config import DrainSettings
from drainbus.drain import daemon, ledger, missed
from drainbus.drain.cloudflare import CloudflareForwarder, CloudflareZoneConfig
from drainbus.drain.daemon import Drain
from drainbus.drain.dead_letters import list_dead_letters
from drainbus.drain.nginx import NginxCache, NginxCacheConfig
from drainbus.drain.purges import Purge
from drainbus.drain.receipts import receipts_of, receipts_topic, target_part
from drainbus.drain.retry import DONE, Outcome
from drainbus.drain.target_stats import HttpPurgeStats
from drainbus.drain.targets import NginxTarget, Target
from drainbus.errors import BackendUnavailable, StartupError
from drainbus.metrics import REGISTRY
from tests.fakes.cloudflare_api import FakeCloudflare
from tests.nginx_env import CACHE_KEY, CACHE_LEVELS, write_cache_file

TOPIC = "cache-drain"


@pytest.fixture
def logs(
    fresh_logging: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[MutableMapping[str, Any]]]:
    """What the daemon logs (the ledger logs under its name), at every level."""
    for module in (daemon, ledger, missed):
        monkeypatch.setattr(module, "log", structlog.get_logger("drainbus.drain.daemon"))
    from drainbus import backoff

    monkeypatch.setattr(backoff, "log", structlog.get_logger("drainbus.backoff"))
    with capture_logs() as captured:
        yield captured


class Scripted:
    """A target that carries out each batch at once, failing the keys it is told to."""

    def __init__(self, name: str = "edge") -> None:
        self.name = name
        self.fail: dict[str, Outcome] = {}
        self.batches: list[list[str]] = []
        self.flushes = 0

    def done(self) -> list[str]:
        return [key for batch in self.batches for key in batch]

    async def apply(self, purges: Sequence[Purge]) -> list[Outcome]:
        keys = [min(p.keys) for p in purges]
        self.batches.append(keys)
        return [self.fail.get(key, DONE) for key in keys]

    async def flush_all(self) -> int:
        self.flushes += 1
        return 0

    def snapshot(self) -> dict[str, Any]:
        return {"batches": len(self.batches)}

    def stats(self) -> HttpPurgeStats:
        return HttpPurgeStats(requests={}, retries=0, skipped=0, last_error=None)


def make_drain(
    redis: Redis, redis_url: str, namespace: str, *, local: Sequence[Any] = (),
    cdn: Sequence[Target] = (), admins: Iterable[str] = ("root", "acme", "other"),
    options: Mapping[str, Any] | None = None, **settings: Any,
) -> Drain:  # fmt: skip
    """A drain on the test's namespace: ``settings`` for its DrainSettings, ``options`` for
    Drain's own keywords (the cdn role's batch window, rate limit and batch size)."""
    return Drain(
        DrainSettings(**{"node": "web1", "retry_after": 10.0, **settings}),
        redis=redis, redis_url=redis_url, keys=Keys(namespace), admins=frozenset(admins),
        local_targets=local, cdn_targets=cdn, **(options or {}),
    )  # fmt: skip


async def publish(
    redis: Redis, namespace: str, *lines: str | bytes, user: str = "root", **fields: Any
) -> list[bytes]:
    async with redis.pipeline(transaction=False) as pipe:
        for line in lines:
            entry: dict[Any, Any] = {"d": line, "u": user, "m": "m", **fields}
            pipe.xadd(Keys(namespace).stream(TOPIC), entry)
        ids: Any = await pipe.execute()
    return [bytes(i) for i in ids]


async def until(condition: Callable[[], Any], timeout: float = 5) -> None:
    """Return once ``condition()`` (sync or async) holds; the targets and Redis give no event."""
    async with asyncio.timeout(timeout):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


async def receipts(redis: Redis, namespace: str) -> list[dict[str, Any]]:
    entries: Any = await redis.xrange(Keys(namespace).stream(receipts_topic(TOPIC)))
    return [r for i, f in entries for r in receipts_of(i, f)]


async def test_a_failing_purge_is_retried_then_dead_lettered_with_the_targets_error(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """max_deliveries 2: a purge its target keeps failing is tried twice, each failure
    receipted, then dead-lettered with the target's last error; the other is done once."""
    target = Scripted()
    target.fail["site-bad"] = Outcome("retry_later", error="edge: HTTP 503")
    drain = make_drain(
        redis, redis_url, namespace, local=[target], retry_after=0.2, max_deliveries=2
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        bad, ok = await publish(redis, namespace, "site-bad", "site-ok")
        # Two reclaims 0.2 s apart: well within 2.5 s unless a read blocks past a reclaim.
        await until(lambda: list_dead_letters(redis, Keys(namespace), TOPIC), timeout=2.5)
        tg.cancel_scope.cancel()
    [letter] = await list_dead_letters(redis, Keys(namespace), TOPIC)
    assert (letter.origin_id, letter.group) == (bad.decode(), "node-web1")
    assert letter.error == "gave up after 2 deliveries: edge: HTTP 503"
    assert sorted(target.done()) == ["site-bad", "site-bad", "site-ok"]
    assert drain.stats.retries == 2
    written = await receipts(redis, namespace)
    assert {(r["node"], r["role"]) for r in written} == {("web1", "local")}
    parts = [(r["id"], r["targets"][0]["target"], r["targets"][0]["result"]) for r in written]
    assert sorted(parts) == sorted([
        (bad.decode(), "edge", "failed"), (ok.decode(), "edge", "accepted"),
        (bad.decode(), "edge", "failed"), (bad.decode(), "(drain)", "dead-lettered"),
    ])  # fmt: skip
    assert parts[-1] == (bad.decode(), "(drain)", "dead-lettered")
    (group,) = await redis.xinfo_groups(Keys(namespace).stream(TOPIC))
    assert group["pending"] == 0
    retried = [e for e in logs if e["event"] == "drain_purge_retry_later"]
    assert {(e["group"], e["retry_after"], e["error"]) for e in retried} == {
        ("node-web1", 0.2, "edge: HTTP 503")
    }
    batch = next(e for e in logs if e["event"] == "drain_batch" and e["purges"] == 2)
    seconds = batch.pop("seconds")
    assert 0 < seconds < 4
    assert round(seconds, 4) == seconds
    assert batch == {
        "event": "drain_batch", "log_level": "info", "group": "node-web1", "entries": 2,
        "invalid": 0, "purges": 2, "kinds": {"key": 2}, "results": {"retry_later": 1, "done": 1},
        "acked": 1,
    }  # fmt: skip


async def test_a_restart_resumes_its_own_pending_entries_and_drops_those_over_the_limit(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """Entries delivered to this node before it stopped: carried out after the restart, but
    one already delivered more than max_deliveries times is dead-lettered before the node
    says it is ready; the group existed, so none is created."""
    stream = Keys(namespace).stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    again, tired = await publish(redis, namespace, "site-again", "site-tired")
    await redis.xreadgroup("node-web1", "web1", {stream: ">"}, count=10)  # then it crashed
    for _ in range(2):  # and crashed on site-tired twice more: 3 deliveries
        await redis.xclaim(stream, "node-web1", "web1", 0, [tired])
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target], max_deliveries=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        letters = await list_dead_letters(redis, Keys(namespace), TOPIC)
        await until(target.done)
        tg.cancel_scope.cancel()
    assert [(d.origin_id, d.error) for d in letters] == [
        (tired.decode(), "gave up after 3 deliveries: no success within the delivery limit")
    ]
    assert target.done() == ["site-again"]
    resumed = [e for e in logs if e["event"] == "drain_resuming_pending"]
    assert [(e["log_level"], e["group"], e["entries"]) for e in resumed] == [
        ("info", "node-web1", 2)
    ]
    assert not any(e["event"] == "drain_group_created" for e in logs)
    kept: Any = await redis.xrange(stream)
    assert again in [bytes(i) for i, _ in kept]


async def test_a_new_group_starts_at_the_streams_end_and_is_logged(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """A node's first start creates its group after what the stream already holds."""
    await publish(redis, namespace, "site-before")
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target])
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        await publish(redis, namespace, "site-after")
        await until(target.done)
        tg.cancel_scope.cancel()
    assert target.done() == ["site-after"]
    created = [(e["log_level"], e["group"]) for e in logs if e["event"] == "drain_group_created"]
    assert created == [("info", "node-web1")]


async def test_purges_trimmed_unread_before_the_start_flush_the_caches_once(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """The gap seen at start-up is acted on once, not again before the read that jumps it."""
    stream = Keys(namespace).stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    await publish(redis, namespace, *(f"site-{n}" for n in range(10)))
    await redis.xtrim(stream, maxlen=2, approximate=False)
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target])
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await until(lambda: "site-9" in target.done())
        tg.cancel_scope.cancel()
    assert (target.flushes, drain.stats.flushes) == (1, 1)
    assert target.done() == ["site-8", "site-9"]


@pytest.mark.parametrize(
    ("users", "batches"),
    [(["acme"], [1000, 200]), (["acme", "other"], [250, 250, 250, 250, 200])],
    ids=["one-publisher", "two-publishers"],
)
async def test_a_local_batch_is_smaller_while_several_publishers_wait(
    redis: Redis, redis_url: str, namespace: str, users: list[str], batches: list[int]
) -> None:
    """1,200 purges waiting: one publisher's go in batches of 1,000; two publishers' in
    batches of 250, so a purge that just got its turn waits for a quarter of a batch."""
    stream = Keys(namespace).stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    for user in users:
        count = 1200 // len(users)
        await publish(redis, namespace, *(f"{user}-{n}" for n in range(count)), user=user)
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target])
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await until(lambda: len(target.done()) == 1200)
        tg.cancel_scope.cancel()
    assert [len(b) for b in target.batches] == batches


class Calls(Scripted):
    """A cdn target that signals each call, and notes what ``logs`` held at each."""

    def __init__(self, logs: Sequence[MutableMapping[str, Any]] = ()) -> None:
        super().__init__("cloudflare")
        self.called = asyncio.Event()
        self.logs = logs
        self.logged_before: list[list[str]] = []

    async def apply(self, purges: Sequence[Purge]) -> list[Outcome]:
        self.called.set()
        self.logged_before.append([e["event"] for e in self.logs])
        return await super().apply(purges)


async def test_a_busy_cdn_role_waits_for_room_and_sends_what_arrived_meanwhile_together(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """After a call, with no room for another for 0.5 s (the batch window too), the loop
    waits before reading: two purges published during the wait go in one call. Before
    the first call it did not wait: an idle bus sends at once."""
    target = Calls(logs)
    drain = make_drain(redis, redis_url, namespace, cdn=[target], admins={"root"},
                       options={"cdn_batch_window": 0.5, "cdn_busy_for": lambda: 0.5})  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        await publish(redis, namespace, "site-1")
        await target.called.wait()
        await publish(redis, namespace, "site-2")
        # Time is what is tested: the second purge comes later, but within the wait.
        await asyncio.sleep(0.05)
        await publish(redis, namespace, "site-3")
        await until(lambda: len(target.batches) == 2)
        tg.cancel_scope.cancel()
    assert target.batches == [["site-1"], ["site-2", "site-3"]]
    assert "drain_waiting_for_rate_limit" not in target.logged_before[0]
    waits = [e for e in logs if e["event"] == "drain_waiting_for_rate_limit"]
    assert waits[0] == {
        "event": "drain_waiting_for_rate_limit", "log_level": "debug", "group": "cdn",
        "seconds": 0.5,
    }  # fmt: skip


async def test_a_busy_cdn_role_never_waits_past_the_next_reclaim(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """A bucket with no room for a minute and a minute's batch window: the loop still reads
    (and reclaims) every retry_after / 2, so the next purge is sent within a second."""
    target = Calls()
    drain = make_drain(redis, redis_url, namespace, cdn=[target], admins={"root"},
                       options={"cdn_batch_window": 60, "cdn_busy_for": lambda: 60.0},
                       retry_after=0.4)  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        await publish(redis, namespace, "site-1")
        await target.called.wait()
        await publish(redis, namespace, "site-2")
        await until(lambda: len(target.batches) == 2, timeout=2)
        tg.cancel_scope.cancel()
    waits = [e["seconds"] for e in logs if e["event"] == "drain_waiting_for_rate_limit"]
    assert waits
    assert all(0 < s <= 0.2 and round(s, 3) == s for s in waits), waits


async def test_a_cdn_role_with_room_never_waits(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """Room for the next call at once: no wait after a batch, whatever the batch window."""
    target = Calls()
    drain = make_drain(redis, redis_url, namespace, cdn=[target], admins={"root"},
                       options={"cdn_batch_window": 60, "cdn_busy_for": lambda: 0.0})  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        await publish(redis, namespace, "site-1")
        await target.called.wait()
        await publish(redis, namespace, "site-2")
        await until(lambda: len(target.batches) == 2)
        tg.cancel_scope.cancel()
    assert not any(e["event"] == "drain_waiting_for_rate_limit" for e in logs)


async def test_redis_refusing_the_loop_is_retried_and_a_lost_group_recreated(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """The stream's key replaced by a string: each failure is a retry logged with its group
    and a short first delay; the key gone, the group is made again (a loss, so a flush)
    and purges flow again."""
    stream = Keys(namespace).stream(TOPIC)
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target], retry_after=0.4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(stream)
            pipe.set(stream, "not a stream")
            await pipe.execute()
        await until(lambda: any(e["event"] == "drain_redis_retry" for e in logs))
        await redis.delete(stream)
        await until(lambda: target.flushes)
        await publish(redis, namespace, "site-after")
        await until(target.done)
        tg.cancel_scope.cancel()
    retry = next(e for e in logs if e["event"] == "drain_redis_retry")
    assert (retry["log_level"], retry["group"], retry["attempt"]) == ("warning", "node-web1", 1)
    assert retry["error"]
    assert 0.05 <= retry["delay"] <= 0.1
    [lost] = [e for e in logs if e["event"] == "drain_group_lost"]
    assert (lost["log_level"], lost["group"]) == ("error", "node-web1")
    assert lost["reason"] == (
        "the consumer group vanished from Redis (a failover lost writes not yet replicated, "
        "Redis restarted empty, or the stream was deleted); recreating it"
    )
    assert target.flushes == 1


async def test_a_stream_deleted_under_the_drain_has_its_group_made_again_at_once(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """The stream deleted with its group while the drain runs: the check before the next
    read answers "no such key", which is the group gone too, so it is made again (and the
    caches flushed) at once, not at the next reclaim, retry_after / 2 = 15 s later."""
    stream = Keys(namespace).stream(TOPIC)
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target], retry_after=30)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        await redis.delete(stream)
        await until(lambda: target.flushes)
        await publish(redis, namespace, "site-after")
        await until(target.done)
        tg.cancel_scope.cancel()
    assert [e["group"] for e in logs if e["event"] == "drain_group_lost"] == ["node-web1"]
    assert target.done() == ["site-after"]


async def test_a_stale_refill_evicted_after_the_purge_gets_a_receipt(
    redis: Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """With a refill window, a stale copy written back after the purge is evicted, and the
    purge's entry gets a second receipt marked refill, read back from the stream."""
    host, path = "acme-blog.pages.example", "/p"
    (tmp_path / "cache").mkdir()
    config = NginxCacheConfig(cache_path=tmp_path / "cache", levels=CACHE_LEVELS, key=CACHE_KEY)
    write_cache_file(config.cache_path, f"http{host}{path}", headers=['ETag: "v1"'])
    settings = DrainSettings(node="web1", refill_window=1.0)  # a window of a second counts
    async with NginxCache(config, refill_window=1.0) as cache:
        target = NginxTarget(cache, settings.scope_rule, "pages")
        drain = Drain(settings, redis=redis, redis_url=redis_url, keys=Keys(namespace),
                      admins=frozenset({"root"}), local_targets=[target])  # fmt: skip
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain.run)
            await drain.ready.wait()
            [entry] = await publish(redis, namespace, f"url:http://{host}{path}")
            await until(lambda: cache.refill_guard.refills_evicted == 0 and drain.stats.purges_done)
            write_cache_file(config.cache_path, f"http{host}{path}", headers=['ETag: "v1"'])
            await cache.index.sync()
            assert cache.refills_evicted == 1
            await until(lambda: _refill_receipts(redis, namespace))
            tg.cancel_scope.cancel()
    [refill] = await _refill_receipts(redis, namespace)
    assert refill == {
        "id": entry.decode(), "purge": f"url:http://{host}{path}", "user": "root",
        "node": "web1", "role": "local", "targets": [target_part("pages", "evicted", count=1)],
        "refill": True,
    }  # fmt: skip


async def _refill_receipts(redis: Redis, namespace: str) -> list[dict[str, Any]]:
    return [r for r in await receipts(redis, namespace) if r.get("refill")]


async def test_a_stream_key_of_another_type_is_a_one_line_startup_error(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """Redis refusing the groups: StartupError naming the topic, the key and what it must be."""
    stream = Keys(namespace).stream(TOPIC)
    await redis.set(stream, "not a stream")
    drain = make_drain(redis, redis_url, namespace, local=[Scripted()])
    with pytest.raises(StartupError) as caught:
        await drain.run()
    message = str(caught.value)
    assert message.startswith(
        f"cannot drain '{TOPIC}': Redis refused to set up consumer groups on {stream} ("
    )
    assert "WRONGTYPE" in message
    assert message.endswith("); that key must be a stream (or not exist)")


async def test_redis_not_answering_at_start_up_is_backend_unavailable(namespace: str) -> None:
    """No Redis at the address: BackendUnavailable saying what the drain was doing."""
    url = "redis://127.0.0.1:9"  # discard: nothing listens
    client = Redis.from_url(url)
    try:
        drain = make_drain(client, url, namespace, local=[Scripted()])
        with pytest.raises(BackendUnavailable) as caught:
            await drain.run()
    finally:
        await client.aclose()
    message = str(caught.value)
    assert message.startswith(
        f"backend unavailable: Redis did not answer while setting up the drain of '{TOPIC}' ("
    )
    assert "127.0.0.1:9" in message


@pytest.mark.parametrize(("retry_after", "ttl"), [(1.0, 30), (20.0, 60)], ids=["30s", "3x"])
async def test_the_status_says_what_this_node_runs_before_it_is_ready(
    redis: Redis, redis_url: str, namespace: str, retry_after: float, ttl: int
) -> None:
    """Publishers waiting for receipts count the live nodes: the status is there at ready,
    for three retry_after periods and at least 30 s."""
    local, cdn = Scripted("pages"), Calls()
    drain = make_drain(
        redis, redis_url, namespace, local=[local], cdn=[cdn], retry_after=retry_after
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        key = Keys(namespace).drain_status("web1")
        raw: Any = await redis.get(key)
        left = await redis.ttl(key)
        tg.cancel_scope.cancel()
    status = json.loads(raw)
    assert (status["node"], status["roles"]) == ("web1", ["local", "cdn"])
    assert (status["local_targets"], status["cdn_targets"]) == (["pages"], ["cloudflare"])
    assert status["targets"] == {"pages": {"batches": 0}, "cloudflare": {"batches": 0}}
    counters = ("last_purge_ms", "purges_done", "dead_lettered", "last_error")
    assert [status[name] for name in counters] == [None, 0, 0, None]
    assert drain.stats.groups == {"node-web1": (0, 0), "cdn": (0, 0)}
    assert ttl - 5 < left <= ttl


async def test_each_entry_is_checked_again_against_its_publishers_scope(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """A non-admin's purge of a key they do not own, a line that is not a purge, or one that
    is not UTF-8, is dead-lettered as invalid; their own key is carried out."""
    await redis.xgroup_create(Keys(namespace).stream(TOPIC), "node-web1", id="$", mkstream=True)
    # Queued before the start: one read, one batch of invalid entries only.
    theirs, junk, binary = await publish(
        redis, namespace, "other-site", "frob:x", b"\xff", user="acme"
    )
    target = Scripted()
    drain = make_drain(
        redis, redis_url, namespace, local=[target], admins={"root"}, key_host="{key}.pages.example"
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await until(lambda: any(e["event"] == "drain_batch" for e in logs))
        await publish(redis, namespace, "acme-blog", user="acme")
        await until(target.done)
        tg.cancel_scope.cancel()
    assert target.done() == ["acme-blog"]
    letters = await list_dead_letters(redis, Keys(namespace), TOPIC)
    assert [d.origin_id for d in letters] == [theirs.decode(), junk.decode(), binary.decode()]
    assert all(d.error.startswith("invalid purge: ") for d in letters)
    assert "other-site" in letters[0].error
    assert "frob" in letters[1].error
    assert next(e for e in logs if e["event"] == "drain_batch") == {
        "event": "drain_batch", "log_level": "info", "group": "node-web1", "entries": 3,
        "invalid": 3,
    }  # fmt: skip


def purge_seconds() -> tuple[float, float]:
    """The local role's purge latency histogram: (observations, their sum in seconds)."""
    count = REGISTRY.get_sample_value("drainbus_purge_seconds_count", {"role": "local"})
    total = REGISTRY.get_sample_value("drainbus_purge_seconds_sum", {"role": "local"})
    return count or 0.0, total or 0.0


async def test_each_acknowledged_entry_times_its_purge_from_its_arrival(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """An entry received 2 s ago is observed as about 2 s; one stamped in the future as 0;
    one without a time is not observed; the drain notes when it last purged."""
    now_ms = int(time.time() * 1000)
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target])
    count, total = purge_seconds()
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        await publish(redis, namespace, "site-old", t=now_ms - 2000)
        await publish(redis, namespace, "site-ahead", t=now_ms + 60_000)
        await publish(redis, namespace, "site-untimed")
        await until(lambda: len(target.done()) == 3)
        await until(lambda: drain.stats.entries_acked == 3)
        tg.cancel_scope.cancel()
    after_count, after_total = purge_seconds()
    assert after_count - count == 2
    assert 2.0 <= after_total - total < 4.0
    assert drain.stats.last_purge_ms is not None
    assert now_ms <= drain.stats.last_purge_ms <= int(time.time() * 1000)


class FlushFails(Scripted):
    """A local target whose first flush fails (a cache folder it cannot read)."""

    async def flush_all(self) -> int:
        await super().flush_all()
        if self.flushes == 1:
            raise PermissionError("cache folder not readable")
        return 0


async def test_a_failure_while_recreating_a_lost_group_is_logged_and_backed_off(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """The group destroyed, and the flush that follows its recreation failing: a warning
    naming the group and the error, then the loop backs off on the lost group's error; the
    group is back, so purges flow again."""
    stream = Keys(namespace).stream(TOPIC)
    target = FlushFails()
    drain = make_drain(redis, redis_url, namespace, local=[target], retry_after=0.4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        await redis.xgroup_destroy(stream, "node-web1")
        await until(lambda: any(e["event"] == "drain_redis_retry" for e in logs))
        await publish(redis, namespace, "site-after")
        await until(target.done)
        # Round the loop once more: a flush owed and done is not owed again.
        await publish(redis, namespace, "site-later")
        await until(lambda: len(target.done()) == 2)
        tg.cancel_scope.cancel()
    [failed] = [e for e in logs if e["event"] == "drain_group_recreate_failed"]
    assert failed == {
        "event": "drain_group_recreate_failed", "log_level": "warning", "group": "node-web1",
        "error": "cache folder not readable",
    }  # fmt: skip
    retry = next(e for e in logs if e["event"] == "drain_redis_retry")
    assert "NOGROUP" in retry["error"]
    assert target.done() == ["site-after", "site-later"]
    # The failed flush is owed, not forgotten: it is tried again, and succeeds, once.
    assert target.flushes == 2


@pytest.mark.parametrize(
    ("batch_size", "waiting", "batches"),
    [(0, 3, [1, 1, 1]), (2, 3, [2, 1]), (5000, 4097, [4096, 1])],
    ids=["at-least-one", "as-configured", "at-most-4096"],
)
async def test_a_cdn_batch_holds_the_configured_number_of_purges(
    redis: Redis, redis_url: str, namespace: str, batch_size: int, waiting: int,
    batches: list[int],
) -> None:  # fmt: skip
    """cdn_batch_size purges per cdn batch, two publishers waiting or not: at least one, at
    most 4,096."""
    stream = Keys(namespace).stream(TOPIC)
    await redis.xgroup_create(stream, "cdn", id="$", mkstream=True)
    for user, share in (("acme", waiting // 2), ("other", waiting - waiting // 2)):
        await publish(redis, namespace, *(f"{user}-{n}" for n in range(share)), user=user)
    target = Calls()
    drain = make_drain(
        redis,
        redis_url,
        namespace,
        cdn=[target],
        admins={"acme", "other"},
        options={"cdn_batch_size": batch_size},
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await until(lambda: len(target.done()) == waiting)
        tg.cancel_scope.cancel()
    assert [len(b) for b in target.batches] == batches


async def test_entries_missing_their_fields_are_invalid_purges(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """An entry without a publisher is no one's (nor one whose name is not UTF-8); one
    without a line is no purge: each is dead-lettered, none reaches the target."""
    stream = Keys(namespace).stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    no_user: Any = await redis.xadd(stream, {"d": "site-x"})
    bad_user: Any = await redis.xadd(stream, {"d": "site-x", "u": b"\xff"})
    no_line: Any = await redis.xadd(stream, {"u": "root"})
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target])
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await until(lambda: drain.stats.dead_lettered == 3)
        tg.cancel_scope.cancel()
    letters = await list_dead_letters(redis, Keys(namespace), TOPIC)
    assert [d.origin_id for d in letters] == [i.decode() for i in (no_user, bad_user, no_line)]
    assert "user '' may purge only" in letters[0].error
    assert "user '\ufffd' may purge only" in letters[1].error
    assert letters[2].error.startswith("invalid purge: ")
    assert target.batches == []


async def test_cloudflare_alone_acknowledges_each_call_as_it_is_accepted(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """The cdn role with Cloudflare its one target: 250 tag purges in three calls, each
    call's entries receipted with its purge id and acknowledged as it is accepted; the batch
    log counts them all acknowledged, and their latency is observed."""
    stream = Keys(namespace).stream(TOPIC)
    await redis.xgroup_create(stream, "cdn", id="$", mkstream=True)
    ids = await publish(redis, namespace, *(f"tag:t{n:03d}" for n in range(250)))
    async with FakeCloudflare(plan="enterprise") as fake:
        zone = CloudflareZoneConfig(
            zone_id="zone-a", api_base=fake.api_base, api_token=SecretStr("test-token")
        )
        async with CloudflareForwarder([zone]) as cloudflare:
            drain = make_drain(redis, redis_url, namespace, cdn=[cloudflare])
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain.run)
                await until(lambda: drain.stats.entries_acked == 250)
                await until(lambda: any(e["event"] == "drain_batch" for e in logs))
                tg.cancel_scope.cancel()
    assert len(fake.accepted) == 3
    by_call = {tag: call.reference for call in fake.accepted for tag in call.items}
    written = await receipts(redis, namespace)
    assert [r["id"] for r in written] == [i.decode() for i in ids]
    assert all(r["role"] == "cdn" for r in written)
    assert all(
        r["targets"][0]["reference"] == by_call[r["purge"].removeprefix("tag:")] for r in written
    )
    (group,) = await redis.xinfo_groups(stream)
    assert group["pending"] == 0
    batch = next(e for e in logs if e["event"] == "drain_batch")
    assert (batch["group"], batch["purges"], batch["acked"]) == ("cdn", 250, 250)
    assert batch["results"] == {"done": 250}
    assert drain.stats.last_purge_ms is not None


async def test_entries_in_flight_and_read_ahead_stay_claimed_while_a_batch_is_held(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """A batch held for two retry_after periods: its entry and the one waiting behind it
    are claimed again and again, never idle long enough to be taken as abandoned."""
    stream = Keys(namespace).stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    # Two publishers: a batch of 250 (SHARED_BATCH) in turns, so acme-249 waits behind it.
    await publish(redis, namespace, *(f"acme-{n}" for n in range(250)), user="acme")
    await publish(redis, namespace, "other-0", user="other")
    target = Gated()
    drain = make_drain(redis, redis_url, namespace, local=[target], retry_after=0.9)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await target.entered.wait()
        # Time itself is what is tested: two retry_after periods pass with the batch held.
        await asyncio.sleep(1.8)
        pending: Any = await redis.xpending_range(stream, "node-web1", "-", "+", 300)
        target.gate.set()
        await until(lambda: len(target.done()) == 251)
        tg.cancel_scope.cancel()
    assert [len(b) for b in target.batches] == [250, 1]
    assert len(pending) == 251
    assert all(p["time_since_delivered"] < 900 for p in pending), pending
    assert drain.stats.retries == 0


class Gated(Scripted):
    """A target that holds its batches until the gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def apply(self, purges: Sequence[Purge]) -> list[Outcome]:
        self.entered.set()
        await self.gate.wait()
        return await super().apply(purges)


async def test_an_idle_drain_blocks_in_its_reads_instead_of_polling(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """Nothing to read: each read blocks until the next reclaim (retry_after / 2 = 0.25 s),
    so half a second idle costs a handful of XREADGROUPs, not hundreds."""
    drain = make_drain(redis, redis_url, namespace, local=[Scripted()], retry_after=0.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        before = await xreadgroup_calls(redis)
        # Time itself is what is tested: how many reads half a second takes.
        await asyncio.sleep(0.5)
        after = await xreadgroup_calls(redis)
        tg.cancel_scope.cancel()
    assert 1 <= after - before <= 10


async def xreadgroup_calls(redis: Redis) -> int:
    """XREADGROUPs the server has run (every client's: the tests run one at a time)."""
    stats: Any = await redis.info("commandstats")
    return int(stats.get("cmdstat_xreadgroup", {}).get("calls", 0))


async def test_the_backlog_reads_ahead_no_more_than_read_ahead(
    redis: Redis, redis_url: str, namespace: str
) -> None:
    """read_ahead 10 with 25 purges waiting: each read takes what the backlog has room for,
    so batches of 10, 10 and 5."""
    await redis.xgroup_create(Keys(namespace).stream(TOPIC), "node-web1", id="$", mkstream=True)
    await publish(redis, namespace, *(f"site-{n}" for n in range(25)))
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target], read_ahead=10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await until(lambda: len(target.done()) == 25)
        tg.cancel_scope.cancel()
    assert [len(b) for b in target.batches] == [10, 10, 5]


async def test_pending_entries_of_a_dead_consumer_trimmed_since_are_lost_and_flushed(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """Entries another consumer read and never acknowledged, trimmed before this node
    reclaims them: logged as lost with their count, and the local caches flushed."""
    stream = Keys(namespace).stream(TOPIC)
    await redis.xgroup_create(stream, "node-web1", id="$", mkstream=True)
    await publish(redis, namespace, "site-0", "site-1", "site-2")
    await redis.xreadgroup("node-web1", "crashed", {stream: ">"}, count=10)
    await redis.xtrim(stream, maxlen=1, approximate=False)
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target], retry_after=0.2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await until(lambda: target.done() == ["site-2"])
        tg.cancel_scope.cancel()
    [lost] = [e for e in logs if e["event"] == "drain_entries_lost"]
    assert lost == {
        "event": "drain_entries_lost", "log_level": "error", "group": "node-web1", "count": 2,
        "reason": "pending entries were trimmed from the stream before success",
    }  # fmt: skip
    assert target.flushes >= 1


async def test_a_lost_group_recreated_at_once_is_no_redis_failure(
    redis: Redis, redis_url: str, namespace: str, logs: list[MutableMapping[str, Any]]
) -> None:
    """The group destroyed under a running drain: made again and the caches flushed, with
    no retry logged or waited for (nothing failed that needs one)."""
    target = Scripted()
    drain = make_drain(redis, redis_url, namespace, local=[target])
    async with anyio.create_task_group() as tg:
        tg.start_soon(drain.run)
        await drain.ready.wait()
        await redis.xgroup_destroy(Keys(namespace).stream(TOPIC), "node-web1")
        await until(lambda: target.flushes)
        await publish(redis, namespace, "site-after")
        await until(target.done)
        tg.cancel_scope.cancel()
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == [
        "drain_group_lost", "drain_missed_purges_flushing", "drain_flushed"
    ]  # fmt: skip
