"""Every cache target behind one small interface, so the daemon treats them alike.

A target takes a batch of distinct purges and returns one :class:`Outcome` per purge:
``done`` (carried out), ``permanent`` (will never succeed: dead-letter it) or
``retry_later`` (leave it pending; it is delivered again).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from drainbus.drain.cloudflare import CloudflareForwarder
from drainbus.drain.http_purge import HttpPurger
from drainbus.drain.nginx import NginxCache
from drainbus.drain.purges import Purge, ScopeRule, key_host_for
from drainbus.drain.retry import OnSettled, Outcome
from drainbus.errors import DrainbusError

__all__ = ["CloudflareTarget", "HttpPurgeTarget", "LocalCacheTarget", "NginxTarget", "Target"]

log = structlog.get_logger(__name__)


class Target(Protocol):
    """What the daemon needs of a target."""

    name: str

    async def apply(self, purges: Sequence[Purge]) -> list[Outcome]:
        """Carry out ``purges``; one outcome each, in order."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Counters for metrics and ``ssh bus stats``."""
        ...


class LocalCacheTarget(Target, Protocol):
    """A cache on this node, which can also be emptied entirely."""

    async def flush_all(self) -> int:
        """Remove every object; return how many were removed."""
        ...


class NginxTarget:
    """One nginx ``proxy_cache`` folder on this node."""

    def __init__(self, cache: NginxCache, rule: ScopeRule, name: str) -> None:
        self.cache = cache
        self.name = name
        self._rule = rule
        self.evicted = 0

    def watch_refills(self, listener: Callable[[str, Purge, int], None]) -> None:
        """Call ``listener(target name, purge, count)`` for each stale refill evicted later."""
        self.cache.refill_guard.on_evicted = lambda purge, count: listener(self.name, purge, count)

    async def apply(self, purges: Sequence[Purge]) -> list[Outcome]:
        """Carry out the whole batch in one call of the cache (one index sync, one trip to
        worker threads); a purge that fails is retried later without holding back the rest.
        """
        key_hosts = [[h for k in p.keys if (h := key_host_for(self._rule, k))] for p in purges]
        try:
            results = await self.cache.purge_batch(purges, key_hosts)
        except (DrainbusError, OSError) as exc:
            log.warning("nginx_purge_failed", target=self.name, purges=len(purges), error=str(exc))
            return [Outcome("retry_later", f"{self.name}: {exc}")] * len(purges)
        outcomes = []
        for result in results:
            if isinstance(result, Exception):
                log.warning("nginx_purge_failed", target=self.name, error=str(result))
                outcomes.append(Outcome("retry_later", f"{self.name}: {result}"))
                continue
            self.evicted += result
            outcomes.append(Outcome("done", evicted=result))
        return outcomes

    async def flush_all(self) -> int:
        removed = await self.cache.flush_all()
        self.evicted += removed
        return removed

    def snapshot(self) -> dict[str, Any]:
        index = self.cache.index
        # unmatched_keys: indexed files the key template cannot read, which host and prefix
        # purges cannot find; above 0, the key setting disagrees with nginx's.
        return {
            "evicted": self.evicted,
            "refills_evicted": self.cache.refills_evicted,
            "indexed": len(index),
            "unmatched_keys": index.unmatched_keys,
        }


class HttpPurgeTarget:
    """An HTTP PURGE/BAN cache (Varnish, Souin, Caddy, ngx_cache_purge)."""

    def __init__(self, purger: HttpPurger, name: str) -> None:
        self.purger = purger
        self.name = name

    async def apply(self, purges: Sequence[Purge]) -> list[Outcome]:
        return await self.purger.forward(purges)

    def snapshot(self) -> dict[str, Any]:
        stats = self.purger.stats()
        return {"requests": dict(stats.requests), "retries": stats.retries,
                "skipped": stats.skipped, "last_error": stats.last_error}  # fmt: skip

    async def flush_all(self) -> int:
        """Send the configured everything-purge; the cache does not say how many it held."""
        outcome = (await self.purger.forward([Purge(everything=True)]))[0]
        if outcome.status != "done":
            raise DrainbusError(f"{self.name}: flush failed: {outcome.error}")
        return 0


class CloudflareTarget:
    """Cloudflare's purge API for the configured zones."""

    def __init__(self, forwarder: CloudflareForwarder) -> None:
        self.forwarder = forwarder
        self.name = "cloudflare"

    @property
    def batch_window(self) -> float:
        """The longest to wait, after a batch, for the rate limit to have room (seconds)."""
        return self.forwarder.batch_window

    def busy_for(self) -> float:
        """Seconds until the rate limit has room for a call; 0 if it has room now."""
        return self.forwarder.busy_for()

    async def apply(
        self, purges: Sequence[Purge], on_settled: OnSettled | None = None
    ) -> list[Outcome]:
        """Carry out ``purges``; ``on_settled`` hears of each purge once its calls are done."""
        return await self.forwarder.forward(purges, on_settled)

    def snapshot(self) -> dict[str, Any]:
        stats = self.forwarder.stats()
        return {
            "calls": dict(stats.calls),
            "rate_limited": stats.rate_limited,
            "retries": stats.retries,
            "tokens_left": {k: round(v, 2) for k, v in stats.tokens_left.items()},
            "last_error": stats.last_error,
        }
