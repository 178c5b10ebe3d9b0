"""What the HTTP targets (Cloudflare, HTTP PURGE caches) share: the HTTP client they own
as async context managers, and the counting of requests, retries and the last error around
:func:`~drainbus.drain.retry.run_with_retry`.

Planning and reading answers stay with each kind: the two APIs have nothing else in common.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Self

import anyio
import httpx
from structlog.typing import FilteringBoundLogger

from drainbus.drain.retry import RetryPolicy, Sleep, Verdict, run_with_retry
from drainbus.drain.target_stats import CloudflareStats, HttpPurgeStats

__all__ = ["HttpTarget"]


class HttpTarget(ABC):
    """Base of the HTTP targets: owns one :class:`httpx.AsyncClient` while entered.

    ``timeout`` is the client's default per request (seconds); ``retry`` sets the back-off;
    ``sleep`` and ``rng`` exist for tests. Subclasses set ``name`` and give :meth:`stats`.
    """

    name: str

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        sleep: Sleep = anyio.sleep,
        rng: random.Random | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._outcomes: Counter[str] = Counter()  # requests by final outcome
        self._retries = 0
        self._last_error: str | None = None

    async def __aenter__(self) -> Self:
        self._client = httpx.AsyncClient(
            timeout=self._timeout, follow_redirects=False, headers={"User-Agent": "drainbus"}
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _open_client(self) -> httpx.AsyncClient:
        """The client; :class:`RuntimeError` outside ``async with`` (a programming error)."""
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__}.apply() called outside 'async with'")
        return self._client

    async def _retrying(
        self, attempt: Callable[[], Awaitable[Verdict]], log: FilteringBoundLogger
    ) -> Verdict:
        """``attempt`` under the retry policy, counted: each retry, the final outcome, and
        the error of a request that did not end done."""

        def count_retry(verdict: Verdict) -> None:
            self._retries += 1

        verdict = await run_with_retry(
            attempt,
            policy=self._retry,
            log=log,
            rng=self._rng,
            sleep=self._sleep,
            on_retry=count_retry,
        )
        status = verdict.outcome().status
        self._outcomes[status] += 1
        if status != "done":
            self._last_error = verdict.error
        return verdict

    @abstractmethod
    def stats(self) -> HttpPurgeStats | CloudflareStats:
        """A snapshot of the counters."""

    def snapshot(self) -> dict[str, Any]:
        """The counters as ``ssh bus stats`` shows them."""
        return self.stats().as_dict()
