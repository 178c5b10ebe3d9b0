"""Admission before authentication: which new connections may try to log in.

One job: the pre-authentication budget of one SSH door. OpenSSH's ``MaxStartups`` (with
its random early drop) over all sources, ``PerSourceMaxStartups`` per source address, and
failed logins logged per source and interval rather than one line each. What a logged-in
connection counts against (users' connections and sessions) stays in ``ssh/server.py``.

asyncio on purpose: the failure log's flush timers are ``loop.call_later`` handles, one per
failing source, which cost nothing to start and cancel; anyio has no such cheap timer, and
asyncssh, which calls in here from its protocol callbacks, is asyncio-only.
"""

from __future__ import annotations

import asyncio
import random

import structlog

from drainbus.config import ServerSettings

__all__ = ["Admission", "FailureLog"]

log = structlog.get_logger(__name__)


class FailureLog:
    """Failed logins, logged per source address and interval instead of one line each.

    The first failure from a source is logged at once (with the key's fingerprint); the
    failures that follow within ``interval`` seconds are one line at its end. ``count`` on
    each line is the failures since the previous line, so the counts add up to every attempt.
    """

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._counts: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def add(self, source: str, fingerprint: str) -> None:
        """Count one refused key from ``source``."""
        if source in self._timers:
            self._counts[source] = self._counts.get(source, 0) + 1
            return
        log.info("auth_failed", source=source, count=1, fingerprint=fingerprint)
        if self._interval:
            self._timers[source] = asyncio.get_running_loop().call_later(
                self._interval, self._flush, source
            )

    def _flush(self, source: str) -> None:
        del self._timers[source]
        if self._log_count(source):
            # Still failing: keep aggregating rather than logging the next one at once.
            self._timers[source] = asyncio.get_running_loop().call_later(
                self._interval, self._flush, source
            )

    def _log_count(self, source: str) -> int:
        """Log the failures from ``source`` not yet logged; how many there were."""
        count = self._counts.pop(source, 0)
        if count:
            log.warning(
                "auth_failed", source=source, count=count, seconds=self._interval, aggregated=True
            )
        return count

    def close(self) -> None:
        """Log what is counted and not yet logged; stop the timers."""
        for source in tuple(self._timers):
            self._timers.pop(source).cancel()
            self._log_count(source)


class Admission:
    """The connections still logging in, counted against the door's start-up budget.

    ``admit`` counts a new connection or refuses it (logging why); ``release`` stops counting
    it, once it logged in or went away. ``failures`` aggregates the refused keys.
    """

    def __init__(self, server: ServerSettings) -> None:
        self._server = server
        self.starting = 0
        self._by_source: dict[str, int] = {}
        self.failures = FailureLog(server.auth_failure_log_interval)
        # Early drop only needs to be unpredictable enough to share the budget out.
        self._random = random.Random()  # noqa: S311

    def admit(self, peer: str, source: str) -> bool:
        """Count a new connection from ``source``, or log why not and return False."""
        server = self._server
        start, rate, full = server.startups
        from_source = self._by_source.get(source, 0)
        refusal: tuple[str, int] | None = None
        if from_source >= server.max_startups_per_source:
            refusal = ("max_startups_per_source", server.max_startups_per_source)
        elif self.starting >= full:
            refusal = ("max_startups", full)
        elif self.starting >= start:
            # OpenSSH's random early drop: RATE% at START, rising linearly to 100% at FULL.
            chance = rate + (100 - rate) * (self.starting - start) / max(full - start, 1)
            if self._random.random() * 100 < chance:
                refusal = ("max_startups", full)
        if refusal is not None:
            reason, limit = refusal
            log.warning(
                "connection_refused", peer=peer, reason=reason, limit=limit,
                starting=self.starting, from_source=from_source,
            )  # fmt: skip
            return False
        self.starting += 1
        self._by_source[source] = from_source + 1
        return True

    def release(self, source: str) -> None:
        """Stop counting one admitted connection from ``source``."""
        self.starting -= 1
        left = self._by_source[source] - 1
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]
