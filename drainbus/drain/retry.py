"""Pacing shared by the HTTP drain targets: outcomes, back-off, rate headers, a token bucket.

Every target answers a batch of purges with one :class:`Outcome` per purge. Inside a target
each HTTP request is tried by :func:`run_with_retry`, which turns the :class:`Verdict` of each
try into either an answer or a retry:

* ``done`` and ``permanent`` verdicts end the attempts at once;
* ``transient`` verdicts (5xx, 408, 425, 429, timeouts, connection errors) are retried up to
  :attr:`RetryPolicy.max_attempts` tries in all. The delay before retry *n* is the server's
  ``Retry-After`` when it sent one, else "full jitter" back-off: uniform in
  ``[0, min(cap, base * 2**(n-1))]``. Defaults: base 0.5 s, cap 30 s, 5 tries, so a request
  that keeps failing sleeps at most 0.5 + 1 + 2 + 4 = 7.5 s (3.75 s on average) plus its
  request timeouts before it is given up.
* A ``Retry-After`` longer than :attr:`RetryPolicy.max_retry_after` is not slept on: the
  request is given up at once so the daemon can leave the entry for redelivery instead of
  holding a whole batch for minutes.

Each retry is logged (``request_retry``: attempt, delay, attempts left, error) and giving up is
logged as an error (``request_gave_up``). :class:`TokenBucket` paces requests against a
server's published rate limit and can be corrected by what the server says
(:func:`parse_ratelimit`, :func:`parse_retry_after`).
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final, Literal

import anyio
import httpx
from structlog.typing import FilteringBoundLogger

__all__ = [
    "DONE",
    "OnSettled",
    "Outcome",
    "OutcomeStatus",
    "RateInfo",
    "RetryPolicy",
    "Spend",
    "TokenBucket",
    "Verdict",
    "merge_outcomes",
    "parse_ratelimit",
    "parse_retry_after",
    "run_with_retry",
    "status_verdict",
    "transport_verdict",
]

OutcomeStatus = Literal["done", "permanent", "retry_later"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one purge at one target.

    ``done``: the target confirmed every part of the purge. ``permanent``: the target refused
    it and would refuse it again (``error`` says why; the daemon dead-letters it).
    ``retry_later``: a transient failure outlasted the retry budget (``error`` says which; the
    daemon leaves the entry unacked for redelivery).

    What a ``done`` outcome can tell beyond "carried out", for the purge's receipt:
    ``evicted`` is how many cached objects the target removed (or expired, for a soft purge),
    None when the target cannot know (an HTTP cache or a CDN answers only "received");
    ``reference`` is the target's own id for the request (Cloudflare's purge id).
    """

    status: OutcomeStatus
    error: str | None = None
    evicted: int | None = None
    reference: str | None = None


DONE: Final = Outcome("done")

OnSettled = Callable[[dict[int, Outcome]], Awaitable[None]]
"""Told, after each call to a cache, of the batch's purges (index: outcome) now final."""

_SEVERITY: Final[dict[OutcomeStatus, int]] = {"done": 0, "retry_later": 1, "permanent": 2}


