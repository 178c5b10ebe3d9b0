"""Forward purges to Cloudflare's purge API: route by zone, coalesce, pack, pace, retry.

How a batch becomes API calls
-----------------------------
1.-3. Each purge is checked, routed to zones, coalesced and packed into calls:
   :mod:`drainbus.drain.cloudflare_plan` says how.
4. Calls run in lanes, one per account and bucket (URL calls, other calls). A lane is
   sequential, so each response's rate headers are read before the next call is paced;
   lanes run concurrently, so slow tag calls on a Free plan never hold up URL calls.
5. A call refused with 400, 413 or 422 that carries items of several purges is bisected by
   purge until the culprit stands alone, so one bad tag does not dead-letter its neighbours.

Rate limits
-----------
Each account (zones sharing ``account``, or sharing a token when ``account`` is unset) has
two :class:`~drainbus.drain.retry.TokenBucket`: one for tag/host/prefix/everything calls
(1 token per call) and one for URL purges (1 token per URL, bucket = one second's rate).
Figures come from :data:`PLAN_LIMITS` (the best plan among the account's zones) and are
spent at ``rate_headroom`` (90 %) of the published rate, leaving slack for latency jitter.
A call waits for tokens rather than risk a 429, and each spend is recounted as if Cloudflare
took it when the answer came back, so latency jitter cannot push the local count ahead of
Cloudflare's. ``Ratelimit`` headers on any response lower the local count; a 429 pauses the
bucket for its ``Retry-After``. Other processes spending the same account are only seen
through those two signals. When the bucket would make a call wait longer than
``RetryPolicy.max_retry_after`` the call is not made and its purges are ``retry_later``, so
:meth:`CloudflareForwarder.forward` never stalls the daemon for minutes.

Outcomes
--------
A purge is ``done`` only if every call carrying any of its items answered
``"success": true`` with a 2xx status. Cloudflare's ``errors[].code`` decides first: a
rate-limit code (:data:`RATE_LIMIT_CODES`, 1134) is retried with back-off whatever the
status; a code that can never succeed (:data:`PERMANENT_CODES`: authentication, zone not
found, invalid item) is ``permanent``; any other code is retried. Without codes the status
decides: a 4xx other than 408/425/429 is ``permanent`` (the error names the zone, the HTTP
status and Cloudflare's codes and messages); 5xx, 408, 425, 429, timeouts, connection errors
and a 2xx without ``"success": true`` are retried by
:func:`~drainbus.drain.retry.run_with_retry`; if they outlast it the purge is
``retry_later``. A purge with parts of both kinds is ``permanent``: redelivery cannot help it.
A ``done`` outcome's ``reference`` is Cloudflare's purge id (``result.id``) of the call that
carried the purge; the ids of several calls are joined with ``","``.

Secrets
-------
The API token lives in a :class:`pydantic.SecretStr`, is put on each request's
``Authorization`` header and nowhere else: never in client defaults, logs, errors or stats.
httpx exceptions are turned into plain messages (class and text), never re-raised.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Final

import anyio
import httpx
import structlog

from drainbus import cloudflare_codes as codes
from drainbus.drain.cloudflare_plan import FILE_KINDS, MAX_TAG_LENGTH, Account, Call, Planner, Zone
from drainbus.drain.cloudflare_zones import (
    PLAN_LIMITS,
    PLAN_ORDER,
    CloudflareZoneConfig,
    Plan,
    PlanLimits,
    ZoneConfigError,
)
from drainbus.drain.http_target import HttpTarget
from drainbus.drain.lanes import run_lanes
from drainbus.drain.purges import Purge
from drainbus.drain.retry import (
    Clock,
    OnSettled,
    Outcome,
    RateInfo,
    RetryPolicy,
    Sleep,
    Spend,
    TokenBucket,
    Verdict,
    merge_outcomes,
    parse_ratelimit,
    parse_retry_after,
    status_verdict,
    transport_verdict,
)
from drainbus.drain.scope import ScopeRule
from drainbus.drain.target_stats import CloudflareStats
from drainbus.errors import ConfigError

__all__ = [
    "MAX_TAG_LENGTH",
    "PERMANENT_CODES",
    "PLAN_LIMITS",
    "RATE_LIMIT_CODES",
    "CloudflareForwarder",
    "CloudflareStats",
    "CloudflareZoneConfig",
    "Outcome",
    "Plan",
    "PlanLimits",
    "ZoneConfigError",
]

_log = structlog.get_logger(__name__)

# Refusals that may be caused by one item among many: worth bisecting the call.
_SPLITTABLE: Final = frozenset({400, 413, 422})


# Cloudflare's ``errors[].code`` decides before the HTTP status does. Codes from Cloudflare's
# API reference for POST /zones/{zone_id}/purge_cache (its 4XX examples: 1092 "Request cannot
# contain "purge_everything" and any of ...", 1134 "Unable to purge, rate limit reached.
# Please wait and consider throttling your request speed"; 1136 for a URL purge of an
# environment chosen by IP, country, ASN or threat score) and from answers Cloudflare's API
# is seen to give (10000 "Authentication error", 9109 "Unauthorized to access requested
# resource", 7000/7003 no route / "Could not route to /zones/…, perhaps your object
# identifier is invalid?", 1014 invalid purge field, 1107 "Only enterprise zones can purge
# by tag"). A rate-limit code is retried with back-off whatever the status (Cloudflare has
# sent it with 429, 400 and 200 "success": false); only codes that can never succeed are
# permanent; any other code is retried, and redelivery bounds it.
RATE_LIMIT_CODES: Final = frozenset({codes.RATE_LIMITED})
PERMANENT_CODES: Final = frozenset({
    codes.AUTHENTICATION_ERROR, codes.UNAUTHORIZED, codes.NO_ROUTE, codes.ROUTE_INVALID,
    codes.INVALID_FIELD, codes.EVERYTHING_AND_OTHERS, codes.ONLY_ENTERPRISE_TAGS,
    codes.SCOPE_BY_ENVIRONMENT,
})  # fmt: skip


def _error_codes(response: httpx.Response) -> frozenset[int]:
    """The integer ``errors[].code`` values of a Cloudflare answer (empty if none)."""
    try:
        body = response.json()
    except ValueError:
        return frozenset()
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list):
        return frozenset()
    return frozenset(
        e["code"]
        for e in errors
        if isinstance(e, dict)
        and isinstance(e.get("code"), int)
        and not isinstance(e["code"], bool)
    )


def _describe_errors(response: httpx.Response) -> tuple[bool, str, str | None]:
    """(success, detail, purge id) read from a Cloudflare response body.

    The purge id is ``result.id`` when it is a non-empty string, else None.
    """
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())[:200]
        return False, f", body is not JSON: {text!r}" if text else ", empty body", None
    if not isinstance(body, dict):
        return False, ", body is not a JSON object", None
    success = body.get("success") is True
    result = body.get("result")
    purge_id = result.get("id") if isinstance(result, dict) else None
    reference = purge_id[:200] if isinstance(purge_id, str) and purge_id else None
    errors = body.get("errors")
    parts = []
    if isinstance(errors, list):
        for error in errors[:5]:
            if isinstance(error, dict):
                parts.append(f"error {error.get('code')}: {error.get('message')}")
    if parts:
        return success, ", " + "; ".join(parts), reference
    return success, "" if success else ", success is not true", reference


class CloudflareForwarder(HttpTarget):
    """Sends batches of purges to Cloudflare: the cdn role's :class:`~drainbus.drain.targets.
    Target`, and an async context manager owning one HTTP client.

    Tokens are resolved when the forwarder is created, so a missing token fails at start-up
    (:class:`ZoneConfigError`). ``retry`` sets the back-off; ``limits`` overrides
    :data:`PLAN_LIMITS` per plan (negotiated limits, tests); ``rate_headroom`` is the share
    of the published refill rate spent. ``scope_rule`` gives bare keys their host
    (``key_host``): a key is purged as its tag and its host, as on every target. ``clock``,
    ``sleep`` and ``rng`` exist for tests.
    """

    def __init__(
        self,
        zones: Sequence[CloudflareZoneConfig],
        *,
        retry: RetryPolicy | None = None,
        limits: Mapping[Plan, PlanLimits] | None = None,
        rate_headroom: float = 0.9,
        environ: Mapping[str, str] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
        rng: random.Random | None = None,
        scope_rule: ScopeRule | None = None,
    ) -> None:
        if not zones:
            raise ConfigError("no Cloudflare zone is configured: add at least one zone")
        if not 0 < rate_headroom <= 1:
            raise ConfigError(f"rate_headroom {rate_headroom} must be in (0, 1]")
        seen: set[str] = set()
        for zone in zones:
            if zone.zone_id in seen:
                raise ZoneConfigError(
                    f"zone {zone.zone_id} is configured twice: list each zone once",
                    zone=zone.zone_id,
                )
            seen.add(zone.zone_id)
        super().__init__(retry=retry, sleep=sleep, rng=rng)
        self.name = "cloudflare"
        self._limits = {**PLAN_LIMITS, **(limits or {})}

        tokens = [zone.resolve_token(environ) for zone in zones]
        # Zones share a budget by account name, else by token; a token is only ever a key.
        keys = [
            ("account", z.account) if z.account else ("token", t.get_secret_value())
            for z, t in zip(zones, tokens, strict=True)
        ]
        accounts: dict[tuple[str, str], Account] = {}
        for key in dict.fromkeys(keys):
            members = [z for z, k in zip(zones, keys, strict=True) if k == key]
            best = self._limits[max((z.plan for z in members), key=PLAN_ORDER.index)]
            accounts[key] = Account(
                label=key[1] if key[0] == "account" else f"token of zone {members[0].zone_id}",
                calls=TokenBucket(
                    best.calls_bucket,
                    best.calls_per_second * rate_headroom,
                    clock=clock,
                    sleep=sleep,
                ),
                urls=TokenBucket(
                    max(best.urls_per_second, 1.0),
                    best.urls_per_second * rate_headroom,
                    clock=clock,
                    sleep=sleep,
                ),
            )
        self._accounts = list(accounts.values())
        zone_list = [
            Zone(
                config=z,
                token=t,
                account=accounts[k],
                limits=self._limits[z.plan],
                exact=frozenset(h for h in z.hosts if not h.startswith("*.")),
                wildcards=tuple(h[1:] for h in z.hosts if h.startswith("*.")),
            )
            for z, t, k in zip(zones, tokens, keys, strict=True)
        ]
        self._zones = zone_list
        self._planner = Planner(zone_list, scope_rule)

        self._last_buckets: list[TokenBucket] = []
        self._rate_limited = 0

    @property
    def batch_window(self) -> float:
        """The longest, in seconds, the daemon may hold purges back while :meth:`busy_for`
        is above 0 (the rate limit leaves no room), to gather more for the next call.

        The shortest window of any zone, so no zone waits longer than it asked for.
        """
        return min(zone.config.batch_window for zone in self._zones)

    def busy_for(self) -> float:
        """Seconds until a rate-limit bucket the last :meth:`forward` spent from has room for
        a call; 0 if one has room now (or no call was made yet).

        A busy bus tends to go on sending what it sent last, so those buckets decide. A
        purge of another kind may then wait for them too, which the daemon bounds by
        :attr:`batch_window`. A call of one URL is the smallest, so a URL bucket has room
        when it holds one token.
        """
        return min((bucket.delay(1.0) for bucket in self._last_buckets), default=0.0)

    def stats(self) -> CloudflareStats:
        """A snapshot of the counters and the local rate buckets."""
        return CloudflareStats(
            calls=dict(self._outcomes),
            rate_limited=self._rate_limited,
            retries=self._retries,
            tokens_left={a.label: a.calls.tokens for a in self._accounts},
            url_tokens_left={a.label: a.urls.tokens for a in self._accounts},
            unrouted=self._planner.unrouted,
            last_error=self._last_error,
        )

    async def apply(
        self, purges: Sequence[Purge], on_settled: OnSettled | None = None
    ) -> list[Outcome]:
        """Purge a batch on Cloudflare; return one :class:`Outcome` per purge, in order.

        Never raises for a purge's failure (that is in its outcome); raises
        :class:`RuntimeError` outside ``async with``. Cancellation propagates; calls already
        answered stay done, which is harmless because purges are idempotent.
        ``on_settled``: see :func:`drainbus.drain.lanes.run_lanes`.
        """
        self._open_client()  # raises outside 'async with'
        calls, local = self._planner.plan(purges)
        parts: dict[int, list[Outcome]] = {i: [] for i in range(len(purges))}
        for i, outcome in local.items():
            parts[i].append(outcome)

        lanes: dict[tuple[int, str], list[Call]] = {}
        buckets: dict[tuple[int, str], TokenBucket] = {}
        for call in calls:
            account = call.zone.account
            kind = "urls" if call.kind in FILE_KINDS else "calls"
            lanes.setdefault((id(account), kind), []).append(call)
            buckets[id(account), kind] = account.urls if kind == "urls" else account.calls
        if buckets:
            self._last_buckets = list(buckets.values())

        await run_lanes(lanes.values(), self._execute, parts, on_settled)
        return [merge_outcomes(parts[i]) for i in range(len(purges))]

    async def _execute(self, call: Call) -> dict[int, Outcome]:
        verdict = await self._send(call)
        if (
            verdict.status == "permanent"
            and verdict.http_status in _SPLITTABLE
            and len(call.purges) > 1
            and call.kind != "purge_everything"
        ):
            _log.warning(
                "cloudflare_call_split",
                zone=call.zone.id,
                kind=call.kind,
                purges=len(call.purges),
                error=verdict.error,
            )
            results: dict[int, Outcome] = {}
            for half in call.split():
                results.update(await self._execute(half))
            return results
        if verdict.status == "permanent":
            _log.error(
                "cloudflare_purge_refused",
                zone=call.zone.id,
                kind=call.kind,
                purges=len(call.purges),
                error=verdict.error,
            )
        return dict.fromkeys(call.purges, verdict.outcome())

    async def _send(self, call: Call) -> Verdict:
        account = call.zone.account
        bucket = account.urls if call.kind in FILE_KINDS else account.calls
        cost = float(len(call.owners)) if call.kind in FILE_KINDS else 1.0
        log = _log.bind(
            zone=call.zone.id,
            endpoint=call.endpoint,
            kind=call.kind,
            items=len(call.owners),
            purges=len(call.purges),
        )

        async def attempt() -> Verdict:
            delay = bucket.delay(cost)
            if delay > self._retry.max_retry_after:
                # Waiting that long would stall the daemon; let the entry be redelivered.
                error = f"zone {call.zone.id}: rate limit allows the next call in {delay:.0f} s"
                return Verdict("transient", error, retry_after=delay)
            spend = await bucket.acquire(cost)
            if spend.waited > 0:
                log.debug(
                    "cloudflare_rate_wait", account=account.label, waited=round(spend.waited, 3)
                )
            return await self._post(call, bucket, spend)

        verdict = await self._retrying(attempt, log)
        if verdict.status == "done":
            log.info("cloudflare_purged")
        return verdict

    async def _post(self, call: Call, bucket: TokenBucket, spend: Spend) -> Verdict:
        client = self._open_client()
        zone = call.zone
        secret = zone.token.get_secret_value()
        what = f"zone {zone.id} {call.endpoint} ({call.kind})"
        try:
            response = await client.post(
                f"{zone.config.api_base}/zones/{zone.id}/{call.endpoint}",
                json=call.body(),
                headers={"Authorization": f"Bearer {secret}"},
                timeout=zone.config.timeout,
            )
        except httpx.HTTPError as exc:
            bucket.settle(spend)  # it may have reached Cloudflare all the same
            return _redact(transport_verdict(exc, what=what), secret)

        bucket.settle(spend)
        rate = parse_ratelimit(response.headers.get("ratelimit"))
        if rate is not None:
            bucket.observe(rate)
        codes = _error_codes(response)
        rate_limited = response.status_code == 429 or bool(codes & RATE_LIMIT_CODES)
        retry_after = None
        if rate_limited:
            self._rate_limited += 1
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if retry_after is not None:
                bucket.pause(retry_after)
            else:
                bucket.observe(RateInfo(remaining=0, reset=None))

        success, detail, reference = _describe_errors(response)
        status = response.status_code
        error = f"{what}: HTTP {status}{detail}"
        if rate_limited:
            verdict = Verdict("transient", error, retry_after=retry_after, http_status=status)
        elif codes & PERMANENT_CODES:
            verdict = Verdict("permanent", error, http_status=status)
        elif codes and not (response.is_success and success):
            # A code not known to be final: retried, and redelivered if it persists.
            verdict = Verdict("transient", error, http_status=status)
        elif response.is_success:
            # A 2xx without "success": true is not a confirmation; retry rather than drop.
            verdict = (
                Verdict("done", http_status=status, reference=reference)
                if success
                else Verdict("transient", error, http_status=status)
            )
        else:
            verdict = status_verdict(status, ok=False, error=error, retry_after=retry_after)
        return _redact(verdict, secret)


def _redact(verdict: Verdict, secret: str) -> Verdict:
    if verdict.error and secret in verdict.error:
        return Verdict(
            verdict.status,
            verdict.error.replace(secret, "[redacted]"),
            verdict.retry_after,
            verdict.http_status,
            verdict.reference,
        )
    return verdict
