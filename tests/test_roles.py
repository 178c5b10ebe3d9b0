"""A drain role's wait for rate-limit room, the counters an operator reads, a reply's rows."""

from __future__ import annotations

from typing import Any

import pytest

from drainbus.drain.fair import FairBacklog
from drainbus.drain.purges import Purge
from drainbus.drain.roles import DrainStats, Role, never_busy, purge_kind, rows_of


def cdn_role(*, busy: float | None, window: float) -> Role:
    busy_for = None if busy is None else (lambda: busy)
    return Role("cdn", "cdn", [], FairBacklog(10), batch_window=window, busy_for=busy_for)


@pytest.mark.parametrize(
    ("busy", "window", "most", "wait"),
    [
        pytest.param(0.3, 0.5, 1.0, 0.3, id="until-the-rate-limit-has-room"),
        pytest.param(2.0, 0.5, 1.0, 0.5, id="at-most-the-batch-window"),
        pytest.param(2.0, 0.5, 0.2, 0.2, id="at-most-until-the-next-reclaim"),
        pytest.param(2.0, 0.5, -1.0, 0.0, id="reclaim-overdue"),
        pytest.param(0.0, 0.5, 1.0, 0.0, id="room-now"),
        pytest.param(2.0, 0.0, 1.0, 0.0, id="no-batch-window"),
        pytest.param(2.0, -1.0, 1.0, 0.0, id="negative-batch-window"),
        pytest.param(None, 0.5, 1.0, 0.0, id="no-rate-limit"),
    ],
)
def test_room_in_waits_for_the_rate_limit_within_its_bounds(
    busy: float | None, window: float, most: float, wait: float
) -> None:
    """How long after a batch the loop waits: until the rate limit has room, but never past
    the batch window or ``most``, never below 0, and never without both set."""
    assert cdn_role(busy=busy, window=window).room_in(most) == wait


def test_a_role_batches_a_thousand_entries_by_default() -> None:
    """Unless told otherwise: up to 1,000 entries a batch, 250 while several publishers wait,
    no batch window, no rate limit, no flush on missed purges, no gap handled yet."""
    role = Role("local", "node-web1", [], FairBacklog(10))
    assert (role.batch_size, role.shared_batch_size, role.batch_window) == (1000, 250, 0.0)
    assert (role.busy_for, role.flush_if_missed, role.gap_handled) == (None, False, False)
    assert never_busy() == 0.0


def test_purges_are_counted_by_kind() -> None:
    """Each purge counts once in all, and once under every kind it holds."""
    stats = DrainStats()
    for purge in (
        Purge(keys=frozenset({"a"}), tags=frozenset({"t"})),
        Purge(urls=frozenset({"http://h/x"})),
        Purge(urls=frozenset({"http://h/y"}), prefixes=frozenset({"http://h/p"})),
        Purge(hosts=frozenset({"h"})),
        Purge(everything=True),
        Purge(everything=True),
    ):
        stats.count(purge)
    assert stats.purges_done == 6
    assert stats.by_kind == {
        "keys": 1, "tags": 1, "urls": 2, "prefixes": 1, "hosts": 1, "everything": 2,
    }  # fmt: skip


def test_fresh_counters_are_zero_and_empty() -> None:
    """Nothing done yet: zero counts, no purge time, no error, no kinds, no groups."""
    stats = DrainStats()
    assert (stats.purges_done, stats.entries_acked, stats.dead_lettered) == (0, 0, 0)
    assert (stats.retries, stats.flushes) == (0, 0)
    assert (stats.last_purge_ms, stats.last_error, stats.by_kind, stats.groups) == (
        None, None, {}, {},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("purge", "kind"),
    [
        pytest.param(Purge(urls=frozenset({"http://h/x"})), "url", id="url"),
        pytest.param(Purge(tags=frozenset({"t"})), "tag", id="tag"),
        pytest.param(Purge(keys=frozenset({"k"})), "key", id="key"),
        pytest.param(Purge(prefixes=frozenset({"http://h/p"})), "prefix", id="prefix"),
        pytest.param(Purge(hosts=frozenset({"h"})), "host", id="host"),
        pytest.param(Purge(everything=True), "everything", id="everything"),
        pytest.param(Purge(tags=frozenset({"t"}), keys=frozenset({"k"})), "mixed", id="mixed"),
    ],
)
def test_purge_kind_names_the_one_kind_or_mixed(purge: Purge, kind: str) -> None:
    """The batch log's kind: the purge's one kind, singular, or ``mixed``."""
    assert purge_kind(purge) == kind


def test_rows_of_a_reply_skips_entries_without_fields() -> None:
    """Every stream's entries of an XREADGROUP reply, in order, without those that lost
    their fields; no reply (a timeout) is no rows."""
    reply: Any = [
        [b"s1", [(b"1-0", {b"d": b"a"}), (b"2-0", None), (b"3-0", {})]],
        [b"s2", [(b"4-0", {b"d": b"b"})]],
    ]
    assert rows_of(reply) == [(b"1-0", {b"d": b"a"}), (b"4-0", {b"d": b"b"})]
    assert rows_of(None) == []
    assert rows_of([]) == []
