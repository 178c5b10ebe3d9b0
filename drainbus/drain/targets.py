"""Every cache target behind one small interface, so the daemon treats them alike.

A target takes a batch of distinct purges and returns one :class:`Outcome` per purge:
``done`` (carried out), ``permanent`` (will never succeed: dead-letter it) or
``retry_later`` (leave it pending; it is delivered again). Its :meth:`Target.stats` are a
typed dataclass per kind (:mod:`drainbus.drain.target_stats`), which metrics dispatch on.

The HTTP purgers (:class:`~drainbus.drain.http_purge.HttpPurger`,
:class:`~drainbus.drain.cloudflare.CloudflareForwarder`) implement the protocol themselves;
nginx has a wrapper here because it adds behaviour the cache does not have (see
:class:`NginxTarget`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import structlog

from drainbus.drain.nginx import NginxCache
from drainbus.drain.purges import Purge, ScopeRule, key_host_for
from drainbus.drain.retry import Outcome
from drainbus.drain.target_stats import NginxStats, TargetStats
from drainbus.errors import DrainbusError

__all__ = ["LocalCacheTarget", "NginxTarget", "Target"]

log = structlog.get_logger(__name__)


class Target(Protocol):
    """What the daemon needs of a target."""

    name: str

    async def apply(self, purges: Sequence[Purge]) -> list[Outcome]:
        """Carry out ``purges``; one outcome each, in order."""
        ...

    def stats(self) -> TargetStats:
        """Typed counters, for metrics."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """The counters as ``ssh bus stats`` shows them (``stats().as_dict()``)."""
        ...


class LocalCacheTarget(Target, Protocol):
    """A cache on this node, which can also be emptied entirely."""

    async def flush_all(self) -> int:
        """Remove every object; return how many were removed."""
        ...


class NginxTarget:
    """One nginx ``proxy_cache`` folder on this node.

    Not a pass-through, so it stays apart from :class:`NginxCache`: it gives bare keys
    their host by the scope rule, turns the cache's errors into per-purge outcomes, counts
    evictions and routes the refill guard's evictions to the daemon's listener. The cache
    itself knows files and keys, not the bus.
    """

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

    def stats(self) -> NginxStats:
        index = self.cache.index
        return NginxStats(
            evicted=self.evicted,
            refills_evicted=self.cache.refills_evicted,
            indexed=len(index),
            unmatched_keys=index.unmatched_keys,
        )

    def snapshot(self) -> dict[str, Any]:
        return self.stats().as_dict()
