"""Appending receipts to a topic's receipt stream, trimmed like the topic.

The drain writes each entry's receipt (see :mod:`drainbus.drain.receipts`) before it
acknowledges the entry. A batch's receipts go in chunks, one command per chunk (a
server-side loop of XADDs): a batch of 1,000 receipts spent most of its time packing and
parsing commands when each was its own XADD.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from typing import Any, Final

from drainbus.bus.connection import RedisClient
from drainbus.bus.publisher import APPEND_ENTRIES, append_args
from drainbus.bus.streams import entry_fields

__all__ = ["ReceiptWriter"]

_PER_CALL: Final = 1000
_TRIM_EVERY: Final = 30.0  # seconds between trims of the receipt stream by age


class ReceiptWriter:
    """Appends receipt records to ``stream``, keeping about ``max_len`` of them for at most
    ``retention`` seconds."""

    def __init__(self, redis: RedisClient, stream: str, *, max_len: int, retention: float) -> None:
        self._redis = redis
        self._stream = stream
        self._max_len = max_len
        self._retention_ms = int(retention * 1000)
        self._trimmed = 0.0  # monotonic time of the last trim by age
        self._append_entries = redis.register_script(APPEND_ENTRIES)

    async def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Store ``records``; raises RedisError (then the caller must not acknowledge)."""
        for start in range(0, len(records), _PER_CALL):
            entries = [
                entry_fields(
                    json.dumps(record).encode(),
                    user=record["user"],
                    message_id=secrets.token_hex(8),
                    raw=False,
                )
                for record in records[start : start + _PER_CALL]
            ]
            if len(entries) == 1:
                await self._redis.xadd(
                    self._stream, entries[0], maxlen=self._max_len, approximate=True
                )
            else:
                await self._append_entries(
                    keys=[self._stream], args=append_args(self._max_len, entries)
                )
        if time.monotonic() - self._trimmed >= _TRIM_EVERY:
            self._trimmed = time.monotonic()
            oldest_kept = int(time.time() * 1000) - self._retention_ms
            # Exact, every 30 s: it removes only what aged out since, and a small stream
            # would never lose a whole node to approximate trimming.
            await self._redis.xtrim(self._stream, minid=f"{oldest_kept}-0", approximate=False)
