"""Purge receipts: what each drain node did with each purge, for ``pub --wait`` and observers.

A purge is acknowledged when its targets ran; a receipt says what they found. Before a node
acknowledges a batch it appends one receipt per entry to the topic's receipt stream (a stream
of its own beside the topic's, trimmed like it, read through the same fan-out as a topic), so
a crash cannot lose the receipt of an acknowledged purge. A receipt is JSON::

    {"id": "1700000000000-0", "purge": "acme-blog", "user": "alice", "node": "web1",
     "role": "local", "targets": [{"target": "pages", "result": "evicted", "count": 14,
     "ms": 2.1, "error": null, "reference": null}]}

A stale copy that nginx writes back within the refill window after a purge (see
:mod:`drainbus.drain.refill`) and that the node then evicts gets a receipt of its own, later,
marked ``"refill": true`` (``pub --wait`` does not wait for those).

``result`` is one of :data:`RESULTS`: ``evicted`` (a cache removed ``count`` objects),
``none-cached`` (it held none of them), ``accepted`` (a CDN or HTTP cache took the request; it
cannot say more), ``dead-lettered`` (refused for good) or ``failed`` (a transient failure:
the purge is delivered again, and a later receipt follows).

:class:`ReceiptWait` is what ``pub --wait`` does with them: which receipts the live drain
nodes owe, which have arrived, and the lines to print.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Entry, Keys, StreamId, format_id, text
from drainbus.drain.retry import Outcome

__all__ = [
    "FINAL_RESULTS",
    "RESULTS",
    "DrainNode",
    "ReceiptWait",
    "Result",
    "answered_by",
    "live_drain_nodes",
    "receipt",
    "receipts_of",
    "receipts_topic",
    "render_line",
    "result_of",
    "target_part",
    "target_receipt",
]

Result = Literal["evicted", "none-cached", "accepted", "dead-lettered", "failed"]
RESULTS: Final = ("evicted", "none-cached", "accepted", "dead-lettered", "failed")
#: Results after which nothing more will happen to the purge on that node.
FINAL_RESULTS: Final = frozenset({"evicted", "none-cached", "accepted", "dead-lettered"})


def receipts_topic(topic: str) -> str:
    """The internal topic name of ``topic``'s receipts.

    ``#`` cannot occur in a topic name (see :func:`drainbus.acl.check_topic_name`), so no user
    can publish to it; the fan-out reads it like any topic (``Keys.stream`` of this name).
    """
    return f"{topic}#receipts"


def receipts_of(entry_id: bytes, fields: Mapping[bytes, bytes]) -> list[dict[str, Any]]:
    """The receipts one entry of a receipt stream holds, as redis-py returns the entry: a
    batch's receipts share an entry (see :mod:`drainbus.drain.receipt_writer`)."""
    return [json.loads(m) for m in Entry.from_redis(entry_id, dict(fields)).messages()]


def result_of(outcome: Outcome) -> Result:
    """The receipt result of one target's outcome for one purge."""
    if outcome.status == "permanent":
        return "dead-lettered"
    if outcome.status == "retry_later":
        return "failed"
    if outcome.evicted is None:
        return "accepted"
    return "evicted" if outcome.evicted > 0 else "none-cached"


