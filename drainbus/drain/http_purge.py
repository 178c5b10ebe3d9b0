"""Forward purges to caches that take HTTP purge requests: Varnish, Souin, Caddy and the like.

What each template expresses
----------------------------
``url`` (required)
    URL purges: one ``method`` (PURGE) request per URL. Placeholders: ``{url}`` the whole
    URL, ``{scheme}``, ``{host}`` (host[:port]), ``{path}`` (path and query).
``tags_url``
    Tag and key purges (keys are sent as tags): one ``method`` request per
    ``tags_per_request`` tags. The URL takes no placeholders; the tags travel in a header
    template using ``{tags}`` (space-joined): ``Surrogate-Key`` for Souin, ``xkey`` or
    ``xkey-purge`` for Varnish's xkey vmod.
``ban_url``
    Host and prefix purges: one ``ban_method`` (BAN) request per host or prefix.
    Placeholders: ``{host}``, ``{path}`` (the prefix path; ``/`` for a host) and
    ``{path_regex}``, an anchored regex that keeps path boundaries (``/docs`` gives
    ``^/docs([/?]|$)``, matching ``/docs``, ``/docs/a`` and ``/docs?x`` but not ``/docs2``;
    ``/docs/`` gives ``^/docs/``, which does not match ``/docs``; see
    :func:`drainbus.drain.url_rules.path_under`).
``everything_url``
    The everything purge: one ``ban_method`` request; no placeholders.

``headers`` go with every request, rendered with all placeholders (``{url}``, ``{scheme}``,
``{host}``, ``{path}``, ``{path_regex}``, ``{tags}``); a header whose value renders empty is
left out, so one mapping serves every kind: ``{"Host": "{host}", "xkey": "{tags}"}``.
Placeholders are checked when the config is loaded; ``{`` and ``}`` mean nothing else.

``soft_headers``, when set, replace ``headers`` (same placeholders) on the requests of soft
purges, for caches with a soft form: Varnish's xkey vmod as usually wired in VCL takes
``xkey-softpurge`` where ``xkey-purge`` means hard; Souin marks entries stale instead of
deleting them when a purge carries ``Souin-Purge-Mode: soft``. Without ``soft_headers`` a soft
purge is sent like a hard one. A soft and a hard purge of the same item in one batch are
sent once, hard.

A purge kind no template expresses is skipped by default (``on_unsupported="skip"``): that
part counts as done, is logged as ``http_purge_unsupported`` and counted in
``stats().skipped``. Failing it instead would dead-letter every such purge, forever, for a
limit of the configuration rather than of the purge; ``on_unsupported="permanent"`` chooses
that anyway.

A request succeeds when its status is in ``expect_status``. 408, 425, 429 (with its
``Retry-After``), 5xx, timeouts and connection errors are retried with the shared policy of
:mod:`drainbus.drain.retry`; any other status is permanent. A purge is ``done`` when every
request carrying part of it succeeded.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Self, TypeVar
from urllib.parse import urlsplit

import anyio
import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drainbus.drain.http_target import HttpTarget
from drainbus.drain.purges import Purge
from drainbus.drain.retry import (
    DONE,
    Outcome,
    RetryPolicy,
    Sleep,
    Verdict,
    merge_outcomes,
    parse_retry_after,
    status_verdict,
    transport_verdict,
)
from drainbus.drain.scope import ScopeRule, key_hosts
from drainbus.drain.target_stats import HttpPurgeStats
from drainbus.drain.url_rules import path_prefix_regex
from drainbus.errors import DrainbusError
from drainbus.values import PositiveDuration

__all__ = ["HttpPurgeConfig", "HttpPurgeStats", "HttpPurger", "Outcome"]

_log = structlog.get_logger(__name__)

_K = TypeVar("_K")
_PLACEHOLDER: Final = re.compile(r"\{([^{}]*)\}")
_METHOD: Final = re.compile(r"[A-Z][A-Z0-9_-]*")
_ALLOWED: Final[Mapping[str, frozenset[str]]] = {
    "url": frozenset({"url", "scheme", "host", "path"}),
    "tags_url": frozenset(),
    "ban_url": frozenset({"host", "path", "path_regex"}),
    "everything_url": frozenset(),
    "headers": frozenset({"url", "scheme", "host", "path", "path_regex", "tags"}),
    "soft_headers": frozenset({"url", "scheme", "host", "path", "path_regex", "tags"}),
}


def _check_template(field: str, template: str) -> None:
    allowed = _ALLOWED[field]
    for name in _PLACEHOLDER.findall(template):
        if name not in allowed:
            expected = ", ".join("{" + a + "}" for a in sorted(allowed)) or "none"
            raise ValueError(
                f"{field} template {template!r} uses {{{name}}}: placeholders allowed: {expected}"
            )


def _render(template: str, values: Mapping[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), template)


class HttpPurgeConfig(BaseModel):
    """One cache that takes HTTP purge requests; the module docstring explains the templates.

    ``timeout`` is seconds per request; ``concurrency`` bounds requests in flight.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    method: str = "PURGE"
    url: str
    headers: dict[str, str] = Field(default_factory=dict, repr=False)  # may hold credentials
    soft_headers: dict[str, str] | None = Field(default=None, repr=False)
    expect_status: list[int] = Field(default_factory=lambda: [200, 204])
    timeout: PositiveDuration = 5.0
    tags_url: str | None = None
    tags_per_request: int = Field(default=100, ge=1)
    ban_url: str | None = None
    ban_method: str = "BAN"
    everything_url: str | None = None
    on_unsupported: Literal["skip", "permanent"] = "skip"
    concurrency: int = Field(default=8, ge=1)

    @field_validator("method", "ban_method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        if not _METHOD.fullmatch(value):
            raise ValueError(f"method {value!r} must be an upper-case HTTP method like PURGE")
        return value

    @field_validator("expect_status")
    @classmethod
    def _check_statuses(cls, value: list[int]) -> list[int]:
        if not value or not all(100 <= s <= 599 for s in value):
            raise ValueError("expect_status must list HTTP statuses between 100 and 599")
        return value

    @model_validator(mode="after")
    def _check_templates(self) -> Self:
        for field in ("url", "tags_url", "ban_url", "everything_url"):
            template = getattr(self, field)
            if template is None:
                continue
            _check_template(field, template)
            if not _PLACEHOLDER.sub("x", template).startswith(("http://", "https://")):
                raise ValueError(f"{field} {template!r} must be an http(s) URL template")
        for field, headers in (("headers", self.headers), ("soft_headers", self.soft_headers)):
            for header, template in (headers or {}).items():
                _check_template(field, template)
                if not header or any(c in header for c in " :\r\n"):
                    raise ValueError(f"header name {header!r} in {field} is invalid")
        return self

    @property
    def label(self) -> str:
        """The name used in logs: ``name``, else the host of ``url``."""
        return self.name or urlsplit(_PLACEHOLDER.sub("", self.url)).netloc or self.url


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    url: str
    headers: dict[str, str]
    what: str


#: The purges (by number) that want each item, keyed by (soft, item).
_Items = dict[tuple[bool, _K], set[int]]
#: The requests of a batch, each with the purges (by number) it carries part of.
_Planned = list[tuple[_Request, set[int]]]


def _hard_absorbs_soft(items: _Items[_K]) -> None:
    """Fold each soft item that is also purged hard into the hard one: one request does."""
    for soft, item in [key for key in items if key[0]]:
        hard = items.get((False, item))
        if hard is not None:
            hard |= items.pop((soft, item))


@dataclass(slots=True)
class _Wanted:
    """What a batch's purges name, by the kind of request that expresses it."""

    urls: _Items[str] = dataclasses.field(default_factory=dict)
    tags: _Items[str] = dataclasses.field(default_factory=dict)
    bans: _Items[tuple[str, str]] = dataclasses.field(default_factory=dict)  # (host, path)
    everything: _Items[None] = dataclasses.field(default_factory=dict)

    def hard_absorbs_soft(self) -> None:
        """Each soft item also purged hard is sent once, hard."""
        _hard_absorbs_soft(self.urls)
        _hard_absorbs_soft(self.tags)
        _hard_absorbs_soft(self.bans)
        _hard_absorbs_soft(self.everything)


def _if_supported(
    kind: str,
    items: _Items[_K],
    template: str | None,
    plan: Callable[[_Items[_K]], _Planned],
    unsupported: dict[str, set[int]],
) -> _Planned:
    """``plan``'s requests for ``items`` when a template expresses ``kind``; else none, and
    the purges wanting them noted in ``unsupported``."""
    if not items:
        return []
    if template is None:
        unsupported[kind] = set().union(*items.values())
        return []
    return plan(items)


class HttpPurger(HttpTarget):
    """Sends batches of purges to one HTTP-purge cache: a :class:`~drainbus.drain.targets.
    LocalCacheTarget` and an async context manager owning the HTTP client. ``name`` defaults
    to the config's label; ``retry`` sets the back-off; ``sleep`` and ``rng`` exist for tests.
    """

    def __init__(
        self,
        config: HttpPurgeConfig,
        *,
        name: str | None = None,
        retry: RetryPolicy | None = None,
        sleep: Sleep = anyio.sleep,
        rng: random.Random | None = None,
        scope_rule: ScopeRule | None = None,
    ) -> None:
        super().__init__(retry=retry, sleep=sleep, rng=rng, timeout=config.timeout)
        self.config = config
        self.name = name or config.label
        self._scope_rule = scope_rule
        self._log = _log.bind(target=config.label)
        self._skipped = 0

    def stats(self) -> HttpPurgeStats:
        """A snapshot of the counters."""
        return HttpPurgeStats(
            requests=dict(self._outcomes),
            retries=self._retries,
            skipped=self._skipped,
            last_error=self._last_error,
        )

    async def apply(self, purges: Sequence[Purge]) -> list[Outcome]:
        """Send a batch; return one :class:`Outcome` per purge, in order.

        Never raises for a purge's failure; raises :class:`RuntimeError` outside
        ``async with``.
        """
        self._open_client()  # raises outside 'async with'
        requests, parts = self._plan(purges)
        limit = anyio.Semaphore(self.config.concurrency)

        async def run(request: _Request, owners: set[int]) -> None:
            async with limit:
                outcome = await self._send(request)
            for i in owners:
                parts[i].append(outcome)

        async with anyio.create_task_group() as group:
            for request, owners in requests:
                group.start_soon(run, request, owners)
        return [merge_outcomes(parts[i]) for i in range(len(purges))]

    async def flush_all(self) -> int:
        """Send the configured everything-purge; the cache does not say how many it held."""
        outcome = (await self.apply([Purge(everything=True)]))[0]
        if outcome.status != "done":
            raise DrainbusError(f"{self.name}: flush failed: {outcome.error}")
        return 0

    def _plan(self, purges: Sequence[Purge]) -> tuple[_Planned, dict[int, list[Outcome]]]:
        """The requests that carry out ``purges`` (with the purges each serves), and each
        purge's outcomes so far: those of its parts no template expresses."""
        cfg = self.config
        wanted = _Wanted()
        for i, purge in enumerate(purges):
            self._collect(i, purge, wanted)
        wanted.hard_absorbs_soft()
        unsupported: dict[str, set[int]] = {}
        requests = self._url_requests(wanted.urls)
        requests += _if_supported(
            "tags", wanted.tags, cfg.tags_url, self._tag_requests, unsupported
        )
        requests += _if_supported(
            "hosts/prefixes", wanted.bans, cfg.ban_url, self._ban_requests, unsupported
        )
        requests += _if_supported(
            "everything", wanted.everything, cfg.everything_url, self._everything_requests,
            unsupported,
        )  # fmt: skip
        parts: dict[int, list[Outcome]] = {i: [] for i in range(len(purges))}
        for kind, owners in unsupported.items():
            outcome = self._unsupported(kind, len(owners))
            for i in owners:
                parts[i].append(outcome)
        return requests, parts

    def _collect(self, i: int, purge: Purge, wanted: _Wanted) -> None:
        """Add purge number ``i``'s items to ``wanted``, each kind by what it names."""
        # Soft only when the config has a soft form to send.
        soft = purge.soft and self.config.soft_headers is not None
        for url in purge.urls:
            wanted.urls.setdefault((soft, url), set()).add(i)
        for tag in purge.keys | purge.tags:
            wanted.tags.setdefault((soft, tag), set()).add(i)
        # A bare key is its tag and, with key_host, its host (scope.key_hosts), where
        # the cache can ban a host at all.
        derived = key_hosts(purge, self._scope_rule) if self.config.ban_url else frozenset()
        for host in purge.hosts | derived:
            wanted.bans.setdefault((soft, (host.lower(), "/")), set()).add(i)
        for prefix in purge.prefixes:
            split = urlsplit(prefix)
            wanted.bans.setdefault((soft, (split.netloc.lower(), split.path or "/")), set()).add(i)
        if purge.everything:
            wanted.everything.setdefault((soft, None), set()).add(i)

    def _url_requests(self, urls: _Items[str]) -> _Planned:
        """One request per URL."""
        requests = []
        for (soft, url), owners in urls.items():
            split = urlsplit(url)
            path = split.path or "/"
            values = {
                "url": url,
                "scheme": split.scheme,
                "host": split.netloc,
                "path": f"{path}?{split.query}" if split.query else path,
            }
            request = self._request(
                self.config.method, self.config.url, values, f"URL {url}", soft=soft
            )
            requests.append((request, owners))
        return requests

    def _tag_requests(self, tags: _Items[str]) -> _Planned:
        """One request per ``tags_per_request`` tags, hard ones and soft ones apart."""
        cfg = self.config
        requests = []
        for soft in (False, True):
            ordered = sorted(tag for tag_soft, tag in tags if tag_soft == soft)
            for start in range(0, len(ordered), cfg.tags_per_request):
                chunk = ordered[start : start + cfg.tags_per_request]
                values = {"tags": " ".join(chunk)}
                what = f"{len(chunk)} tags"
                request = self._request(cfg.method, cfg.tags_url, values, what, soft=soft)
                requests.append((request, set().union(*(tags[soft, t] for t in chunk))))
        return requests

    def _ban_requests(self, bans: _Items[tuple[str, str]]) -> _Planned:
        """One ban per host or prefix (a host is its prefix ``/``)."""
        cfg = self.config
        requests = []
        for (soft, (host, path)), owners in bans.items():
            values = {"host": host, "path": path, "path_regex": path_prefix_regex(path)}
            what = f"prefix {host}{path}" if path != "/" else f"host {host}"
            request = self._request(cfg.ban_method, cfg.ban_url, values, what, soft=soft)
            requests.append((request, owners))
        return requests

    def _everything_requests(self, everything: _Items[None]) -> _Planned:
        """One ban of everything (hard, or soft when no purge wants it hard)."""
        cfg = self.config
        return [
            (self._request(cfg.ban_method, cfg.everything_url, {}, "everything", soft=soft), owners)
            for (soft, _), owners in everything.items()
        ]

    def _unsupported(self, kind: str, purges: int) -> Outcome:
        """The outcome of ``purges`` purges' ``kind`` part, which no template expresses."""
        self._skipped += purges
        if self.config.on_unsupported == "skip":
            self._log.warning("http_purge_unsupported", kind=kind, purges=purges)
            return DONE
        self._log.error("http_purge_unsupported", kind=kind, purges=purges)
        return Outcome(
            "permanent", f"{self.config.label}: no template configured for {kind} purges"
        )

    def _request(
        self,
        method: str,
        template: str | None,
        values: Mapping[str, str],
        what: str,
        *,
        soft: bool = False,
    ) -> _Request:
        assert template is not None
        templates = self.config.soft_headers if soft else self.config.headers
        headers = {}
        for name, header_template in (templates or {}).items():
            value = _render(header_template, values)
            if value:
                headers[name] = value
        return _Request(
            method, _render(template, values), headers, f"soft {what}" if soft else what
        )

    async def _send(self, request: _Request) -> Outcome:
        client = self._open_client()
        what = f"{self.config.label} {request.method} {request.what}"
        log = self._log.bind(method=request.method, purge=request.what)
        expect = self.config.expect_status

        async def attempt() -> Verdict:
            try:
                response = await client.request(
                    request.method,
                    request.url,
                    # UTF-8, as origins send non-ASCII tags (httpx would refuse non-ASCII).
                    headers=[
                        (name.encode(), value.encode()) for name, value in request.headers.items()
                    ],
                )
            except httpx.InvalidURL as exc:
                return Verdict("permanent", f"{what}: invalid URL {request.url!r}: {exc}")
            except httpx.HTTPError as exc:
                return transport_verdict(exc, what=what)
            retry_after = None
            if response.status_code == 429:
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            return status_verdict(
                response.status_code,
                ok=response.status_code in expect,
                error=f"{what}: HTTP {response.status_code}, expected one of {expect}",
                retry_after=retry_after,
            )

        verdict = await self._retrying(attempt, log)
        outcome = verdict.outcome()
        if outcome.status == "done":
            log.debug("http_purged")
        elif outcome.status == "permanent":
            log.error("http_purge_refused", error=verdict.error)
        return outcome
