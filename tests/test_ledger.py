"""Where each drain entry ends, in Redis: acknowledged, left pending with its error, or
dead-lettered, its receipt written first."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from redis.asyncio import Redis
from structlog.testing import capture_logs

from drainbus.bus.streams import Keys, Row
from drainbus.drain import ledger as ledger_module
from drainbus.drain.dead_letters import list_dead_letters
from drainbus.drain.fair import FairBacklog
from drainbus.drain.ledger import Ledger
from drainbus.drain.purges import Purge, parse_purge
from drainbus.drain.receipt_writer import ReceiptWriter
from drainbus.drain.receipts import receipts_of, receipts_topic, target_part
from drainbus.drain.retry import DONE, Outcome
from drainbus.drain.roles import DrainStats, Role

TOPIC = "cache-drain"


@dataclass
class Setup:
    redis: Redis
    keys: Keys
    ledger: Ledger
    stats: DrainStats
    role: Role

    @property
    def stream(self) -> str:
        return self.keys.stream(TOPIC)

    async def delivered(self, *lines: str, user: str = "root") -> list[Row]:
        """Publish ``lines`` and deliver them to web1 in the role's group: pending there."""
        for line in lines:
            await self.redis.xadd(self.stream, {"d": line, "u": user, "m": line})
        reply: Any = await self.redis.xreadgroup(
            self.role.group, "web1", {self.stream: ">"}, count=100
        )
        return [(bytes(i), dict(f)) for i, f in reply[0][1]]

    async def pending(self) -> list[bytes]:
        rows: Any = await self.redis.xpending_range(self.stream, self.role.group, "-", "+", 100)
        return [bytes(r["message_id"]) for r in rows]

    async def receipts(self) -> list[dict[str, Any]]:
        entries: Any = await self.redis.xrange(self.keys.stream(receipts_topic(TOPIC)))
        return [r for i, f in entries for r in receipts_of(i, f)]


@pytest.fixture
async def setup(redis: Redis, namespace: str) -> Setup:
    keys = Keys(namespace)
    stats = DrainStats()
    writer = ReceiptWriter(redis, keys.stream(receipts_topic(TOPIC)), max_len=1000, retention=3600)
    ledger = Ledger(redis, stream=keys.stream(TOPIC), dead_letters=keys.dead_letters(TOPIC),
                    receipts=writer, node="web1", stats=stats)  # fmt: skip
    role = Role("cdn", "cdn", [], FairBacklog(100))
    await redis.xgroup_create(keys.stream(TOPIC), "cdn", id="$", mkstream=True)
    return Setup(redis, keys, ledger, stats, role)


async def test_ack_acknowledges_and_forgets_the_last_error(setup: Setup) -> None:
    """Acknowledged entries leave the pending list and their remembered error; others stay."""
    rows = await setup.delivered("a", "b", "c")
    ids = [r[0] for r in rows]
    for entry_id in ids:
        setup.ledger.last_error[entry_id] = "HTTP 503"
    await setup.ledger.ack(setup.role, ids[:2])
    assert await setup.pending() == ids[2:]
    assert setup.ledger.last_error == {ids[2]: "HTTP 503"}
    assert setup.stats.entries_acked == 2


async def test_receipts_name_the_entry_its_publisher_this_node_and_role(setup: Setup) -> None:
    """One receipt per entry, with the parts given, in order; nothing is acknowledged."""
    rows = await setup.delivered("acme-blog", "tag:x", user="acme")
    parts = [target_part("cloudflare", "accepted", ms=1.0, reference="r1")]
    await setup.ledger.write_receipts(setup.role, [(row, parts) for row in rows])
    assert await setup.receipts() == [
        {"id": row[0].decode(), "purge": line, "user": "acme", "node": "web1", "role": "cdn",
         "targets": parts}
        for row, line in zip(rows, ["acme-blog", "tag:x"], strict=True)
    ]  # fmt: skip
    assert len(await setup.pending()) == 2


async def test_a_dead_letter_is_receipted_stored_and_acknowledged(
    setup: Setup, fresh_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry's fields go to the dead-letter stream with its id, group and error (cut at
    2,000 characters, as in its receipt); it is acknowledged and logged as an error."""
    monkeypatch.setattr(ledger_module, "log", structlog.get_logger("drainbus.drain.daemon"))
    row, kept = await setup.delivered("tag:doomed", "tag:kept", user="acme")
    setup.ledger.last_error[row[0]] = "HTTP 503"
    error = "refused: " + "x" * 3000
    before_ms = int(time.time() * 1000)
    with capture_logs() as logs:
        await setup.ledger.dead_letter(setup.role, row, error)
    [letter] = await list_dead_letters(setup.redis, setup.keys, TOPIC)
    assert (letter.origin_id, letter.group, letter.user, letter.data) == (
        row[0].decode(),
        "cdn",
        "acme",
        "tag:doomed",
    )
    assert letter.error == error[:2000]
    raw: Any = await setup.redis.xrange(setup.keys.dead_letters(TOPIC))
    assert before_ms <= int(raw[0][1][b"failed_at"]) <= int(time.time() * 1000)
    assert raw[0][1][b"m"] == b"tag:doomed"  # the entry's own fields are kept
    [receipt] = await setup.receipts()
    assert (receipt["id"], receipt["role"]) == (row[0].decode(), "cdn")
    assert receipt["targets"] == [target_part("(drain)", "dead-lettered", error=error[:2000])]
    assert await setup.pending() == [kept[0]]
    assert setup.ledger.last_error == {}
    assert (setup.stats.dead_lettered, setup.stats.last_error) == (1, error)
    assert [(e["event"], e["log_level"], e["group"], e["entry"], e["error"]) for e in logs] == [
        ("drain_dead_letter", "error", "cdn", row[0].decode(), error)
    ]


async def test_a_dead_letter_whose_receipt_was_written_gets_no_second(setup: Setup) -> None:
    """``receipt_written``: the batch's receipt already says dead-lettered; none is added."""
    [row] = await setup.delivered("tag:doomed")
    await setup.ledger.dead_letter(setup.role, row, "refused", receipt_written=True)
    assert await setup.receipts() == []
    assert [d.error for d in await list_dead_letters(setup.redis, setup.keys, TOPIC)] == ["refused"]
    assert await setup.pending() == []