def target_part(
    target: str,
    result: Result,
    *,
    count: int | None = None,
    ms: float | None = None,
    error: str | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """One target's part of a receipt: what ``target`` did with the purge."""
    return {"target": target, "result": result, "count": count,
            "ms": None if ms is None else round(ms, 1), "error": error,
            "reference": reference}  # fmt: skip


def target_receipt(target: str, outcome: Outcome, ms: float) -> dict[str, Any]:
    """One target's part of a receipt, from its outcome and how long the target took."""
    return target_part(target, result_of(outcome), count=outcome.evicted, ms=ms,
                       error=outcome.error, reference=outcome.reference)  # fmt: skip


def receipt(
    *,
    entry_id: bytes | str,
    fields: Mapping[bytes, bytes],
    node: str,
    role: str,
    targets: Sequence[Mapping[str, Any]],
    refill: bool = False,
) -> dict[str, Any]:
    """The receipt of stream entry ``entry_id`` (its raw ``fields``) on ``node``; ``refill``
    marks the later receipt of a stale refill evicted in the purge's refill window."""
    record: dict[str, Any] = {
        "id": text(entry_id),
        "purge": fields.get(b"d", b"").decode("utf-8", "replace"),
        "user": fields.get(b"u", b"").decode("utf-8", "replace"),
        "node": node,
        "role": role,
        "targets": list(targets),
    }
    if refill:
        record["refill"] = True
    return record


@dataclass(frozen=True)
class DrainNode:
    """A drain node whose status heartbeat is fresh: its name and the roles it runs."""

    name: str
    roles: frozenset[str]
    local_targets: tuple[str, ...] = ()
    cdn_targets: tuple[str, ...] = ()


async def live_drain_nodes(redis: RedisClient, keys: Keys) -> list[DrainNode]:
    """The drain nodes whose status has not expired (see ``Drain._publish_status``)."""
    now_ms = int(time.time() * 1000)
    names = cast(list[bytes], await redis.zrangebyscore(keys.drain_nodes, now_ms - 120_000, "+inf"))
    if not names:
        return []
    statuses = await redis.mget([keys.drain_status(text(name)) for name in names])
    nodes = []
    for raw in statuses:
        if raw is None:  # expired: the node stopped refreshing it
            continue
        status = json.loads(raw)
        nodes.append(
            DrainNode(
                status["node"],
                frozenset(status.get("roles", ())),
                tuple(status.get("local_targets", ())),
                tuple(status.get("cdn_targets", ())),
            )
        )
    return sorted(nodes, key=lambda n: n.name)


def _count_text(part: Mapping[str, Any]) -> str:
    count = part.get("count")
    noun = "object" if count == 1 else "objects"
    return f"{count} {noun}"


def answered_by(record: Mapping[str, Any]) -> str:
    """Who a receipt is from, as lines name it: the node, or ``cdn`` for the shared group."""
    return "cdn" if record.get("role") == "cdn" else str(record.get("node"))


def render_line(record: Mapping[str, Any], part: Mapping[str, Any]) -> str:
    """One human line for one target's part of a receipt (no purge text, no newline)."""
    where = answered_by(record)
    target, result, ms = part.get("target"), part.get("result"), part.get("ms")
    head = f"{where} {target}"
    if record.get("refill"):
        return f"{head}: {_count_text(part)} written back by a request in flight, evicted again"
    if result == "evicted":
        return f"{head}: {_count_text(part)} evicted in {ms:g} ms"
    if result == "none-cached":
        return f"{head}: 0 objects (none cached)"
    if result == "accepted":
        reference = part.get("reference")
        ref = f", purge id {reference}" if reference else ""
        return f"{head}: accepted{ref}, {ms:g} ms"
    if result == "dead-lettered":
        return f"{head}: dead-lettered: {part.get('error') or 'refused'}"
    return f"{head}: not confirmed: {part.get('error') or 'unknown error'}"


@dataclass
class _Owed:
    """One receipt a publisher waits for: the purge ``entry`` from ``node`` (or the CDN)."""

    entry: str
    purge: str
    node: str  # "cdn" for the shared CDN group
    targets: tuple[str, ...]
    record: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        return self.record is not None and all(
            part.get("result") in FINAL_RESULTS for part in self.record["targets"]
        )


@dataclass
class ReceiptWait:
    """The receipts owed for some purges by the live drain nodes, as they arrive.

    Every node running the ``local`` role owes one receipt per purge; the ``cdn`` group owes
    one (from whichever node carried it out) if any live node runs it.
    """

    owed: dict[tuple[str, str], _Owed] = field(default_factory=dict)

    @classmethod
    def for_purges(
        cls, purges: Sequence[tuple[StreamId, str]], nodes: Iterable[DrainNode]
    ) -> ReceiptWait:
        """What ``nodes`` owe for ``purges`` (stream id and purge text each)."""
        wait = cls()
        nodes = list(nodes)
        cdn = next((n for n in nodes if "cdn" in n.roles), None)
        for entry_id, purge in purges:
            entry = format_id(entry_id)
            for node in nodes:
                if "local" in node.roles:
                    wait.owed[entry, node.name] = _Owed(entry, purge, node.name, node.local_targets)
            if cdn is not None:
                wait.owed[entry, "cdn"] = _Owed(entry, purge, "cdn", cdn.cdn_targets)
        return wait

    def add(self, record: Mapping[str, Any]) -> bool:
        """Take one receipt; True if it was owed (a later one replaces an earlier one)."""
        if record.get("refill"):  # later news, not the answer being waited for
            return False
        node = answered_by(record)
        owed = self.owed.get((str(record.get("id")), node))
        if owed is None:
            return False
        owed.record = dict(record)
        return True

    @property
    def complete(self) -> bool:
        """True once every owed receipt arrived with a final result on every target."""
        return all(owed.final for owed in self.owed.values())

    @property
    def ok(self) -> bool:
        """True if complete and nothing was dead-lettered."""
        return self.complete and not any(
            part.get("result") == "dead-lettered"
            for owed in self.owed.values()
            for part in (owed.record or {}).get("targets", ())
        )

    def report(self, *, as_json: bool, waited: float) -> list[str]:
        """The lines to print: one per purge, node and target (JSON objects with ``as_json``).

        A node that did not answer gets one line per target it has, saying so.
        """
        several = len({owed.entry for owed in self.owed.values()}) > 1
        lines = []
        for owed in self.owed.values():
            parts = list((owed.record or {}).get("targets", ()))
            record = owed.record or {"node": owed.node, "role": "cdn" if owed.node == "cdn" else ""}
            if not owed.final:
                answered = {p.get("target") for p in parts if p.get("result") in FINAL_RESULTS}
                silent = [t for t in owed.targets if t not in answered] or ["(all targets)"]
                known = {p.get("target"): p for p in parts}
                parts = [p for p in parts if p.get("target") in answered]
                for target in silent:
                    last = known.get(target)
                    error = (
                        f"no answer within {waited:g} s; the purge stays stored and will be retried"
                    )
                    if last is not None and last.get("error"):
                        error = f"last try failed ({last['error']}); it will be retried"
                    parts.append(target_part(target, "failed", error=error))
            for part in parts:
                if as_json:
                    lines.append(
                        json.dumps(
                            {
                                "id": owed.entry,
                                "purge": owed.purge,
                                "node": owed.node,
                                "target": part.get("target"),
                                "result": part.get("result"),
                                "count": part.get("count"),
                                "ms": part.get("ms"),
                                "error": part.get("error"),
                            }
                        )
                    )
                else:
                    line = render_line(record, part)
                    lines.append(f"{owed.purge}: {line}" if several else line)
        return lines