def merge_outcomes(outcomes: Iterable[Outcome]) -> Outcome:
    """Combine the outcomes of the parts of one purge into the purge's outcome.

    ``permanent`` beats ``retry_later`` beats ``done`` (a purge with a part that can never
    succeed gains nothing from redelivery); the errors of the worst parts are joined with
    ``"; "``. No parts means ``done``. A ``done`` result adds up the parts' ``evicted``
    (None if no part knew) and joins their distinct ``reference`` values with ``","``.
    """
    worst: OutcomeStatus = "done"
    errors: list[str] = []
    evicted: int | None = None
    references: list[str] = []
    for outcome in outcomes:
        if _SEVERITY[outcome.status] > _SEVERITY[worst]:
            worst, errors = outcome.status, []
        if outcome.status == worst and outcome.error and outcome.error not in errors:
            errors.append(outcome.error)
        if outcome.evicted is not None:
            evicted = (evicted or 0) + outcome.evicted
        if outcome.reference and outcome.reference not in references:
            references.append(outcome.reference)
    if worst == "done":
        if evicted is None and not references:
            return DONE
        return Outcome("done", evicted=evicted, reference=",".join(references) or None)
    return Outcome(worst, "; ".join(errors) or None)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The verdict on one try of one request.

    ``retry_after`` is the server's ``Retry-After`` in seconds, if it sent one;
    ``http_status`` is the response status, ``None`` when no response arrived;
    ``reference`` is the server's id for a request it accepted (Cloudflare's purge id).
    """

    status: Literal["done", "permanent", "transient"]
    error: str | None = None
    retry_after: float | None = None
    http_status: int | None = None
    reference: str | None = None

    def outcome(self) -> Outcome:
        """This verdict as the final outcome of a request: transient becomes retry_later.

        A ``done`` outcome keeps the verdict's ``reference``.
        """
        if self.status == "done":
            return Outcome("done", reference=self.reference) if self.reference else DONE
        return Outcome("permanent" if self.status == "permanent" else "retry_later", self.error)


_TRANSIENT_STATUSES: Final = frozenset({408, 425, 429})


def status_verdict(
    status: int, *, ok: bool, error: str, retry_after: float | None = None
) -> Verdict:
    """Classify an HTTP response: ``ok`` → done; 408/425/429/5xx → transient; else permanent.

    ``error`` is the message kept when the response is not ok.
    """
    if ok:
        return Verdict("done", http_status=status)
    if status in _TRANSIENT_STATUSES or status >= 500:
        return Verdict("transient", error, retry_after=retry_after, http_status=status)
    return Verdict("permanent", error, http_status=status)


def transport_verdict(exc: httpx.HTTPError, *, what: str) -> Verdict:
    """Classify an httpx exception raised while sending a request about ``what``.

    Timeouts, connection and read errors are transient. A request httpx refuses to build or
    send (unsupported scheme, a header value with a line break) is permanent. The message
    holds the exception class and text only: never the request, whose headers may carry a
    credential.
    """
    detail = str(exc) or "no detail"
    if isinstance(exc, httpx.TimeoutException):
        detail = "timed out"
    error = f"{what}: {type(exc).__name__}: {detail}"
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        return Verdict("permanent", error)
    return Verdict("transient", error)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently one request is retried (times in seconds).

    ``max_attempts`` counts every try including the first. See the module docstring for the
    delay rule.
    """

    base: float = 0.5
    cap: float = 30.0
    max_attempts: int = 5
    max_retry_after: float = 120.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base:
            raise ValueError(f"retry base {self.base} and cap {self.cap}: need 0 < base <= cap")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts {self.max_attempts}: need at least 1")
        if self.max_retry_after < 0:
            raise ValueError(f"max_retry_after {self.max_retry_after}: need >= 0")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The jittered delay before retry number ``retry`` (1 = the first retry)."""
        ceiling = min(self.cap, self.base * 2 ** min(retry - 1, 62))
        return rng.uniform(0.0, ceiling)


async def run_with_retry(
    attempt: Callable[[], Awaitable[Verdict]],
    *,
    policy: RetryPolicy,
    log: FilteringBoundLogger,
    rng: random.Random,
    sleep: Sleep = anyio.sleep,
    on_retry: Callable[[Verdict], None] | None = None,
) -> Verdict:
    """Call ``attempt`` until done, permanent or the policy gives up; return the last verdict.

    ``log`` is a structlog logger, normally already bound to what the request is about.
    ``on_retry`` is told of each transient verdict that will be retried (for counters).
    A final ``transient`` verdict means "gave up"; callers map it to ``retry_later``.
    """
    tries = 0
    while True:
        tries += 1
        verdict = await attempt()
        if verdict.status != "transient":
            return verdict
        left = policy.max_attempts - tries
        retry_after = verdict.retry_after
        if retry_after is not None and retry_after > policy.max_retry_after:
            log.error(
                "request_gave_up",
                attempts=tries,
                error=verdict.error,
                reason="retry_after_too_long",
                retry_after=retry_after,
            )
            return verdict
        if left <= 0:
            log.error("request_gave_up", attempts=tries, error=verdict.error)
            return verdict
        delay = retry_after if retry_after is not None else policy.backoff(tries, rng)
        log.warning(
            "request_retry",
            attempt=tries,
            attempts_left=left,
            delay=round(delay, 3),
            error=verdict.error,
            http_status=verdict.http_status,
        )
        if on_retry is not None:
            on_retry(verdict)
        await sleep(delay)


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP date.

    Fractional seconds are accepted; a past date gives 0; garbage gives ``None``.
    """
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


@dataclass(frozen=True, slots=True)
class RateInfo:
    """What a ``Ratelimit`` header says: ``remaining`` requests, quota back in ``reset`` s."""

    remaining: float
    reset: float | None


_RATE_PARAM: Final = re.compile(
    r"(?:^|[;,\s])(r|t|remaining|reset)\s*=\s*\"?(\d+(?:\.\d+)?)", re.IGNORECASE
)


