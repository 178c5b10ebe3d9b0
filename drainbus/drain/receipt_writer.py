"""Appending receipts to a topic's receipt stream, trimmed like the topic.

The drain writes each entry's receipt (see :mod:`drainbus.drain.receipts`) before it
acknowledges the entry. A batch's receipts are *packed*, as ``pub`` packs a burst of lines
(see :mod:`drainbus.bus.streams`): up to :data:`_PER_ENTRY` JSON receipts joined by ``\n`` in
one stream entry, so a batch of 1,000 purges costs one XADD, not 1,000 (which took a quarter
of the drain's time per URL purge). Readers see each receipt as one message of the entry
(``Entry.messages``), ``sub --json`` ids included (``ID:INDEX``). JSON never holds a raw
newline, so the join is unambiguous.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from typing import Any, Final

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import entry_fields

__all__ = ["ReceiptWriter"]

_PER_ENTRY: Final = 1000  # receipts per stream entry (about 300 KB at most)
_TRIM_EVERY: Final = 30.0  # seconds between trims of the receipt stream by age


class ReceiptWriter:
    """Appends receipt records to ``stream``, keeping about ``max_len`` of them for at most
    ``retention`` seconds."""

    def __init__(self, redis: RedisClient, stream: str, *, max_len: int, retention: float) -> None:
        self._redis = redis
        self._stream = stream
        self._max_len = max_len
        self._retention_ms = int(retention * 1000)
        self._trimmed = 0.0  # monotonic time of the last trim by age (0 or 1: the first trims)
        # MAXLEN counts entries and an entry holds a batch's receipts: the stream is trimmed
        # to max_len / (receipts per entry, a running mean) entries, about max_len receipts.
        # A running mean's start and weight (1.0, / 8) set how fast it follows, not where.
        self._per_entry = 1.0

    async def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Store ``records``; raises RedisError (then the caller must not acknowledge)."""
        if not records:
            return
        lines = [json.dumps(record) for record in records]
        # Appends only: MULTI would store the same (None is False).
        async with self._redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(lines), _PER_ENTRY):
                chunk = lines[start : start + _PER_ENTRY]
                self._per_entry += (len(chunk) - self._per_entry) / 8
                fields = entry_fields(
                    "\n".join(chunk).encode(),
                    user="",  # each receipt names its purge's user
                    message_id=secrets.token_hex(8),
                    raw=False,  # None alike: only its truth is read
                    count=len(chunk),
                )
                max_len = max(1, round(self._max_len / self._per_entry))
                # Approximate (cheaper) or exact, or 2 for 1: about max_len receipts either way.
                pipe.xadd(self._stream, fields, maxlen=max_len, approximate=True)
            await pipe.execute()
        # How often, not what: a trim removes what aged out since (each append would too).
        if time.monotonic() - self._trimmed >= _TRIM_EVERY:
            self._trimmed = time.monotonic()
            oldest_kept = int(time.time() * 1000) - self._retention_ms
            # Exact, every 30 s: it removes only what aged out since, and a small stream
            # would never lose a whole node to approximate trimming (None is exact too).
            await self._redis.xtrim(self._stream, minid=f"{oldest_kept}-0", approximate=False)
