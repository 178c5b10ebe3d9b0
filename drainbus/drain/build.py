"""Build the drain daemon from the settings, with every configured target opened."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Keys
from drainbus.config import Settings
from drainbus.drain.cloudflare import PLAN_LIMITS, CloudflareForwarder, CloudflareZoneConfig
from drainbus.drain.daemon import Drain
from drainbus.drain.http_purge import HttpPurger
from drainbus.drain.nginx import NginxCache
from drainbus.drain.targets import LocalCacheTarget, NginxTarget, Target
from drainbus.identity import user_key

__all__ = ["Drain", "open_drain"]

# A cdn batch holds what the rate limit sends in about this long: a purge read behind it
# (another publisher's, say) waits about that long for its turn, not for a whole backlog.
_CDN_BATCH_SECONDS = 0.25


@asynccontextmanager
async def open_drain(
    settings: Settings, *, redis: RedisClient, redis_url: str
) -> AsyncIterator[Drain]:
    """Open every target in ``settings.drain`` and yield the daemon (not yet running)."""
    drain = settings.drain
    rule = drain.scope_rule
    async with AsyncExitStack() as stack:
        local: list[LocalCacheTarget] = []
        for number, cache_config in enumerate(drain.nginx, start=1):
            cache = await stack.enter_async_context(
                NginxCache(cache_config, refill_window=drain.refill_window)
            )
            local.append(NginxTarget(cache, rule, cache_config.name or f"nginx-{number}"))
        for number, http_config in enumerate(drain.http_purge, start=1):
            name = http_config.name or f"http-{number}"
            purger = HttpPurger(http_config, name=name, scope_rule=rule)
            local.append(await stack.enter_async_context(purger))
        cdn: list[Target] = []
        window = 0.0
        busy_for = None
        batch_size = 4096
        if drain.cloudflare:
            target = await stack.enter_async_context(
                CloudflareForwarder(drain.cloudflare, scope_rule=rule)
            )
            window = target.batch_window
            busy_for = target.busy_for
            batch_size = _cdn_batch_size(drain.cloudflare)
            cdn.append(target)
        _settle_collector()
        yield Drain(
            drain,
            redis=redis,
            redis_url=redis_url,
            keys=Keys(settings.namespace),
            admins=frozenset(user_key(name) for name in settings.server.admins),
            local_targets=local,
            cdn_targets=cdn,
            cdn_batch_window=window,
            receipts_max_len=settings.topics.max_len,
            receipts_retention=settings.topics.retention,
            cdn_busy_for=busy_for,
            cdn_batch_size=batch_size,
        )


# Allocations between young collections (Python's default: 700).
_GC_YOUNG_THRESHOLD = 50_000


def _settle_collector() -> None:
    """Keep Python's cycle collector from walking the drain's long-lived state per purge.

    What start-up built (the nginx index above all: a few objects per cache file) lives as
    long as the drain: frozen, the collector no longer walks it at every full collection
    (those walks took 32 of 157 us per url: purge with a 20,000-file index). What a busy
    drain holds for seconds (its read-ahead, the refill windows: hundreds of thousands of
    objects) was still walked every few batches, 31 us per purge through 100,000 purges:
    young collections every 50,000 allocations instead of 700 make that 6 us. Nothing is
    leaked: reference counting frees what is no longer used, frozen or not; the collector
    is only for cycles, which the drain's state does not form, and start-up's garbage
    cycles are collected first so none is frozen with the rest.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, older, oldest)


def _cdn_batch_size(zones: Sequence[CloudflareZoneConfig]) -> int:
    """Purges per cdn batch: what the slowest zone's plan purges by URL in
    ``_CDN_BATCH_SECONDS``, and at least one full call."""
    limits = [PLAN_LIMITS[zone.plan] for zone in zones]
    per_call = max(plan.files_per_call for plan in limits)
    return max(per_call, int(min(plan.urls_per_second for plan in limits) * _CDN_BATCH_SECONDS))