def parse_ratelimit(value: str | None) -> RateInfo | None:
    """Leniently read a ``Ratelimit`` header into remaining quota and reset time.

    Accepts the structured-field form (``"default";r=20;t=3``) and the older
    ``limit=100, remaining=20, reset=3`` form, with integer or fractional numbers. When several
    policies are listed the most restrictive wins: the smallest remaining and the longest
    reset. Returns ``None`` when no remaining count can be found.
    """
    if not value:
        return None
    remaining: float | None = None
    reset: float | None = None
    for match in _RATE_PARAM.finditer(value):
        key, number = match.group(1).lower(), float(match.group(2))
        if key in ("r", "remaining"):
            remaining = number if remaining is None else min(remaining, number)
        else:
            reset = number if reset is None else max(reset, number)
    if remaining is None:
        return None
    return RateInfo(remaining, reset)


@dataclass(frozen=True, slots=True)
class Spend:
    """A receipt for tokens taken by :meth:`TokenBucket.acquire`; hand it to
    :meth:`TokenBucket.settle` when the request's answer (or failure) arrives."""

    cost: float
    waited: float  # seconds spent waiting for the tokens
    at: float  # clock time of the spend
    before: float  # tokens in the bucket just before the spend
    spent_total: float  # the bucket's running total of spent tokens, this spend included


class TokenBucket:
    """A token bucket: at most ``capacity`` tokens, refilled continuously at ``rate`` per second.

    Starts full. :meth:`acquire` waits (FIFO) until enough tokens are there and spends them.
    The server counts a request when it arrives, which is some time between the send and the
    answer; :meth:`settle` assumes the latest, so network jitter cannot make the local count
    run ahead of the server's. :meth:`observe` and :meth:`pause` let the server's word lower
    the local count, never raise it, so a bucket shared with other clients errs on the slow
    side.
    """

    def __init__(
        self,
        capacity: float,
        rate: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        if capacity < 1 or rate <= 0:
            raise ValueError(f"token bucket {capacity=} {rate=}: need capacity >= 1, rate > 0")
        self.capacity = float(capacity)
        self.rate = float(rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._stamp = clock()
        self._not_before = self._stamp
        self._spent_total = 0.0
        self._lock = anyio.Lock()  # FIFO: waiters spend in the order they came

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    @property
    def tokens(self) -> float:
        """Tokens available now (0 while paused)."""
        now = self._clock()
        self._refill(now)
        return 0.0 if now < self._not_before else max(self._tokens, 0.0)

    def delay(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens could be spent, not counting callers already waiting."""
        cost = min(cost, self.capacity)
        now = self._clock()
        self._refill(now)
        start = max(now, self._not_before)
        tokens = min(self.capacity, self._tokens + max(start - self._stamp, 0.0) * self.rate)
        return start - now + max(cost - tokens, 0.0) / self.rate

    async def acquire(self, cost: float = 1.0) -> Spend:
        """Wait until ``cost`` tokens are available and spend them.

        A cost above the capacity is clamped to it, so an oversized request waits for a full
        bucket instead of forever.
        """
        cost = min(cost, self.capacity)
        waited = 0.0
        async with self._lock:
            while True:
                now = self._clock()
                self._refill(now)
                wait = self._not_before - now
                if wait <= 0:
                    if self._tokens >= cost:
                        before = self._tokens
                        self._tokens -= cost
                        self._spent_total += cost
                        return Spend(cost, waited, now, before, self._spent_total)
                    wait = (cost - self._tokens) / self.rate
                await self._sleep(wait)
                waited += wait

    def settle(self, spend: Spend) -> None:
        """Recount ``spend`` as if the server had taken it now, when the answer arrived.

        That only lowers the count, and only when the bucket would have been full in between
        (a full bucket wastes its refill, and the server's may have stayed full longer).
        """
        now = self._clock()
        self._refill(now)
        late = min(self.capacity, spend.before + (now - spend.at) * self.rate) - spend.cost
        late -= self._spent_total - spend.spent_total  # what others spent since
        self._tokens = min(self._tokens, late)

    def observe(self, info: RateInfo) -> None:
        """Lower the local count to what the server says is left.

        With nothing left and a reset time given, no token is spent before the reset.
        """
        self._refill(self._clock())
        if info.remaining < 1 and info.reset:
            self.pause(info.reset)
        else:
            self._tokens = min(self._tokens, info.remaining)

    def pause(self, seconds: float) -> None:
        """Spend nothing for ``seconds``, then allow one token and refill from there.

        Used for ``Retry-After``: the server allows a retry then, not a burst.
        """
        now = self._clock()
        self._refill(now)
        self._not_before = max(self._not_before, now + max(seconds, 0.0))
        self._tokens = 0.0
        # Refill so that exactly one token has accrued when the pause ends.
        self._stamp = self._not_before - 1.0 / self.rate
