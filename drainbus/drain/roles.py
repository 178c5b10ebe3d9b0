"""The drain's roles and counters: one consumer group per role, and what it carries out.

A node has up to two roles (see :mod:`drainbus.drain.daemon`): ``local`` (its own group,
its own caches) and ``cdn`` (the shared group, Cloudflare). :class:`DrainStats` is what an
operator reads of a drain (``ssh bus stats``, the metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drainbus.bus.streams import Row
from drainbus.drain.fair import FairBacklog
from drainbus.drain.purges import Purge
from drainbus.drain.targets import Target

__all__ = ["GATHER_MAX", "READ_COUNT", "DrainStats", "Role", "never_busy", "purge_kind", "rows_of"]

# A local batch holds up to this many entries: each target gets the whole batch in one
# call, and one XACK acknowledges it. Also the page size of reads of pending entries.
READ_COUNT = 1000
# A local batch while several publishers wait: a purge that just got its turn is carried out
# after a quarter of a batch's work, not a whole one (the batch's receipts come at its end).
SHARED_BATCH = 250
# At most this many entries join one cdn batch; a backlog is read on in the next one.
GATHER_MAX = 4096


@dataclass
class Role:
    """One consumer group and the targets its entries are carried out on.

    ``busy_for`` (set for the cdn role) says how many seconds until the targets' rate limit
    has room for a call, 0 if it has room now; a role with it gathers every entry already
    waiting into each batch. ``batch_window`` is the longest, in seconds, the loop waits
    after a batch for that room before reading the next one (0: never waits).
    """

    name: str
    group: str
    targets: Sequence[Target]
    backlog: FairBacklog
    batch_size: int = READ_COUNT
    shared_batch_size: int = SHARED_BATCH
    batch_window: float = 0.0
    busy_for: Callable[[], float] | None = None
    flush_if_missed: bool = False
    # Set once a gap of missed purges was acted on; cleared by the next read, which jumps
    # the gap (until then every check would see the same gap again).
    gap_handled: bool = False

    def room_in(self, most: float) -> float:
        """How long to wait after a batch, at most ``most`` seconds, for the rate limit to
        have room for a call: the next call could not leave sooner, and what arrives
        meanwhile joins it. 0 for a role without a rate limit or batch window."""
        # (`< 0` would do: the min below is 0 for a window of 0; this skips asking busy_for.)
        if self.busy_for is None or self.batch_window <= 0:
            return 0.0
        return max(0.0, min(self.busy_for(), self.batch_window, most))


@dataclass
class DrainStats:
    """Counters an operator (``ls``, metrics) can read."""

    purges_done: int = 0
    entries_acked: int = 0
    dead_lettered: int = 0
    retries: int = 0
    flushes: int = 0
    last_purge_ms: int | None = None
    last_error: str | None = None
    by_kind: dict[str, int] = field(default_factory=dict)
    groups: dict[str, tuple[int | None, int]] = field(default_factory=dict)  # lag, pending

    def count(self, purge: Purge) -> None:
        """Count one purge carried out, by kind."""
        self.purges_done += 1
        for kind in ("keys", "tags", "urls", "prefixes", "hosts"):
            if getattr(purge, kind):
                self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if purge.everything:
            self.by_kind["everything"] = self.by_kind.get("everything", 0) + 1


_KINDS = ("urls", "tags", "keys", "prefixes", "hosts")


def purge_kind(purge: Purge) -> str:
    """The purge's kind for the batch log: ``url``, ``tag``, …, ``everything`` or ``mixed``."""
    if purge.everything:
        return "everything"
    kinds = [
        kind[:-1] if kind != "prefixes" else "prefix" for kind in _KINDS if getattr(purge, kind)
    ]
    return kinds[0] if len(kinds) == 1 else "mixed"


def never_busy() -> float:
    return 0.0


def rows_of(reply: Any) -> list[Row]:
    """The entries of an XREADGROUP reply, without those trimmed since (no fields)."""
    rows: list[Row] = []
    for _key, entries in reply or ():
        rows += [(i, f) for i, f in entries if f]  # no fields: {} from redis-py, or None
    return rows
