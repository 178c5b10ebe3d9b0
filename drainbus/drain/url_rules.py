"""Where a URL belongs: the path-boundary rule every target applies, and host-name checks.

One rule decides whether a path lies under a prefix (:func:`path_under`); the nginx index,
the refill guard and the HTTP PURGE targets' BAN regex (:func:`path_prefix_regex`) all use
it, so ``prefix:https://h/docs`` covers the same objects everywhere. The host helpers are
shared by the purge grammar (is this a DNS name?) and the scope check (whose host is this?).
"""

from __future__ import annotations

import functools
import re
from urllib.parse import SplitResult, urlsplit

__all__ = [
    "hostname",
    "is_dns_name",
    "path_prefix_regex",
    "path_under",
    "split_url",
    "url_matches_prefix",
]

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@functools.lru_cache(maxsize=4096)
def split_url(url: str) -> SplitResult:
    """``urlsplit(url)``, remembered for the last few thousand URLs.

    A drain batch splits each of its URLs several times (the grammar, the scope check, the
    key, the refill window), a whole batch at each step: ``urlsplit``'s own memo holds 128,
    fewer than a batch, so without this each URL was split again at every step.
    """
    return urlsplit(url)


def path_under(path: str, prefix: str) -> bool:
    """Whether ``path`` lies at or under the prefix path ``prefix``: the one boundary rule.

    Every target applies this rule (the nginx index, the refill guard, and the BAN regex
    of :func:`path_prefix_regex`). ``/docs`` covers ``/docs`` and ``/docs/…`` but not
    ``/docs2``; ``/docs/`` covers ``/docs/`` and below only; ``/`` (or an empty path) covers
    every path. Queries are not part of ``path``.
    """
    prefix = prefix or "/"
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def path_prefix_regex(prefix: str) -> str:
    """An anchored regex for request URIs (path and query) under ``prefix``, as :func:`path_under`.

    ``/docs`` gives ``^/docs([/?]|$)``; ``/docs/`` gives ``^/docs/``; ``/`` gives ``^/``.
    """
    prefix = prefix or "/"
    if prefix.endswith("/"):
        return "^" + re.escape(prefix)
    return "^" + re.escape(prefix) + "([/?]|$)"


def url_matches_prefix(url: str, prefix: str) -> bool:
    """Return whether ``url`` lies at or under ``prefix``, on a path boundary.

    Hosts compare case-insensitively; schemes, ports, queries and fragments are ignored.
    ``https://h/docs`` covers ``/docs``, ``/docs/...`` and ``/docs?x=1`` but not ``/docs2``;
    ``https://h/docs/`` covers paths starting with ``/docs/``; ``https://h`` and ``https://h/``
    cover the whole host. Returns False if either is not a URL with a host.
    """
    url_host, prefix_host = hostname(url), hostname(prefix)
    if not url_host or url_host != prefix_host:
        return False
    return path_under(split_url(url).path or "/", split_url(prefix).path or "/")


def is_dns_name(host: str) -> bool:
    """Whether ``host`` (lower case) is a DNS host name; an all-digit last label is not."""
    labels = host.split(".")
    return (
        len(host) <= 253
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def hostname(url: str) -> str | None:
    """The lower-case host of ``url``, or None when it has none or cannot be parsed."""
    try:
        return split_url(url).hostname
    except ValueError:
        return None
