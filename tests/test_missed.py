"""What a drain group does about purges it can no longer read: a local group flushes its
node's caches (real nginx cache folders, no nginx needed), the cdn group says so loudly."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from drainbus.config import DrainSettings
from drainbus.drain import missed
from drainbus.drain.fair import FairBacklog
from drainbus.drain.missed import act_on_missed
from drainbus.drain.nginx import NginxCache, NginxCacheConfig
from drainbus.drain.roles import DrainStats, Role
from drainbus.drain.targets import NginxTarget
from tests.nginx_env import write_cache_file


@pytest.fixture(autouse=True)
def fresh_missed_log(fresh_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """missed's logger made anew, as fresh_logging does for the core's (see there)."""
    monkeypatch.setattr(missed, "log", structlog.get_logger("drainbus.drain.daemon"))


@pytest.fixture
async def caches(tmp_path: Path) -> AsyncIterator[list[NginxTarget]]:
    """Two nginx cache folders as targets, holding 2 and 3 files."""
    rule = DrainSettings(node="web1").scope_rule
    async with AsyncExitStack() as stack:
        targets = []
        for name, count in (("edge", 2), ("origin", 3)):
            folder = tmp_path / name
            for n in range(count):
                write_cache_file(folder, f"httph.example/{n}")
            config = NginxCacheConfig(cache_path=folder, key="$scheme$host$request_uri")
            cache = await stack.enter_async_context(NginxCache(config, refill_window=0))
            targets.append(NginxTarget(cache, rule, name))
        yield targets


def role(*, flush: bool) -> Role:
    group = "node-web1" if flush else "cdn"
    return Role("local" if flush else "cdn", group, [], FairBacklog(10), flush_if_missed=flush)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def test_a_local_group_flushes_every_local_cache(caches: list[NginxTarget]) -> None:
    """Missed purges on a local group: every local cache emptied (each flush logged with what
    it removed), each flush counted, no error recorded."""
    stats = DrainStats(flushes=4)
    with capture_logs() as logs:
        await act_on_missed(role(flush=True), caches, stats)
    assert [sorted(t.cache.config.cache_path.rglob("*/*/*")) for t in caches] == [[], []]
    assert (stats.flushes, stats.last_error) == (5, None)
    [flushing] = events(logs, "drain_missed_purges_flushing")
    assert (flushing["group"], flushing["log_level"]) == ("node-web1", "warning")
    assert flushing["reason"] == (
        "purges this node had not read were trimmed from the stream (down or behind longer "
        "than the retention); flushing the local caches instead of serving stale pages"
    )
    flushed = events(logs, "drain_flushed")
    assert [(e["target"], e["removed"], e["log_level"]) for e in flushed] == [
        ("edge", 2, "warning"),
        ("origin", 3, "warning"),
    ]
    assert events(logs, "drain_purges_missed") == []


async def test_the_cdn_group_only_says_so(caches: list[NginxTarget]) -> None:
    """Missed purges on the cdn group: an error naming the group and what to do, the error
    recorded for the status; no cache is touched, nothing counted as flushed."""
    stats = DrainStats()
    with capture_logs() as logs:
        await act_on_missed(role(flush=False), caches, stats)
    assert [len(list(t.cache.config.cache_path.rglob("*/*/*"))) for t in caches] == [2, 3]
    assert stats.flushes == 0
    assert stats.last_error == "purges were trimmed from the stream before this group read them"
    [missed_log] = events(logs, "drain_purges_missed")
    assert (missed_log["group"], missed_log["log_level"]) == ("cdn", "error")
    assert missed_log["reason"] == (
        "purges were trimmed before this group read them (down or behind longer than the "
        "retention); purge the CDN by hand if stale pages matter"
    )
    assert events(logs, "drain_flushed") == events(logs, "drain_missed_purges_flushing") == []
