"""The counters each kind of cache target reports, one frozen dataclass per kind.

A leaf module (standard library only), so :mod:`drainbus.metrics` can dispatch on the stats
type without importing the targets, and the targets can share the types without importing
each other. ``as_dict()`` is the form ``ssh bus stats`` shows and the drain status stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CloudflareStats", "HttpPurgeStats", "NginxStats", "TargetStats"]


@dataclass(frozen=True, slots=True)
class NginxStats:
    """An nginx target's counters: objects ``evicted``, stale ``refills_evicted``, files in
    the index (``indexed``), and ``unmatched_keys``: indexed files the key template cannot
    read, which host and prefix purges cannot find; above 0, the key setting disagrees with
    nginx's."""

    evicted: int
    refills_evicted: int
    indexed: int
    unmatched_keys: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class HttpPurgeStats:
    """A snapshot of a purger's counters: ``requests`` by final outcome, ``retries``,
    ``skipped`` purge parts no template expresses, and the ``last_error``."""

    requests: Mapping[str, int]
    retries: int
    skipped: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class CloudflareStats:
    """A snapshot of a forwarder's counters since it was created.

    ``calls`` counts API calls by final outcome (``done``, ``permanent``, ``retry_later``);
    ``rate_limited`` counts 429 responses; ``retries`` counts retried attempts;
    ``tokens_left`` and ``url_tokens_left`` are the local buckets per account label;
    ``unrouted`` counts purge parts no zone serves; ``last_error`` is the latest failure.
    """

    calls: Mapping[str, int]
    rate_limited: int
    retries: int
    tokens_left: Mapping[str, float]
    url_tokens_left: Mapping[str, float]
    unrouted: int
    last_error: str | None

    def as_dict(self) -> dict[str, Any]:
        """The figures ``ssh bus stats`` has always shown (URL buckets and unrouted parts
        are for tests and logs)."""
        return {
            "calls": dict(self.calls),
            "rate_limited": self.rate_limited,
            "retries": self.retries,
            "tokens_left": {k: round(v, 2) for k, v in self.tokens_left.items()},
            "last_error": self.last_error,
        }


#: What :meth:`drainbus.drain.targets.Target.stats` returns.
TargetStats = NginxStats | HttpPurgeStats | CloudflareStats
