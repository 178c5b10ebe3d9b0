"""Cloudflare API error codes and messages, in one place.

Both sides of drainbus speak Cloudflare's purge API: the drain's forwarder
(:mod:`drainbus.drain.cloudflare`) reads these codes in Cloudflare's answers, and the
Cloudflare-compatible endpoint (:mod:`drainbus.http`) sends them for the same faults. The
numbers are Cloudflare's: 1092 and 1134 are the 4XX examples of ``POST
/zones/{zone_id}/purge_cache`` in its API reference; 10000, 9109, 7000, 7003, 6007, 1012 and
1014 are what its API answers for a bad token, a resource the token may not touch, an unknown
route, a body that is not JSON, a body naming no kind of purge and a malformed purge field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = [
    "AUTHENTICATION_ERROR",
    "BAD_JSON",
    "EVERYTHING_AND_OTHERS",
    "INVALID_FIELD",
    "MESSAGES",
    "NO_PURGE_KIND",
    "NO_ROUTE",
    "ONLY_ENTERPRISE_TAGS",
    "RATE_LIMITED",
    "ROUTE_INVALID",
    "SCOPE_BY_ENVIRONMENT",
    "UNAUTHORIZED",
    "route_invalid",
]

AUTHENTICATION_ERROR: Final = 10000  # "Authentication error": no valid token
UNAUTHORIZED: Final = 9109  # "Unauthorized to access requested resource"
NO_ROUTE: Final = 7000  # "No route for that URI"
ROUTE_INVALID: Final = 7003  # "Could not route to …, perhaps your object identifier is invalid?"
BAD_JSON: Final = 6007  # "Malformed JSON in request body"
NO_PURGE_KIND: Final = 1012  # 'Request must contain one of "purge_everything", "files", …'
INVALID_FIELD: Final = 1014  # a purge field of the wrong shape or with a bad item
EVERYTHING_AND_OTHERS: Final = 1092  # "purge_everything" beside another kind
ONLY_ENTERPRISE_TAGS: Final = 1107  # "Only enterprise zones can purge by tag" (older plans)
RATE_LIMITED: Final = 1134  # "Unable to purge, rate limit reached. …"
SCOPE_BY_ENVIRONMENT: Final = 1136  # a URL purge of an environment chosen by IP, country, …


MESSAGES: Final[Mapping[int, str]] = {
    AUTHENTICATION_ERROR: "Authentication error",
    UNAUTHORIZED: "Unauthorized to access requested resource",
    NO_ROUTE: "No route for that URI",
    BAD_JSON: "Malformed JSON in request body",
    NO_PURGE_KIND: (
        'Request must contain one of "purge_everything", "files", "tags", "hosts" or "prefixes"'
    ),
    EVERYTHING_AND_OTHERS: (
        'Request cannot contain "purge_everything" and any of "files", "tags", "hosts" or '
        '"prefixes"'
    ),
    RATE_LIMITED: (
        "Unable to purge, rate limit reached. Please wait and consider throttling your "
        "request speed"
    ),
}
"""Cloudflare's own wording for the codes that always say the same thing."""


def route_invalid(path: str) -> str:
    """Cloudflare's 7003 message for ``path``."""
    return f"Could not route to {path}, perhaps your object identifier is invalid?"
