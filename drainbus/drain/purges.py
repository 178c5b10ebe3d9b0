"""The purge grammar: what a `cache-drain` message may say, parsed into Purge values.

One line is one purge::

    acme-blog                  a bare site key                Purge(keys={"acme-blog"})
    tag:KEY                    a cache tag                    Purge(tags={"KEY"})
    url:URL  or  https://...   one URL                        Purge(urls={URL})
    prefix:URL                 every URL at or under a path   Purge(prefixes={URL})
    host:NAME                  every object of a DNS name     Purge(hosts={"name"})
    *                          the whole cache (admins only)  Purge(everything=True)
    soft:FORM                  any form above, soft           Purge(..., soft=True)
                               (soft:acme-blog, soft:tag:KEY, soft:https://..., soft:*, ...)
    {"tags": [...], ...}       the same as JSON, plus "soft"; a "urls" entry may be
                               {"url": URL, "headers": {NAME: VALUE}}

A soft purge marks objects stale instead of deleting them where a target can (nginx expires
the file, Cloudflare invalidates, some HTTP caches soft-purge); the scope rules are the same.

:func:`parse_purge` turns a line into a :class:`Purge` or raises :class:`DataError`. Keys
also name hosts (``key_host``), so their character set is narrow on purpose; tags are
whatever origins send in ``Cache-Tag`` (any printable UTF-8 but whitespace and ','), checked
against Cloudflare's rules so they never fail at the API.

Who may publish a purge (:func:`check_scope`, :class:`ScopeRule`) is
:mod:`drainbus.drain.scope`'s job, and how prefixes match on path boundaries
(:func:`path_under`) :mod:`drainbus.drain.url_rules`'; both are importable from here too.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

# Scope rules and URL rules live in their own modules; their names stay importable from here,
# the one place the rest of drainbus (and the branches in flight) reach for purge names.
from drainbus.drain.scope import ScopeRule, check_scope, key_host_for, key_hosts
from drainbus.drain.url_rules import (
    is_dns_name,
    path_prefix_regex,
    path_under,
    split_url,
    url_matches_prefix,
)
from drainbus.errors import DataError
from drainbus.errors import quote_input as _show

__all__ = [
    "MAX_JSON_ITEMS",
    "MAX_PREFIX_SEPARATORS",
    "MAX_TOKEN_LENGTH",
    "MAX_URL_HEADERS",
    "Purge",
    "ScopeRule",
    "UrlHeaders",
    "check_scope",
    "fold_tag",
    "key_host_for",
    "key_hosts",
    "parse_purge",
    "path_prefix_regex",
    "path_under",
    "url_matches_prefix",
]

MAX_TOKEN_LENGTH = 1024
"""Longest key or tag, in characters (Cloudflare's limit for one tag)."""

MAX_JSON_ITEMS = 1000
"""Most items in any one list of a JSON purge."""

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FORMS = (
    "a bare key, tag:KEY, url:URL, prefix:URL, host:NAME, an http(s):// URL, '*' "
    "(any of these after soft: for a soft purge) or JSON"
)
_SOFT = "soft:"
_JSON_FIELDS = ("tags", "urls", "prefixes", "hosts", "keys", "everything", "soft")


#: A URL with the request headers it was cached with: (url, ((name, value), ...)).
UrlHeaders = tuple[str, tuple[tuple[str, str], ...]]

MAX_URL_HEADERS = 32
"""Most headers on one JSON ``urls`` entry."""

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
_NONE: frozenset[str] = frozenset()  # Purge's defaults share it: 216 bytes each otherwise


@dataclass(frozen=True, slots=True)
class Purge:
    """One purge request, as parsed from one line of the `cache-drain` topic.

    ``keys`` are bare site keys (``acme-blog``): they mean "every object tagged with the key"
    and, when ``drain.key_host`` is configured, "every object of the key's host" too. ``tags``
    come from ``tag:KEY`` and the JSON ``tags`` list. URLs are absolute ``http(s)://`` URLs;
    prefixes are absolute URLs whose path marks a boundary (``https://h/docs`` covers
    ``/docs`` and ``/docs/…`` but not ``/docs2``); hosts are lower-case host names.
    ``everything`` purges the whole cache; ``soft`` asks for invalidate-and-revalidate instead
    of delete where a target supports it.

    ``url_headers`` holds the JSON ``urls`` entries given with request headers
    (``{"url": …, "headers": {…}}``, for zones whose cache key includes them) as
    ``(url, ((name, value), …))``, plus ``(url, ())`` when the same URL was also given
    plainly; each of their URLs is in ``urls`` too, so every target purges the URL and
    Cloudflare forwards the headers unchanged.
    """

    keys: frozenset[str] = _NONE
    tags: frozenset[str] = _NONE
    urls: frozenset[str] = _NONE
    url_headers: frozenset[UrlHeaders] = frozenset[UrlHeaders]()
    prefixes: frozenset[str] = _NONE
    hosts: frozenset[str] = _NONE
    everything: bool = False
    soft: bool = False


def parse_purge(line: str) -> Purge:
    """Parse one line of the `cache-drain` topic into a :class:`Purge`.

    Surrounding whitespace is ignored; URL schemes and host names come back lower-cased, paths
    and queries as given. Raises :class:`DataError` naming the bad input and the rule it
    breaks (the caller adds the line number).
    """
    text = line.strip()
    if not text:
        raise DataError(f"purge line is empty; give {_FORMS}")
    if text.startswith(_SOFT):
        return replace(_parse_soft(text[len(_SOFT) :]), soft=True)
    return _parse_form(text)


def _parse_soft(text: str) -> Purge:
    """The purge after a ``soft:`` prefix: any line form but JSON, and only one prefix."""
    if not text:
        raise DataError(
            "'soft:' names nothing to purge; follow it with a line form, as in soft:acme-blog, "
            "soft:tag:KEY, soft:https://... or soft:*"
        )
    if text.startswith("{"):
        raise DataError('a JSON purge says soft with "soft": true, not with a soft: prefix')
    if text.startswith(_SOFT):
        raise DataError("'soft:' is given twice; once is enough")
    return _parse_form(text)


def _parse_form(text: str) -> Purge:
    if text == "*":
        return Purge(everything=True)
    if text.startswith("{"):
        return _parse_json(text)
    word, colon, value = text.partition(":")
    if not colon:
        return Purge(keys=frozenset({_key(text)}))
    if word.lower() in ("http", "https"):
        return Purge(urls=frozenset({_url(text)}))
    if word == "tag":
        return Purge(tags=frozenset({_tag(value)}))
    if word == "url":
        return Purge(urls=frozenset({_url(value)}))
    if word == "prefix":
        return Purge(prefixes=frozenset({_prefix(value)}))
    if word == "host":
        return Purge(hosts=frozenset({_host_name(value)}))
    raise DataError(f"unknown purge form {_show(word + ':')}; use {_FORMS}")


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_tag(tag: str) -> str:
    """``tag`` as every target compares it: ASCII letters lower-cased, the rest as it is.

    Cloudflare matches cache tags case-insensitively ("Are Cache-Tags Case Sensitive? No,
    Cache-Tags are case insensitive. That is, tag1 and Tag1 are the same", Cloudflare's
    support article "How to Purge Cache Using Cache-Tags",
    https://support.cloudflare.com/hc/en-us/articles/206596608). The nginx index and the
    shipped Varnish VCL (``std.tolower``, which folds ASCII only) compare folded tags, so
    ``tag:mixedcase`` evicts what carries ``MixedCase`` on every target. Only ASCII letters
    fold, as Varnish can fold nothing else: ``café`` and ``CAFÉ`` stay two tags there.
    """
    return tag.translate(_ASCII_LOWER)


def _parse_json(text: str) -> Purge:
    """Parse the JSON form of a purge; every list is checked like its one-line form."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"purge line is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise DataError("purge line is JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python will convert
        raise DataError(f"purge line is not acceptable JSON: {exc}") from None
    # The text starts with '{', so what json.loads returned is an object (a dict).
    unknown = sorted(set(data) - set(_JSON_FIELDS))
    if unknown:
        raise DataError(f"unknown JSON field {_show(unknown[0])}; use {', '.join(_JSON_FIELDS)}")
    urls, url_headers = _json_urls(data)
    purge = Purge(
        tags=_json_list(data, "tags", _tag),
        urls=urls,
        url_headers=url_headers,
        prefixes=_json_list(data, "prefixes", _prefix),
        hosts=_json_list(data, "hosts", _host_name),
        keys=_json_list(data, "keys", _key),
        everything=_json_flag(data, "everything"),
        soft=_json_flag(data, "soft"),
    )
    items = (purge.tags, purge.urls, purge.prefixes, purge.hosts, purge.keys)
    if not (purge.everything or any(items)):
        raise DataError(
            "JSON purge names nothing to purge; give at least one item in tags, urls, "
            'prefixes, hosts or keys, or "everything": true'
        )
    return purge


def _json_list(data: dict[str, Any], name: str, check: Callable[[str], str]) -> frozenset[str]:
    items = data.get(name, [])
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise DataError(f"JSON field {name!r} must be a list of strings")
    if len(items) > MAX_JSON_ITEMS:
        raise DataError(
            f"JSON field {name!r} has {len(items):,} items; a list holds at most {MAX_JSON_ITEMS:,}"
        )
    checked = set()
    for index, item in enumerate(items):
        try:
            checked.add(check(item))
        except DataError as exc:
            raise DataError(f"JSON field {name!r} item {index}: {exc.message}") from None
    return frozenset(checked)


def _json_urls(data: dict[str, Any]) -> tuple[frozenset[str], frozenset[UrlHeaders]]:
    """The JSON ``urls`` list: URL strings, or ``{"url": URL, "headers": {NAME: VALUE}}``.

    Cloudflare's purge_cache takes ``files`` as URLs or as objects "with url and headers"
    for "cache keys [that include] request headers" (its API reference, and
    https://developers.cloudflare.com/cache/how-to/purge-cache/purge-by-single-file/); the
    headers are forwarded unchanged.
    """
    items = data.get("urls", [])
    if not isinstance(items, list) or not all(isinstance(i, str | dict) for i in items):
        raise DataError(
            "JSON field 'urls' must be a list of strings or "
            '{"url": URL, "headers": {NAME: VALUE}} objects'
        )
    if len(items) > MAX_JSON_ITEMS:
        raise DataError(
            f"JSON field 'urls' has {len(items):,} items; a list holds at most {MAX_JSON_ITEMS:,}"
        )
    urls: set[str] = set()
    plain: set[str] = set()
    with_headers: set[UrlHeaders] = set()
    for index, item in enumerate(items):
        try:
            if isinstance(item, str):
                url = _url(item)
                plain.add(url)
            else:
                url, headers = _url_with_headers(item)
                with_headers.add((url, headers))
        except DataError as exc:
            raise DataError(f"JSON field 'urls' item {index}: {exc.message}") from None
        urls.add(url)
    header_urls = {url for url, _ in with_headers}
    with_headers |= {(url, ()) for url in plain & header_urls}
    return frozenset(urls), frozenset(with_headers)


def _url_with_headers(item: object) -> UrlHeaders:
    if not isinstance(item, dict) or not isinstance(item.get("url"), str):
        raise DataError('a URL entry is a string or {"url": URL, "headers": {NAME: VALUE}}')
    unknown = sorted(set(item) - {"url", "headers"})
    if unknown:
        raise DataError(f"unknown URL entry field {_show(unknown[0])}; use url and headers")
    url = _url(item["url"])
    headers = item.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(name, str) and isinstance(value, str) for name, value in headers.items()
    ):
        raise DataError("URL entry 'headers' must be an object of header names to strings")
    if len(headers) > MAX_URL_HEADERS:
        raise DataError(f"URL entry has {len(headers)} headers; at most {MAX_URL_HEADERS}")
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise DataError(f"header name {_show(name)} is not an HTTP header name")
        # Only non-printable characters reach the " \t" test: printable ones added to it, or
        # its printable " ", change nothing.
        bad = next((c for c in value if not c.isprintable() and c not in " \t"), None)
        if bad is not None:
            raise DataError(f"header {name!r} value contains control character {bad!r}")
    return url, tuple(sorted(headers.items()))


def _json_flag(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise DataError(f"JSON field {name!r} must be true or false")
    return value


def _token(kind: str, value: str, pattern: re.Pattern[str], chars: str) -> str:
    """Check a key or tag: 1 to MAX_TOKEN_LENGTH characters, all of them from ``pattern``."""
    if not value:
        raise DataError(f"{kind} is empty; a {kind} is 1 to {MAX_TOKEN_LENGTH:,} characters")
    if len(value) > MAX_TOKEN_LENGTH:
        raise DataError(
            f"{kind} is {len(value)} characters; a {kind} is at most {MAX_TOKEN_LENGTH:,}"
        )
    if pattern.fullmatch(value):
        return value
    # "a" is any allowed first character: "A" or "XaX" would test each character the same.
    bad = next((c for c in value if not pattern.fullmatch("a" + c)), None)
    if bad is None:  # every character is allowed, so the first one is in the wrong place
        raise DataError(f"{kind} {_show(value)} must start with a letter or digit")
    raise DataError(
        f"{kind} {_show(value)} contains {_describe(bad)}; a {kind} may contain only {chars}"
    )


def _key(value: str) -> str:
    return _token("key", value, _KEY, "letters, digits, '.', '_' and '-'")


def _tag(value: str) -> str:
    """Check a tag: 1 to MAX_TOKEN_LENGTH printable characters, any script, no space or comma.

    Cloudflare's rules (https://developers.cloudflare.com/cache/how-to/purge-cache/purge-by-tags/
    and the support article https://support.cloudflare.com/hc/en-us/articles/206596608):
    "Spaces are not allowed in Cache-Tags"; commas separate tags in the ``Cache-Tag`` header
    ("Use commas to separate the tags"), so a tag holding one could never match; "For cache
    purges, the maximum length of cache-tags in an API call is 1,024 characters". Origins
    send non-ASCII tags (``Cache-Tag: seg-café``, as UTF-8), so any other printable
    character is a tag character; control and invisible format characters are not.
    """
    if not value:
        raise DataError(f"tag is empty; a tag is 1 to {MAX_TOKEN_LENGTH:,} characters")
    if len(value) > MAX_TOKEN_LENGTH:
        raise DataError(f"tag is {len(value)} characters; a tag is at most {MAX_TOKEN_LENGTH:,}")
    # Tested in C first. Every whitespace character but the space is unprintable (checked
    # over all of Unicode), so ',', ' ' and unprintable characters are all there is to find.
    if not value.isprintable() or "," in value or " " in value:
        bad = next(c for c in value if c == "," or c.isspace() or not c.isprintable())
        raise DataError(
            f"tag {_show(value)} contains {_describe(bad)}; a tag may contain any printable "
            "character but whitespace and ','"
        )
    return value


def _url(value: str, *, kind: str = "URL") -> str:
    """Check an absolute http(s) URL; return it with scheme and host lower-cased."""
    if not value:
        raise DataError(f"{kind} is empty; give an absolute http:// or https:// URL")
    # Printable ASCII but the space, tested in C; the character is looked for only to name it.
    if not (value.isascii() and value.isprintable()) or " " in value:
        bad = next(c for c in value if not "!" <= c <= "~")
        raise DataError(
            f"{kind} {_show(value)} contains {_describe(bad)}; a URL is printable ASCII, "
            "with anything else percent-encoded"
        )
    try:
        parts = split_url(value)
        _ = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise DataError(f"{kind} {_show(value)} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DataError(f"{kind} {_show(value)} is not an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise DataError(f"{kind} {_show(value)} has user info; drop the 'user@' part")
    if "#" in value:
        raise DataError(f"{kind} {_show(value)} has a fragment; drop the '#...' part")
    try:
        _host(parts.hostname or "")
    except DataError as exc:
        raise DataError(f"{kind} {_show(value)}: {exc.message}") from None
    rest = value[len(parts.scheme) + len("://") + len(parts.netloc) :]
    return f"{parts.scheme}://{parts.netloc.lower()}{rest}"


MAX_PREFIX_SEPARATORS = 31
"""Most '/' in a prefix's path: "Path separators are limited to 31 for a prefix"
(https://developers.cloudflare.com/cache/how-to/purge-cache/purge_by_prefix/, Limitations)."""


def _prefix(value: str) -> str:
    url = _url(value, kind="prefix URL")
    if "?" in url:
        raise DataError(f"prefix URL {_show(value)} has a query string; a prefix is a path only")
    separators = urlsplit(url).path.count("/")
    if separators > MAX_PREFIX_SEPARATORS:
        raise DataError(
            f"prefix URL {_show(value)} has {separators} '/' in its path; Cloudflare takes at "
            f"most {MAX_PREFIX_SEPARATORS} path separators in a prefix"
        )
    return url


def _host_name(value: str) -> str:
    """Check the value of ``host:`` (and JSON ``hosts``): a DNS name, not an IP address.

    Cloudflare purges by hostname ("Hostnames, such as www.example.com", the ``hosts``
    field of POST /zones/{zone_id}/purge_cache in Cloudflare's API reference;
    https://developers.cloudflare.com/cache/how-to/purge-cache/purge-by-hostname/): a zone
    serves names, so an IP address is never one of its hosts and the call is refused.
    """
    host = _host(value)
    if _is_ip(host):
        raise DataError(
            f"host {_show(value)} is an IP address; Cloudflare purges host names only, so give "
            "the site's DNS name (or purge its URLs)"
        )
    return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_host(value: str) -> str:
    """Check a DNS name or IP literal without a port; return it lower-cased (IPs canonical)."""
    host = value.lower()
    if not host:
        raise DataError("host is empty; give a DNS name or an IP address")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        ip = None
    if ip is not None and "%" not in host and (ip.version == 6 or not bracketed):
        return str(ip)
    name, _, port = host.rpartition(":")
    if port.isdigit() and name and (":" not in name or name.startswith("[")):
        raise DataError(f"host {_show(value)} has a port; give the host name alone")
    if not is_dns_name(host):
        raise DataError(
            f"host {_show(value)} is not a DNS name or IP address; a name is dot-separated "
            "labels of letters, digits and inner '-', 1 to 63 characters each"
        )
    return host


# A bus serves a few sites: the same hosts arrive with every purge, and checking one costs
# more than the rest of a URL's parse. Remembered (a refused host raises, and is not).
# Wrapped here rather than decorated: mutmut (scripts/mutate) skips decorated functions.
_host = functools.lru_cache(maxsize=4096)(_check_host)


def _describe(char: str) -> str:
    if char.isspace():
        return "whitespace"
    return repr(char) if char.isprintable() else f"control character {char!r}"
