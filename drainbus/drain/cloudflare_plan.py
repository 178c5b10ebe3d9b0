"""Which Cloudflare API calls a batch of purges becomes: checked, routed, coalesced, packed.

Steps 1 to 3 of the forwarder's work (:mod:`drainbus.drain.cloudflare` sends the calls):

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
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import urlsplit

import structlog
from pydantic import SecretStr

from drainbus.drain.cloudflare_zones import CloudflareZoneConfig, PlanLimits, normalise_host
from drainbus.drain.purges import MAX_PREFIX_SEPARATORS, MAX_TOKEN_LENGTH, Purge
from drainbus.drain.retry import Outcome, TokenBucket
from drainbus.drain.scope import ScopeRule, key_hosts

__all__ = ["FILE_KINDS", "MAX_TAG_LENGTH", "Account", "Call", "Planner", "Zone"]

_log = structlog.get_logger("drainbus.drain.cloudflare")

# "file_objects": files sent as {"url", "headers"} objects (a call never mixes them with
# plain URL strings, the two forms of ``files`` in Cloudflare's schema).
Kind = Literal["files", "file_objects", "tags", "hosts", "prefixes", "purge_everything"]
FILE_KINDS: Final = frozenset({"files", "file_objects"})
Endpoint = Literal["purge_cache", "invalidate_cache"]
MAX_TAG_LENGTH: Final = MAX_TOKEN_LENGTH  # one limit for keys and tags, Cloudflare's


@dataclass(eq=False, slots=True)
class Account:
    label: str
    calls: TokenBucket
    urls: TokenBucket


@dataclass(eq=False, slots=True)
class Zone:
    config: CloudflareZoneConfig
    token: SecretStr
    account: Account
    limits: PlanLimits
    exact: frozenset[str]
    wildcards: tuple[str, ...]  # ".example.com" for "*.example.com"

    @property
    def id(self) -> str:
        return self.config.zone_id


@dataclass(eq=False, slots=True)
class Call:
    zone: Zone
    endpoint: Endpoint
    kind: Kind
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

    def split(self) -> tuple[Call, Call]:
        ordered = sorted(self.purges)
        halves = (set(ordered[: len(ordered) // 2]), set(ordered[len(ordered) // 2 :]))
        calls = []
        for half in halves:
            owners = {item: owner & half for item, owner in self.owners.items() if owner & half}
            calls.append(Call(self.zone, self.endpoint, self.kind, owners))
        return calls[0], calls[1]


def _endpoint(zone: Zone, *, soft: bool) -> Endpoint:
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
    return normalise_host(host)


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
    host = normalise_host(parts.hostname or "")
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
        if problem := _tag_problem(tag):
            return problem
    for url in sorted(purge.urls):
        if url_hosts[url] is None:
            return f"URL {url!r} is not an absolute http(s) URL"
    for prefix in sorted(purge.prefixes):
        if problem := _prefix_problem(prefix):
            return problem
    for host in sorted(purge.hosts):
        if not normalise_host(host):
            return "an empty host cannot be purged"
        if _is_ip_address(host):
            return f"host {host!r} is an IP address: Cloudflare purges host names only"
    return None


def _tag_problem(tag: str) -> str | None:
    shown = tag[:40] + "…" if len(tag) > 40 else tag
    if not tag or len(tag) > MAX_TAG_LENGTH:
        return f"tag {shown!r} has {len(tag)} characters: Cloudflare accepts 1 to {MAX_TAG_LENGTH}"
    # "Spaces are not allowed in Cache-Tags"; commas separate them (purge-by-tags docs).
    if any(c == "," or c.isspace() or not c.isprintable() for c in tag):
        return f"tag {shown!r} holds a space, comma or control character: Cloudflare refuses it"
    return None


def _prefix_problem(prefix: str) -> str | None:
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
    return None


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class Planner:
    """Turns a batch of purges into calls for ``zones``; counts the parts no zone serves.

    ``scope_rule`` gives bare keys their host (``key_host``): a key is purged as its tag and
    its host, as on every target.
    """

    def __init__(self, zones: Sequence[Zone], scope_rule: ScopeRule | None) -> None:
        self.zones = list(zones)
        self.unrouted = 0
        self._scope_rule = scope_rule
        # Filled by plan(): (zone, endpoint, kind) -> item -> indices of the purges asking.
        self._groups: dict[tuple[Zone, Endpoint, Kind], dict[str, set[int]]] = {}
        self._everything: dict[tuple[Zone, Endpoint], set[int]] = {}

    def route(self, host: str) -> list[Zone]:
        """The zones serving ``host``: exact names first, then the longest wildcard, then
        the catch-all zones."""
        exact = [zone for zone in self.zones if host in zone.exact]
        if exact:
            return exact
        best, matched = 0, list[Zone]()
        for zone in self.zones:
            for suffix in zone.wildcards:
                if host.endswith(suffix) and len(suffix) >= best:
                    if len(suffix) > best:
                        best, matched = len(suffix), []
                    matched.append(zone)
                    break
        if matched:
            return matched
        return [zone for zone in self.zones if not zone.config.hosts]

    def plan(self, purges: Sequence[Purge]) -> tuple[list[Call], dict[int, Outcome]]:
        """The calls carrying ``purges``, and the outcomes of those refused without a call."""
        self._groups, self._everything = {}, {}
        refused: dict[int, Outcome] = {}
        for i, purge in enumerate(purges):
            url_hosts = {url: _url_host(url) for url in purge.urls}
            problem = _check(purge, url_hosts)
            if problem is not None:
                refused[i] = Outcome("permanent", problem)
                _log.warning("cloudflare_purge_invalid", error=problem)
                continue
            self._add_tags(i, purge)
            self._add_urls(i, purge, url_hosts)
            self._add_hosts(i, purge)
            self._add_prefixes(i, purge)
            if purge.everything:
                for zone in self.zones:
                    key = (zone, _endpoint(zone, soft=purge.soft))
                    self._everything.setdefault(key, set()).add(i)
        self._absorb_into_everything()
        return self._pack(), refused

    def _add(
        self, i: int, soft: bool, zones: list[Zone], kind: Kind, item: str, *, what: str
    ) -> None:
        if not zones:
            self.unrouted += 1
            _log.info("cloudflare_purge_unrouted", item=what)
        for zone in zones:
            key = (zone, _endpoint(zone, soft=soft), kind)
            self._groups.setdefault(key, {}).setdefault(item, set()).add(i)

    def _add_tags(self, i: int, purge: Purge) -> None:
        for tag in sorted(purge.keys | purge.tags):
            self._add(i, purge.soft, self.zones, "tags", tag, what=tag)

    def _add_urls(self, i: int, purge: Purge, url_hosts: Mapping[str, str | None]) -> None:
        for url in sorted(purge.urls):
            zones = self.route(url_hosts[url] or "")
            variants = sorted(h for u, h in purge.url_headers if u == url) or [()]
            for headers in variants:
                if headers:  # forwarded unchanged, for zones whose cache key has them
                    item = json.dumps({"url": _file_url(url), "headers": dict(headers)})
                    self._add(i, purge.soft, zones, "file_objects", item, what=url)
                else:
                    self._add(i, purge.soft, zones, "files", _file_url(url), what=url)

    def _add_hosts(self, i: int, purge: Purge) -> None:
        # A bare key is its tag and, with key_host, its host (scope.key_hosts).
        hosts = purge.hosts | key_hosts(purge, self._scope_rule)
        for host in sorted({normalise_host(h) for h in hosts}):
            self._add(i, purge.soft, self.route(host), "hosts", host, what=host)

    def _add_prefixes(self, i: int, purge: Purge) -> None:
        for prefix in sorted(purge.prefixes):
            host = _url_host(prefix) or ""
            authority = _authority(prefix)
            path = urlsplit(prefix).path
            zones = self.route(host)
            if path.strip("/") or authority != host:
                # A prefix is "a hostname followed by a path"; the port, when it is not the
                # default, stays on it as on a URL (see _authority).
                self._add(i, purge.soft, zones, "prefixes", authority + (path or "/"), what=prefix)
            else:  # a prefix at the root of a default port is the whole host
                self._add(i, purge.soft, zones, "hosts", host, what=prefix)

    def _absorb_into_everything(self) -> None:
        """purge_everything makes every other call for the zone (soft: every soft call) moot.

        Soft ones first, so a hard one then also absorbs the zone's soft purge_everything.
        """
        everything, groups = self._everything, self._groups
        soft_first = sorted(everything.items(), key=lambda kv: kv[0][1] == "purge_cache")
        for (zone, ep), absorbed in soft_first:
            for key in [k for k in groups if k[0] is zone and (ep == "purge_cache" or k[1] == ep)]:
                for item_owners in groups.pop(key).values():
                    absorbed.update(item_owners)
            if ep == "purge_cache" and (zone, "invalidate_cache") in everything:
                absorbed.update(everything.pop((zone, "invalidate_cache")))

    def _pack(self) -> list[Call]:
        """The calls: each group's items in chunks of the plan's call size."""
        calls: list[Call] = []
        for (zone, ep, kind), owners in self._groups.items():
            limits = zone.limits
            limit = limits.files_per_call if kind in FILE_KINDS else limits.items_per_call
            items = list(owners)
            for start in range(0, len(items), limit):
                chunk = {item: owners[item] for item in items[start : start + limit]}
                calls.append(Call(zone, ep, kind, chunk))
        for (zone, ep), absorbed in self._everything.items():
            calls.append(Call(zone, ep, "purge_everything", {}, set(absorbed)))
        return calls
