"""Forward purges to Cloudflare's purge API: route by zone, coalesce, pack, pace, retry.

How a batch becomes API calls
-----------------------------
1. Each purge is checked first against rules Cloudflare would refuse it for (a tag over
   1,024 characters or with a space or comma, a prefix with a query string or more than 31
   path separators, a host that is an IP address, a URL that is not ``http(s)``); ``pub``
   refuses them already, this catches entries stored before it did. Such a
   purge is ``permanent`` without a call, so it cannot fail a call shared with its neighbours.
2. Items are routed to zones. ``keys`` (sent as tags), ``tags`` and ``everything`` go to every
   zone. A URL, host or prefix goes to the zones whose ``hosts`` match its host most
   specifically (an exact name beats the longest ``*.suffix`` wildcard); with no match, to
   the catch-all zones (``hosts = []``); with no catch-all zone, nowhere: the host is not
   behind any configured zone, so nothing is cached there and the purge part is ``done``
   (counted as ``unrouted`` and logged).
3. Per zone and endpoint (``purge_cache``; ``invalidate_cache`` for ``soft`` purges and for
   zones in ``mode="invalidate"``) items of one kind are deduplicated and packed into calls
   of at most 100 items (files: 500 on Enterprise). A prefix at a host's root is sent as a
   host purge, and a scheme is never sent. URLs and prefixes keep a port that is not the
   scheme's default and drop one that is (one rule for both, see :func:`_authority`). A hard
   ``purge_everything`` for a zone absorbs every other call for that zone; a soft one
   absorbs the zone's other soft calls.
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

import asyncio
import ipaddress
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self
from urllib.parse import urlsplit

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from drainbus import cloudflare_codes as codes
from drainbus.drain.lanes import run_lanes
from drainbus.drain.purges import (
    MAX_PREFIX_SEPARATORS,
    MAX_TOKEN_LENGTH,
    Purge,
    ScopeRule,
    key_hosts,
)
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
    run_with_retry,
    status_verdict,
    transport_verdict,
)
from drainbus.errors import ConfigError
from drainbus.values import Duration, PositiveDuration

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

Plan = Literal["free", "pro", "business", "enterprise"]
# "file_objects": files sent as {"url", "headers"} objects (a call never mixes them with
# plain URL strings, the two forms of ``files`` in Cloudflare's schema).
_Kind = Literal["files", "file_objects", "tags", "hosts", "prefixes", "purge_everything"]
_FILE_KINDS: Final = frozenset({"files", "file_objects"})
_Endpoint = Literal["purge_cache", "invalidate_cache"]

TOKEN_ENV: Final = "CLOUDFLARE_API_TOKEN"  # noqa: S105 - the variable's name, not a secret
MAX_TAG_LENGTH: Final = MAX_TOKEN_LENGTH  # one limit for keys and tags, Cloudflare's
_PLAN_ORDER: Final[tuple[Plan, ...]] = ("free", "pro", "business", "enterprise")
# Refusals that may be caused by one item among many: worth bisecting the call.
_SPLITTABLE: Final = frozenset({400, 413, 422})


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """Cloudflare's purge limits for one plan, applied per account.

    ``calls_per_second`` and ``calls_bucket``: tag/host/prefix/everything calls.
    ``urls_per_second``: URLs purged per second (the bucket holds one second's worth).
    ``items_per_call`` and ``files_per_call``: most items in one call.
    """

    calls_per_second: float
    calls_bucket: float
    urls_per_second: float
    items_per_call: int = 100
    files_per_call: int = 100


PLAN_LIMITS: Final[Mapping[Plan, PlanLimits]] = {
    "free": PlanLimits(calls_per_second=5 / 60, calls_bucket=25, urls_per_second=800),
    "pro": PlanLimits(calls_per_second=5, calls_bucket=25, urls_per_second=1500),
    "business": PlanLimits(calls_per_second=10, calls_bucket=50, urls_per_second=1500),
    "enterprise": PlanLimits(
        calls_per_second=50, calls_bucket=500, urls_per_second=3000, files_per_call=500
    ),
}


class ZoneConfigError(ConfigError):
    """A Cloudflare zone's settings cannot be used; ``zone`` is the zone id."""

    def __init__(self, message: str, *, zone: str) -> None:
        super().__init__(message)
        self.zone = zone


_ZONE_ID = re.compile(r"[A-Za-z0-9_-]+")
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")


def _normalise_host(host: str) -> str:
    return host.strip().lower().rstrip(".")


class CloudflareZoneConfig(BaseModel):
    """One Cloudflare zone drainbus purges, and how.

    ``hosts`` are the host names the zone serves (``*.example.com`` matches any subdomain of
    example.com, not example.com itself); an empty list makes the zone a catch-all for URL,
    host and prefix purges no other zone claims. Zones with the same ``account`` share one
    rate-limit budget; with ``account`` unset, zones share it when they share a token.
    ``batch_window`` and ``timeout`` are seconds. ``batch_window`` is the longest the daemon
    holds purges back to gather more while the rate limit leaves no room for a call; an idle
    bus never waits for it (see :meth:`CloudflareForwarder.busy_for`). 0, the default, never
    holds back: purges that arrive while a call is in flight or waits for the rate limit
    are coalesced into the next call all the same.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    zone_id: str
    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    hosts: list[str] = Field(default_factory=list)
    plan: Plan = "free"
    api_base: str = "https://api.cloudflare.com/client/v4"
    mode: Literal["purge", "invalidate"] = "purge"
    batch_window: Duration = 0.0
    timeout: PositiveDuration = 10.0
    account: str | None = None

    @field_validator("zone_id")
    @classmethod
    def _check_zone_id(cls, value: str) -> str:
        if not _ZONE_ID.fullmatch(value):
            raise ValueError("zone_id must be the zone's id: letters, digits, '_' and '-'")
        return value

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        hosts = []
        for raw in value:
            host = _normalise_host(raw)
            labels = host.removeprefix("*.").split(".")
            if not host or not all(_HOST_LABEL.fullmatch(label) for label in labels):
                raise ValueError(
                    f"host {raw!r} is invalid: use a host name like 'www.example.com' or"
                    " '*.example.com' (no scheme, port or path; IDNs in punycode)"
                )
            hosts.append(host)
        return hosts

    @field_validator("api_base")
    @classmethod
    def _check_api_base(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"api_base {value!r} must be an http(s) URL")
        return value.rstrip("/")

    def resolve_token(self, environ: Mapping[str, str] | None = None) -> SecretStr:
        """The API token: ``api_token``, else ``api_token_file`` (stripped), else the
        ``CLOUDFLARE_API_TOKEN`` environment variable.

        Raises :class:`ZoneConfigError` naming the zone when none is set, the file cannot be
        read, or the token is empty.
        """
        zone = self.zone_id
        if self.api_token is not None:
            token = self.api_token.get_secret_value().strip()
            source = "api_token"
        elif self.api_token_file is not None:
            try:
                token = self.api_token_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ZoneConfigError(
                    f"zone {zone}: cannot read api_token_file {self.api_token_file}: {reason}",
                    zone=zone,
                ) from None
            source = f"api_token_file {self.api_token_file}"
        else:
            env = os.environ if environ is None else environ
            token = env.get(TOKEN_ENV, "").strip()
            if not token:
                raise ZoneConfigError(
                    f"zone {zone} has no Cloudflare API token: set api_token or"
                    f" api_token_file for the zone, or {TOKEN_ENV} in the environment",
                    zone=zone,
                )
            source = TOKEN_ENV
        if not token:
            raise ZoneConfigError(f"zone {zone}: {source} is empty", zone=zone)
        return SecretStr(token)


@dataclass(frozen=True, slots=True)
class CloudflareStats:
    """A snapshot of a forwarder's counters since it was created.

    ``calls`` counts API calls by final outcome (``done``, ``permanent``, ``retry_later``);
    ``rate_limited`` counts 429 responses; ``retries`` counts retried attempts;
    ``tokens_left`` and ``url_tokens_left`` are the local buckets per account label;
    ``unrouted`` counts purge parts no zone serves; ``last_error`` is the latest failure.
    """

    calls: Mapping[str, int]
    rate_limited: int
    retries: int
    tokens_left: Mapping[str, float]
    url_tokens_left: Mapping[str, float]
    unrouted: int
    last_error: str | None


@dataclass(eq=False, slots=True)
class _Account:
    label: str
    calls: TokenBucket
    urls: TokenBucket


@dataclass(eq=False, slots=True)
class _Zone:
    config: CloudflareZoneConfig
    token: SecretStr
    account: _Account
    limits: PlanLimits
    exact: frozenset[str]
    wildcards: tuple[str, ...]  # ".example.com" for "*.example.com"

    @property
    def id(self) -> str:
        return self.config.zone_id


@dataclass(eq=False, slots=True)
class _Call:
    zone: _Zone
    endpoint: _Endpoint
    kind: _Kind
    owners: dict[str, set[int]]  # item -> indices of the purges that asked for it
    purges: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        for owner in self.owners.values():
            self.purges |= owner

    def body(self) -> dict[str, object]:
        if self.kind == "purge_everything":
            return {"purge_everything": True}
        if self.kind == "file_objects":
            return {"files": [json.loads(item) for item in self.owners]}
        return {self.kind: list(self.owners)}

    def split(self) -> tuple[_Call, _Call]:
        ordered = sorted(self.purges)
        halves = (set(ordered[: len(ordered) // 2]), set(ordered[len(ordered) // 2 :]))
        calls = []
        for half in halves:
            owners = {item: owner & half for item, owner in self.owners.items() if owner & half}
            calls.append(_Call(self.zone, self.endpoint, self.kind, owners))
        return calls[0], calls[1]


def _endpoint(zone: _Zone, *, soft: bool) -> _Endpoint:
    if soft or zone.config.mode == "invalidate":
        return "invalidate_cache"
    return "purge_cache"


def _url_host(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not host:
        return None
    return _normalise_host(host)


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def _authority(url: str) -> str:
    """The host of ``url`` as Cloudflare names it in a purge: lower-case, with the port only
    when it is not the scheme's default.

    The one port rule for URL and prefix purges, from Cloudflare's API reference for
    POST /zones/{zone_id}/purge_cache ("Include the port unless it is the default for the
    scheme: 80 for http, 443 for https"): ``https://h:8443/docs`` is ``h:8443/docs`` as a
    prefix and ``https://h:8443/…`` as a file; ``https://h:443/docs`` is ``h/docs``.
    """
    parts = urlsplit(url)
    host = _normalise_host(parts.hostname or "")
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    port = parts.port
    if port is None or port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        return host
    return f"{host}:{port}"


def _file_url(url: str) -> str:
    """``url`` without a port that is the scheme's default (as :func:`_authority`), else as
    given."""
    parts = urlsplit(url)
    port = parts.port
    if port is None or port != _DEFAULT_PORTS.get(parts.scheme.lower()):
        return url
    netloc = parts.netloc.removesuffix(f":{parts.netloc.rpartition(':')[2]}")
    rest = url[len(parts.scheme) + len("://") + len(parts.netloc) :]
    return f"{parts.scheme}://{netloc}{rest}"


def _check(purge: Purge, url_hosts: Mapping[str, str | None]) -> str | None:
    """Why Cloudflare would refuse this purge, or None. ``url_hosts`` maps each of its URLs
    to :func:`_url_host` of it (worked out once: a burst has thousands)."""
    for tag in sorted(purge.keys | purge.tags):
        shown = tag[:40] + "…" if len(tag) > 40 else tag
        if not tag or len(tag) > MAX_TAG_LENGTH:
            return (
                f"tag {shown!r} has {len(tag)} characters: Cloudflare accepts 1 to {MAX_TAG_LENGTH}"
            )
        # "Spaces are not allowed in Cache-Tags"; commas separate them (purge-by-tags docs).
        if any(c == "," or c.isspace() or not c.isprintable() for c in tag):
            return f"tag {shown!r} holds a space, comma or control character: Cloudflare refuses it"
    for url in sorted(purge.urls):
        if url_hosts[url] is None:
            return f"URL {url!r} is not an absolute http(s) URL"
    for prefix in sorted(purge.prefixes):
        if _url_host(prefix) is None:
            return f"prefix {prefix!r} is not an absolute http(s) URL"
        parts = urlsplit(prefix)
        if parts.query or parts.fragment or "?" in prefix:
            return f"prefix {prefix!r} has a query string: Cloudflare prefixes are host/path"
        if parts.path.count("/") > MAX_PREFIX_SEPARATORS:
            return (
                f"prefix {prefix!r} has more than {MAX_PREFIX_SEPARATORS} path separators: "
                "Cloudflare refuses it (purge_by_prefix docs, Limitations)"
            )
    for host in sorted(purge.hosts):
        if not _normalise_host(host):
            return "an empty host cannot be purged"
        if _is_ip_address(host):
            return f"host {host!r} is an IP address: Cloudflare purges host names only"
    return None


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


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


class CloudflareForwarder:
    """Sends batches of purges to Cloudflare; an async context manager owning one HTTP client.

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
        sleep: Sleep = asyncio.sleep,
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
        self._retry = retry or RetryPolicy()
        self._scope_rule = scope_rule
        self._limits = {**PLAN_LIMITS, **(limits or {})}
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._client: httpx.AsyncClient | None = None

        tokens = [zone.resolve_token(environ) for zone in zones]
        # Zones share a budget by account name, else by token; a token is only ever a key.
        keys = [
            ("account", z.account) if z.account else ("token", t.get_secret_value())
            for z, t in zip(zones, tokens, strict=True)
        ]
        accounts: dict[tuple[str, str], _Account] = {}
        for key in dict.fromkeys(keys):
            members = [z for z, k in zip(zones, keys, strict=True) if k == key]
            best = self._limits[max((z.plan for z in members), key=_PLAN_ORDER.index)]
            accounts[key] = _Account(
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
        self._zones = [
            _Zone(
                config=z,
                token=t,
                account=accounts[k],
                limits=self._limits[z.plan],
                exact=frozenset(h for h in z.hosts if not h.startswith("*.")),
                wildcards=tuple(h[1:] for h in z.hosts if h.startswith("*.")),
            )
            for z, t, k in zip(zones, tokens, keys, strict=True)
        ]

        self._last_buckets: list[TokenBucket] = []
        self._calls: Counter[str] = Counter()
        self._rate_limited = 0
        self._retries = 0
        self._unrouted = 0
        self._last_error: str | None = None

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

    async def __aenter__(self) -> Self:
        self._client = httpx.AsyncClient(headers={"User-Agent": "drainbus"}, follow_redirects=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def stats(self) -> CloudflareStats:
        """A snapshot of the counters and the local rate buckets."""
        return CloudflareStats(
            calls=dict(self._calls),
            rate_limited=self._rate_limited,
            retries=self._retries,
            tokens_left={a.label: a.calls.tokens for a in self._accounts},
            url_tokens_left={a.label: a.urls.tokens for a in self._accounts},
            unrouted=self._unrouted,
            last_error=self._last_error,
        )

    async def forward(
        self, purges: Sequence[Purge], on_settled: OnSettled | None = None
    ) -> list[Outcome]:
        """Purge a batch on Cloudflare; return one :class:`Outcome` per purge, in order.

        Never raises for a purge's failure (that is in its outcome); raises
        :class:`RuntimeError` outside ``async with``. Cancellation propagates; calls already
        answered stay done, which is harmless because purges are idempotent.
        ``on_settled``: see :func:`drainbus.drain.lanes.run_lanes`.
        """
        if self._client is None:
            raise RuntimeError("CloudflareForwarder.forward() called outside 'async with'")
        calls, local = self._plan(purges)
        parts: dict[int, list[Outcome]] = {i: [] for i in range(len(purges))}
        for i, outcome in local.items():
            parts[i].append(outcome)

        lanes: dict[tuple[int, str], list[_Call]] = {}
        buckets: dict[tuple[int, str], TokenBucket] = {}
        for call in calls:
            account = call.zone.account
            kind = "urls" if call.kind in _FILE_KINDS else "calls"
            lanes.setdefault((id(account), kind), []).append(call)
            buckets[id(account), kind] = account.urls if kind == "urls" else account.calls
        if buckets:
            self._last_buckets = list(buckets.values())

        await run_lanes(lanes.values(), self._execute, parts, on_settled)
        return [merge_outcomes(parts[i]) for i in range(len(purges))]

    def _route(self, host: str) -> list[_Zone]:
        exact = [zone for zone in self._zones if host in zone.exact]
        if exact:
            return exact
        best, matched = 0, list[_Zone]()
        for zone in self._zones:
            for suffix in zone.wildcards:
                if host.endswith(suffix) and len(suffix) >= best:
                    if len(suffix) > best:
                        best, matched = len(suffix), []
                    matched.append(zone)
                    break
        if matched:
            return matched
        return [zone for zone in self._zones if not zone.config.hosts]

    def _plan(self, purges: Sequence[Purge]) -> tuple[list[_Call], dict[int, Outcome]]:
        local: dict[int, Outcome] = {}
        groups: dict[tuple[_Zone, _Endpoint, _Kind], dict[str, set[int]]] = {}
        everything: dict[tuple[_Zone, _Endpoint], set[int]] = {}

        def add(
            i: int, soft: bool, zones: list[_Zone], kind: _Kind, item: str, *, what: str
        ) -> None:
            if not zones:
                self._unrouted += 1
                _log.info("cloudflare_purge_unrouted", item=what)
            for zone in zones:
                key = (zone, _endpoint(zone, soft=soft), kind)
                groups.setdefault(key, {}).setdefault(item, set()).add(i)

        for i, purge in enumerate(purges):
            url_hosts = {url: _url_host(url) for url in purge.urls}
            problem = _check(purge, url_hosts)
            if problem is not None:
                local[i] = Outcome("permanent", problem)
                _log.warning("cloudflare_purge_invalid", error=problem)
                continue
            soft = purge.soft
            for tag in sorted(purge.keys | purge.tags):
                add(i, soft, self._zones, "tags", tag, what=tag)
            for url in sorted(purge.urls):
                zones = self._route(url_hosts[url] or "")
                variants = sorted(h for u, h in purge.url_headers if u == url) or [()]
                for headers in variants:
                    if headers:  # forwarded unchanged, for zones whose cache key has them
                        item = json.dumps({"url": _file_url(url), "headers": dict(headers)})
                        add(i, soft, zones, "file_objects", item, what=url)
                    else:
                        add(i, soft, zones, "files", _file_url(url), what=url)
            # A bare key is its tag and, with key_host, its host (purges.key_hosts).
            hosts = purge.hosts | key_hosts(purge, self._scope_rule)
            for host in sorted({_normalise_host(h) for h in hosts}):
                add(i, soft, self._route(host), "hosts", host, what=host)
            for prefix in sorted(purge.prefixes):
                host = _url_host(prefix) or ""
                authority = _authority(prefix)
                path = urlsplit(prefix).path
                if path.strip("/") or authority != host:
                    # A prefix is "a hostname followed by a path"; the port, when it is not
                    # the default, stays on it as on a URL (see _authority).
                    add(i, soft, self._route(host), "prefixes", authority + (path or "/"),
                        what=prefix)  # fmt: skip
                else:  # a prefix at the root of a default port is the whole host
                    add(i, soft, self._route(host), "hosts", host, what=prefix)
            if purge.everything:
                for zone in self._zones:
                    everything.setdefault((zone, _endpoint(zone, soft=soft)), set()).add(i)

        # purge_everything makes every other call for the zone (soft: every soft call) moot.
        # Soft ones first, so a hard one then also absorbs the zone's soft purge_everything.
        soft_first = sorted(everything.items(), key=lambda kv: kv[0][1] == "purge_cache")
        for (zone, ep), absorbed in soft_first:
            for key in [k for k in groups if k[0] is zone and (ep == "purge_cache" or k[1] == ep)]:
                for item_owners in groups.pop(key).values():
                    absorbed.update(item_owners)
            if ep == "purge_cache" and (zone, "invalidate_cache") in everything:
                absorbed.update(everything.pop((zone, "invalidate_cache")))

        calls: list[_Call] = []
        for (zone, ep, kind), owners in groups.items():
            limit = (
                zone.limits.files_per_call if kind in _FILE_KINDS else zone.limits.items_per_call
            )
            items = list(owners)
            for start in range(0, len(items), limit):
                chunk = {item: owners[item] for item in items[start : start + limit]}
                calls.append(_Call(zone, ep, kind, chunk))
        for (zone, ep), absorbed in everything.items():
            calls.append(_Call(zone, ep, "purge_everything", {}, set(absorbed)))
        return calls, local

    async def _execute(self, call: _Call) -> dict[int, Outcome]:
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

    async def _send(self, call: _Call) -> Verdict:
        account = call.zone.account
        bucket = account.urls if call.kind in _FILE_KINDS else account.calls
        cost = float(len(call.owners)) if call.kind in _FILE_KINDS else 1.0
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
        outcome = verdict.outcome()
        self._calls[outcome.status] += 1
        if outcome.status == "done":
            log.info("cloudflare_purged")
        else:
            self._last_error = verdict.error
        return verdict

    async def _post(self, call: _Call, bucket: TokenBucket, spend: Spend) -> Verdict:
        assert self._client is not None
        zone = call.zone
        secret = zone.token.get_secret_value()
        what = f"zone {zone.id} {call.endpoint} ({call.kind})"
        try:
            response = await self._client.post(
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
