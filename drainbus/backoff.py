"""One retry policy for the loops that run until cancelled: exponential back-off with jitter.

Stream readers, subscribers catching up, the drain's consumers, the hook watcher's publishes
and the supervisor's worker restarts retry for as long as they run, and start over after any
success, so they keep a :class:`Backoff` and call
:meth:`Backoff.failed` on each failure (it logs the attempt, the delay and the error) and
:meth:`Backoff.succeeded` when things work again. The delay before the n-th retry in a row is
``min(cap, base * 2**(n-1))`` with "equal jitter": half of it fixed, half random. Without the
jitter every reader of every node would retry in lockstep after a Redis restart.

(stamina, the retry library that fits structlog, wraps one call that gives up after some
attempts or seconds; these loops never give up and reset on success, which it cannot say.
Single HTTP requests use :func:`drainbus.drain.retry.run_with_retry`.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

__all__ = ["Backoff"]

log = structlog.get_logger(__name__)


@dataclass
class Backoff:
    """Delays for one retry loop; ``event`` names its log line (``stream_reader_retry``)."""

    event: str
    base: float = 0.05
    cap: float = 2.0
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def delay(self) -> float:
        """The delay before the next retry, in seconds (after :meth:`failed` counted it)."""
        ceiling = min(self.cap, self.base * 2.0 ** min(self.failures - 1, 62))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    async def failed(self, error: BaseException | str | None = None, **fields: Any) -> None:
        """Count a failure, log it with the delay, and sleep that long."""
        self.failures += 1
        delay = self.delay()
        log.warning(
            self.event, attempt=self.failures, delay=round(delay, 3),
            error=None if error is None else str(error), **fields,
        )  # fmt: skip
        await anyio.sleep(delay)

    def succeeded(self) -> None:
        """Things work again: the next failure waits the shortest delay."""
        self.failures = 0
