"""Each target kind's typed stats, as metrics and as `ssh bus stats` figures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from drainbus.bus.streams import Keys
from drainbus.config import DrainSettings
from drainbus.drain.cloudflare import CloudflareForwarder, CloudflareZoneConfig
from drainbus.drain.daemon import Drain
from drainbus.drain.http_purge import HttpPurgeConfig, HttpPurger
from drainbus.drain.purges import Purge
from drainbus.drain.target_stats import CloudflareStats, HttpPurgeStats
from drainbus.metrics import NodeCollector
from tests.fakes import FakeCloudflare

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


@pytest.fixture
def fake() -> Iterator[FakeCloudflare]:
    server = FakeCloudflare()
    server.start()
    yield server
    server.stop()


def collect(collector: NodeCollector) -> Samples:
    samples: Samples = {}
    for family in collector.collect():
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


async def test_metrics_follow_each_targets_stats_type(
    fake: FakeCloudflare, redis: Redis, redis_url: str, namespace: str
) -> None:
    """Cloudflare's stats become its call, token and retry metrics; an HTTP-purge cache's
    stats are shown by `ssh bus stats` but make no nginx or Cloudflare metric."""
    zone = CloudflareZoneConfig(
        zone_id="zone-a", api_base=fake.api_base, api_token=SecretStr("test-token")
    )
    http = HttpPurgeConfig(url="http://127.0.0.1:9/{path}")  # nothing listens: never called
    async with (
        CloudflareForwarder([zone]) as cdn,
        HttpPurger(http, name="varnish") as local,
    ):
        assert (await cdn.apply([Purge(tags=frozenset({"t"}))]))[0].status == "done"
        # No tags_url: the tag part is skipped (counted), and no request is made.
        assert (await local.apply([Purge(tags=frozenset({"t"}))]))[0].status == "done"
        drain = Drain(
            DrainSettings(node="web1"), redis=redis, redis_url=redis_url,
            keys=Keys(namespace), admins=frozenset(), local_targets=[local],
            cdn_targets=[cdn],
        )  # fmt: skip
        metrics = collect(NodeCollector("web1", drain=drain))

        assert isinstance(cdn.stats(), CloudflareStats)
        assert local.stats() == HttpPurgeStats(requests={}, retries=0, skipped=1, last_error=None)
        calls = metrics["drainbus_cloudflare_calls_total"]
        assert calls == {(("node", "web1"), ("outcome", "done")): 1}
        assert metrics["drainbus_cloudflare_rate_limited_total"] == {(("node", "web1"),): 0}
        assert metrics["drainbus_cloudflare_retries_total"] == {(("node", "web1"),): 0}
        [account] = metrics["drainbus_cloudflare_tokens"]
        assert ("node", "web1") in account
        assert "drainbus_objects_evicted_total" not in metrics
        for name, samples in metrics.items():
            for labels in samples:
                assert ("target", "varnish") not in labels, name
        assert local.snapshot() == {
            "requests": {}, "retries": 0, "skipped": 1, "last_error": None
        }  # fmt: skip
        assert set(cdn.snapshot()) == {
            "calls", "rate_limited", "retries", "tokens_left", "last_error"
        }  # fmt: skip
