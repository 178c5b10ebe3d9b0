"""Prometheus metrics: what an operator graphs and alerts on.

Event counts and latency histograms are module-level instruments that the code paths update
as things happen. Gauges that describe current state (connections, subscribers, group lag,
rate-limit tokens, nginx index size and keys the key template cannot read) are read from the
running node at scrape time by a :class:`NodeCollector`, so nothing has to remember to keep
them current.

Label cardinality is bounded: no per-message, per-user or per-URL labels; topics are
labelled by :func:`topic_label`, which folds per-user topics (``alice/…``) into their first
segment and stops adding new labels after ``_MAX_TOPIC_LABELS``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from drainbus.config import parse_listen
from drainbus.drain.target_stats import CloudflareStats, NginxStats
from drainbus.errors import StartupError

if TYPE_CHECKING:
    from drainbus.bus.fanout import Batch, Fanout
    from drainbus.bus.persistence import Persistence
    from drainbus.drain.daemon import Drain
    from drainbus.ssh.server import FrontDoor

__all__ = [
    "DELIVERY_SECONDS",
    "MESSAGES_DELIVERED",
    "MESSAGES_PUBLISHED",
    "PUBLISH_REFUSED",
    "PUBLISH_SECONDS",
    "PURGE_SECONDS",
    "REGISTRY",
    "SESSIONS",
    "NodeCollector",
    "serve_metrics",
    "topic_label",
]

log = structlog.get_logger(__name__)

REGISTRY = CollectorRegistry()
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

SESSIONS = Counter(
    "drainbus_sessions", "SSH sessions ended, by command and exit code", ["command", "exit_code"],
    registry=REGISTRY,
)  # fmt: skip
MESSAGES_PUBLISHED = Counter(
    "drainbus_messages_published", "Messages stored by pub", ["topic"], registry=REGISTRY
)
MESSAGES_DELIVERED = Counter(
    "drainbus_messages_delivered", "Messages written to sub sessions", ["topic"], registry=REGISTRY
)
PUBLISH_SECONDS = Histogram(
    "drainbus_publish_seconds", "Time to store one batch of messages in Redis",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
PUBLISH_REFUSED = Counter(
    "drainbus_publish_refused", "Messages pub refused, by the limit they were over: rate, "
    "bytes, topics, memory", ["reason"], registry=REGISTRY,
)  # fmt: skip
DELIVERY_SECONDS = Histogram(
    "drainbus_delivery_seconds", "From a message's receipt to its write to a subscriber",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip
PURGE_SECONDS = Histogram(
    "drainbus_purge_seconds", "From a purge's receipt by the bus to its acknowledgement",
    ["role"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)  # fmt: skip

_MAX_TOPIC_LABELS = 100
_topic_labels: set[str] = set()
_topic_lock = threading.Lock()


def topic_label(topic: str) -> str:
    """A bounded label for ``topic``: ``alice/deploys`` -> ``alice/*``; ``other`` past 100."""
    label = topic.split("/", 1)[0] + "/*" if "/" in topic else topic
    with _topic_lock:
        if label in _topic_labels:
            return label
        if len(_topic_labels) >= _MAX_TOPIC_LABELS:
            return "other"
        _topic_labels.add(label)
        return label


def record_deliveries(batch: Batch, sessions: int, messages: int) -> None:
    """``batch`` was written to ``sessions`` sub sessions, ``messages`` in all.

    Its delay (first entry's receipt to now) is observed once for those sessions: they were
    written in one go, and observing per session cost a tenth of the fan-out's time.
    """
    MESSAGES_DELIVERED.labels(topic_label(batch.topic)).inc(messages)
    DELIVERY_SECONDS.observe(max(0.0, time.time() - batch.entries[0].received_ms / 1000))


class NodeCollector(Collector):
    """Reads a running node's current state at scrape time: its front door and fan-out (a
    bus node), its drain (a drain node), or both."""

    def __init__(
        self,
        name: str,
        *,
        door: FrontDoor | None = None,
        fanout: Fanout | None = None,
        drain: Drain | None = None,
        persistence: Persistence | None = None,
    ) -> None:
        self._name = name
        self._door = door
        self._fanout = fanout
        self._drain = drain
        self._persistence = persistence

    def collect(self) -> Iterator[Metric]:
        name = self._name
        if self._door is not None:
            yield _gauge("drainbus_connections", "Logged-in SSH connections", name,
                         self._door.connections)  # fmt: skip
            yield _gauge("drainbus_connections_starting", "SSH connections still logging in",
                         name, self._door.startups)  # fmt: skip
            # The limit beside the count: an alert on their ratio needs no copy of the config.
            yield _gauge("drainbus_connections_max", "server.max_connections of this process",
                         name, self._door.settings.server.max_connections)  # fmt: skip
        if self._fanout is not None:
            yield from _fanout_metrics(self._fanout, name)
        if self._drain is not None:
            yield from _drain_metrics(self._drain, name)
        if self._persistence is not None:
            yield _gauge("drainbus_persistence_ok", "1 while Redis reports no persistence write "
                         "error (AOF write, RDB save), else 0: pub then exits 75", name,
                         int(self._persistence.state.ok))  # fmt: skip


def _fanout_metrics(fanout: Fanout, name: str) -> Iterator[Metric]:
    subscribers = GaugeMetricFamily(
        "drainbus_subscribers", "Live sub sessions on this node", labels=["node", "topic"]
    )
    per_label: dict[str, int] = {}
    for topic, count in fanout.subscriber_counts().items():
        label = topic_label(topic)
        per_label[label] = per_label.get(label, 0) + count
    for label, count in per_label.items():
        subscribers.add_metric([name, label], count)
    yield subscribers
    yield _counter(
        "drainbus_subscribers_lagged",
        "Times a subscriber overflowed its inbox and caught up from the stream",
        name,
        fanout.lagged,
    )


def _drain_metrics(drain: Drain, name: str) -> Iterator[Metric]:
    stats = drain.stats
    purges = CounterMetricFamily(
        "drainbus_purges", "Purges carried out, by kind", labels=["node", "kind"]
    )
    for kind, count in stats.by_kind.items():
        purges.add_metric([name, kind], count)
    yield purges
    yield _counter("drainbus_dead_letters", "Entries moved to the dead-letter stream", name,
                   stats.dead_lettered)  # fmt: skip
    yield _counter("drainbus_drain_retries", "Entries delivered again after a failure", name,
                   stats.retries)  # fmt: skip
    yield _counter("drainbus_drain_flushes", "Full local flushes after missed purges", name,
                   stats.flushes)  # fmt: skip
    lag = GaugeMetricFamily("drainbus_group_lag", "Entries not yet read by a consumer group",
                            labels=["node", "group"])  # fmt: skip
    pending = GaugeMetricFamily("drainbus_group_pending", "Entries read but not acknowledged",
                                labels=["node", "group"])  # fmt: skip
    for group, (group_lag, group_pending) in stats.groups.items():
        if group_lag is not None:
            lag.add_metric([name, group], group_lag)
        pending.add_metric([name, group], group_pending)
    yield lag
    yield pending
    yield from _target_metrics(drain, name)


def _target_metrics(drain: Drain, name: str) -> Iterator[Metric]:
    """Each target's figures, by the type of its stats (an HTTP-purge cache has none here)."""
    evicted = CounterMetricFamily("drainbus_objects_evicted", "nginx cache objects removed",
                                  labels=["node", "target"])  # fmt: skip
    refills = CounterMetricFamily("drainbus_nginx_refills_evicted",
                                  "Stale copies written back after a purge, then evicted",
                                  labels=["node", "target"])  # fmt: skip
    index = GaugeMetricFamily("drainbus_nginx_index_objects", "Objects in the nginx cache index",
                              labels=["node", "target"])  # fmt: skip
    unmatched = GaugeMetricFamily(
        "drainbus_nginx_unmatched_keys",
        "Indexed nginx cache files whose key the key template cannot read",
        labels=["node", "target"],
    )
    calls = CounterMetricFamily("drainbus_cloudflare_calls", "Cloudflare API calls by outcome",
                                labels=["node", "outcome"])  # fmt: skip
    tokens = GaugeMetricFamily("drainbus_cloudflare_tokens", "Rate-limit tokens left locally",
                               labels=["node", "account"])  # fmt: skip
    for target in drain.all_targets:
        match target.stats():
            case NginxStats() as stats:
                evicted.add_metric([name, target.name], stats.evicted)
                index.add_metric([name, target.name], stats.indexed)
                unmatched.add_metric([name, target.name], stats.unmatched_keys)
                refills.add_metric([name, target.name], stats.refills_evicted)
            case CloudflareStats() as stats:
                for outcome, count in stats.calls.items():
                    calls.add_metric([name, outcome], count)
                for account, left in stats.tokens_left.items():
                    tokens.add_metric([name, account], round(left, 2))
                yield _counter("drainbus_cloudflare_rate_limited", "Cloudflare 429 answers",
                               name, stats.rate_limited)  # fmt: skip
                yield _counter("drainbus_cloudflare_retries", "Cloudflare calls retried", name,
                               stats.retries)  # fmt: skip
    yield from (evicted, refills, index, unmatched, calls, tokens)


def _gauge(metric: str, documentation: str, node: str, value: float) -> Metric:
    family = GaugeMetricFamily(metric, documentation, labels=["node"])
    family.add_metric([node], value)
    return family


def _counter(metric: str, documentation: str, node: str, value: float) -> Metric:
    family = CounterMetricFamily(metric, documentation, labels=["node"])
    family.add_metric([node], value)
    return family


@contextmanager
def serve_metrics(listen: str | None, collector: NodeCollector) -> Iterator[int | None]:
    """Serve ``/metrics`` on ``listen`` (HOST:PORT) from a thread while the block runs.

    Yields the bound port (None when ``listen`` is None: metrics are off). Raises
    StartupError when the address cannot be bound.
    """
    if listen is None:
        yield None
        return
    host, port = parse_listen(listen)
    try:
        server, thread = start_http_server(port, host, registry=REGISTRY)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    REGISTRY.register(collector)
    bound = int(server.server_address[1])
    log.info("metrics_listening", listen=f"{host}:{bound}")
    try:
        yield bound
    finally:
        REGISTRY.unregister(collector)
        server.shutdown()
        server.server_close()
        thread.join(5)