async def test_settle_acks_done_dead_letters_refusals_and_leaves_failures_pending(
    setup: Setup, fresh_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per purge: done is acknowledged (unless acknowledged early, per call) and counted;
    permanent is dead-lettered at once with its error; retry_later stays pending with its
    error remembered, and the batch logs one warning for them all."""
    monkeypatch.setattr(ledger_module, "log", structlog.get_logger("drainbus.drain.daemon"))
    lines = [
        "tag:a",
        "tag:a",
        "url:http://h.example/early",
        "tag:bad",
        "host:h.example",
        '{"tags": ["m"], "urls": ["http://h.example/m"]}',
        "prefix:http://h.example/p",
    ]
    rows = await setup.delivered(*lines)
    batch: dict[Purge, list[Row]] = {}
    for line, row in zip(lines, rows, strict=True):
        batch.setdefault(parse_purge(line), []).append(row)
    outcomes = [
        Outcome("done", evicted=3),  # tag:a, twice
        DONE,  # acknowledged early
        Outcome("permanent", error="1014 bad tag"),
        Outcome("permanent"),
        Outcome("retry_later"),
        Outcome("retry_later", error="HTTP 503"),
    ]
    ids = [r[0] for r in rows]
    with capture_logs() as logs:
        acked, results, kinds = await setup.ledger.settle(
            setup.role, batch, outcomes, {1}, retry_after=7.5
        )
    assert acked == ids[:2]
    assert results == {"done": 2, "permanent": 2, "retry_later": 2}
    assert kinds == {"tag": 2, "url": 1, "host": 1, "mixed": 1, "prefix": 1}
    # Dead letters are acknowledged; settle only says which others to acknowledge.
    assert await setup.pending() == [*ids[:3], *ids[5:]]
    letters = await list_dead_letters(setup.redis, setup.keys, TOPIC)
    assert [(d.origin_id, d.error) for d in letters] == [
        (ids[3].decode(), "1014 bad tag"),
        (ids[4].decode(), "refused by the target"),
    ]
    assert await setup.receipts() == []  # the batch wrote them (receipt_written)
    assert setup.ledger.last_error == {ids[5]: "failed", ids[6]: "HTTP 503"}
    assert (setup.stats.purges_done, setup.stats.by_kind) == (2, {"tags": 1, "urls": 1})
    assert setup.stats.last_error == "HTTP 503"
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert warnings == [
        {"event": "drain_purge_retry_later", "log_level": "warning", "group": "cdn",
         "purges": 2, "entries": 2, "error": "failed", "retry_after": 7.5}
    ]  # fmt: skip
    debug = [e for e in logs if e["event"] == "drain_purge"]
    assert [(e["kind"], e["result"], e["entries"], e["evicted"], e["error"]) for e in debug] == [
        ("tag", "done", 2, 3, None),
        ("url", "done", 1, None, None),
        ("tag", "permanent", 1, None, "1014 bad tag"),
        ("host", "permanent", 1, None, None),
        ("mixed", "retry_later", 1, None, None),
        ("prefix", "retry_later", 1, None, "HTTP 503"),
    ]
    assert {e["group"] for e in debug} == {"cdn"}
    assert {e["log_level"] for e in debug} == {"debug"}


async def test_settle_with_everything_done_logs_no_warning(
    setup: Setup, fresh_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch carried out in full: every entry to acknowledge, nothing retried or logged."""
    monkeypatch.setattr(ledger_module, "log", structlog.get_logger("drainbus.drain.daemon"))
    rows = await setup.delivered("tag:a", "tag:b")
    batch = {parse_purge(f"tag:{t}"): [row] for t, row in zip("ab", rows, strict=True)}
    with capture_logs() as logs:
        acked, results, _ = await setup.ledger.settle(
            setup.role, batch, [DONE, DONE], set(), retry_after=1.0
        )
    assert (acked, results) == ([r[0] for r in rows], {"done": 2})
    assert [e for e in logs if e["log_level"] != "debug"] == []
    assert setup.stats.last_error is None
