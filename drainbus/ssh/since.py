"""``sub --since POS``: a position in a topic's history, as a user writes it.

Shared by ``sub`` and ``sub --durable`` (whose saved position is such a value).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import TypeAlias

from drainbus.bus.streams import MAX_SEQ, ZERO_ID, StreamId, parse_id
from drainbus.config import parse_duration
from drainbus.errors import UsageError

__all__ = ["Since", "parse_since"]

_STREAM_ID = re.compile(r"^(\d+(?:-\d+)?)(?::(\d+))?$")

Since: TypeAlias = tuple[StreamId, tuple[StreamId, int] | None]
"""Deliver entries after the id; then, inside the packed entry named, skip that many messages."""


def parse_since(value: str, *, now_ms: int | None = None) -> Since:
    """Turn ``--since`` into "deliver messages after this one".

    Accepts a stream id (``1700000000000-0``), a message inside a packed entry as ``sub
    --json`` shows it (``1700000000000-0:41``), a duration back from now (``30s``, ``10m``,
    ``2h``, ``7d``), an RFC 3339 time, or ``all``. Raises UsageError otherwise.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if value == "all":
        return ZERO_ID, None
    if found := _STREAM_ID.match(value):
        entry_id = parse_id(found[1])
        if max(entry_id) > MAX_SEQ:
            # Redis would refuse it on every read, and the session would wait forever.
            raise UsageError(
                f"--since '{value}' is not a stream id: MS and SEQ in MS-SEQ are each at "
                f"most {MAX_SEQ} (64 bits)"
            )
        if found[2] is None:
            return entry_id, None
        return _id_before(entry_id), (entry_id, int(found[2]) + 1)
    try:  # a bare number was taken as a stream id above: this is a duration with a unit
        seconds = parse_duration(value)
    except ValueError:
        pass
    else:
        return _just_before(now_ms - int(seconds * 1000)), None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is not None and moment.tzinfo is not None:
        return _just_before(int(moment.timestamp() * 1000)), None
    hint = " (add a time zone, e.g. Z)" if moment is not None else ""
    raise UsageError(
        f"--since '{value}' is not a stream id, a duration (30s, 10m, 2h, 7d), "
        f"an RFC 3339 time{hint} or 'all'"
    )


def _id_before(entry_id: StreamId) -> StreamId:
    ms, seq = entry_id
    return (ms, seq - 1) if seq > 0 else _just_before(ms)


def _just_before(ms: int) -> StreamId:
    return (ms - 1, MAX_SEQ) if ms > 0 else ZERO_ID
