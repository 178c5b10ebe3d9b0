"""A Cloudflare purge request body, checked as Cloudflare checks it and turned into one
drainbus purge line.

Cloudflare's ``purge_cache`` and ``invalidate_cache`` take exactly one of ``files`` (URLs, or
``{"url", "headers"}`` objects), ``tags``, ``hosts``, ``prefixes`` (host and path, no scheme)
or ``"purge_everything": true``, with at most 100 items (files: 500 on Enterprise). The
request becomes the JSON form of a purge line (:mod:`drainbus.drain.purges`): one entry on the
drain topic, so ``result.id`` names exactly what the drain receipts report on. A prefix
carries no scheme at Cloudflare and covers both; drainbus prefixes are URLs, so each becomes
its ``http://`` and ``https://`` forms.
"""

from __future__ import annotations

import json
from typing import Any

from drainbus import cloudflare_codes as codes

__all__ = ["KINDS", "CloudflareFault", "purge_line"]

KINDS = ("files", "tags", "hosts", "prefixes", "purge_everything")
"""The fields of a Cloudflare purge body, in the order its API reference lists them."""

_AS_DRAINBUS = {"files": "urls", "tags": "tags", "hosts": "hosts", "prefixes": "prefixes"}


class CloudflareFault(Exception):
    """A request Cloudflare would refuse: the HTTP status, its error code and message."""

    def __init__(self, status: int, code: int, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, sent as Retry-After with a 429


def purge_line(raw: bytes, *, soft: bool, max_items: int, max_files: int) -> bytes:
    """The drainbus purge line for the Cloudflare purge body ``raw``.

    ``soft``: the request came to ``invalidate_cache``. Raises :class:`CloudflareFault` (400)
    for what Cloudflare itself refuses: a body that is not a JSON object (6007), names no kind
    (1012), ``purge_everything`` beside another kind (1092), several kinds, a field of the
    wrong shape or more than ``max_items`` items (``max_files`` for files) (1014). The items
    themselves are checked afterwards by the drain topic's line check, as for ``pub``.
    """
    try:
        body: Any = json.loads(raw)
    except (ValueError, RecursionError):
        raise CloudflareFault(400, codes.BAD_JSON, codes.MESSAGES[codes.BAD_JSON]) from None
    if not isinstance(body, dict):
        raise _invalid("Request body must be a JSON object")
    kinds = [kind for kind in KINDS if kind in body]
    if not kinds:
        raise CloudflareFault(400, codes.NO_PURGE_KIND, codes.MESSAGES[codes.NO_PURGE_KIND])
    if "purge_everything" in kinds and len(kinds) > 1:
        raise CloudflareFault(
            400, codes.EVERYTHING_AND_OTHERS, codes.MESSAGES[codes.EVERYTHING_AND_OTHERS]
        )
    if len(kinds) > 1:
        raise _invalid(f"Request may contain only one of {', '.join(KINDS)}; got {kinds}")
    unknown = sorted(set(body) - set(KINDS))
    if unknown:
        raise _invalid(f"Unknown field {unknown[0]!r}; a purge body holds one of {KINDS}")
    kind = kinds[0]
    purge: dict[str, Any] = {"soft": True} if soft else {}
    if kind == "purge_everything":
        if body[kind] is not True:
            raise _invalid('"purge_everything" must be true')
        purge["everything"] = True
        return json.dumps(purge).encode()
    items = body[kind]
    if not isinstance(items, list) or not items:
        raise _invalid(f'"{kind}" must be a non-empty array')
    limit = max_files if kind == "files" else max_items
    if len(items) > limit:
        raise _invalid(f"Only {limit} {kind} may be purged per request, got {len(items)}")
    if kind == "prefixes":
        items = [_prefix_urls(item) for item in items]
        items = [url for pair in items for url in pair]
    purge[_AS_DRAINBUS[kind]] = items
    return json.dumps(purge, ensure_ascii=False).encode()


def _prefix_urls(item: object) -> tuple[str, str]:
    if not isinstance(item, str) or not item:
        raise _invalid(f"Invalid prefix {item!r}: a prefix is a host and a path")
    if "://" in item:
        raise _invalid(f"Invalid prefix {item!r}: a prefix carries no scheme")
    return f"http://{item}", f"https://{item}"


def _invalid(message: str) -> CloudflareFault:
    return CloudflareFault(400, codes.INVALID_FIELD, message)
