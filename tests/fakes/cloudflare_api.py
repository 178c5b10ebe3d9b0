"""A local HTTP server that behaves like Cloudflare's purge API, for tests.

``FakeCloudflare`` serves ``POST /client/v4/zones/{zone}/purge_cache`` and
``…/invalidate_cache`` on 127.0.0.1 from a thread, so it works the same from sync and async
tests. It checks what Cloudflare checks and answers the way Cloudflare answers:

* the ``Authorization: Bearer`` token must be known, else 403 with code 10000
  ("Authentication error");
* the body must hold exactly one of ``files``, ``tags``, ``hosts``, ``prefixes``,
  ``purge_everything: true``, else 400: code 1092 with the API reference's message for
  ``purge_everything`` beside another kind, code 1014 for any other shape;
* at most 100 items per call (files: 500 on Enterprise), else 400 code 1014;
* items must be well-formed: files are http(s) URLs (or ``{"url": …}``), prefixes carry no
  scheme and no query string and at most 31 '/', tags are 1..1024 characters without spaces
  or commas, hosts are bare names and not IP addresses; else 400
  code 1014 (also for tags listed in ``bad_tags``);
* a token bucket per account (the token's account) for tag/host/prefix/everything calls and
  one for URLs, with the plan's figures or the test's: a call that finds too few tokens gets
  429 with code 1134 and the API reference's message ("Unable to purge, rate limit reached.
  Please wait and consider throttling your request speed") and an integer ``Retry-After``,
  and spends nothing.

Codes are Cloudflare's: 1092 and 1134 are the 4XX examples of POST /zones/{zone_id}/
purge_cache in Cloudflare's API reference; 10000, 7003 and 1014 are what its API answers
for a bad token, an unknown route and a malformed purge field.

Every answer from a bucket carries ``Ratelimit: "default";r=N;t=S`` (N whole tokens left;
S seconds until the next token when N is 0, else until the bucket is full) and
``Ratelimit-Policy``. A success carries a fresh purge id in ``result.id``, as Cloudflare's
does. Tests can script the next answers (:meth:`FakeCloudflare.fail_next`,
:meth:`FakeCloudflare.hang_next`), hold answers until told (:meth:`FakeCloudflare.hold_next`,
:meth:`FakeCloudflare.release`), and read every request back (:attr:`received`,
:attr:`accepted`, :attr:`rejected`), or wait for a count of them without sleeping
(:meth:`FakeCloudflare.wait_for`, :meth:`FakeCloudflare.wait_for_async`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

__all__ = ["FakeCloudflare", "Received"]

# Cloudflare's published figures, kept apart from drainbus's own copy on purpose:
# (calls bucket, calls per second, URLs per second, files per call).
PLANS: dict[str, tuple[float, float, float, int]] = {
    "free": (25, 5 / 60, 800, 100),
    "pro": (25, 5, 1500, 100),
    "business": (50, 10, 1500, 100),
    "enterprise": (500, 50, 3000, 500),
}
KINDS = ("files", "tags", "hosts", "prefixes", "purge_everything")
_PATH = re.compile(r"/client/v4/zones/([^/]+)/(purge_cache|invalidate_cache)")


@dataclass(frozen=True)
class Received:
    """One request the fake received: ``status`` is ``None`` for a request left hanging;
    ``reference`` is the purge id a success answered with."""

    zone: str
    endpoint: str
    body: Any
    status: int | None
    code: int | None
    at: float  # time.monotonic() on arrival
    reference: str | None = None

    @property
    def kind(self) -> str | None:
        """The purge kind of the body, if it had exactly one."""
        kinds = [k for k in KINDS if isinstance(self.body, dict) and k in self.body]
        return kinds[0] if len(kinds) == 1 else None

    @property
    def items(self) -> list[Any]:
        """The items of the body (empty for purge_everything)."""
        value = self.body.get(self.kind) if self.kind else None
        return value if isinstance(value, list) else []


@dataclass
class _Bucket:
    capacity: float
    rate: float
    tokens: float
    stamp: float

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def header(self) -> dict[str, str]:
        left = math.floor(self.tokens + 1e-9)
        if left >= 1:
            reset = (self.capacity - self.tokens) / self.rate
        else:
            reset = (1 - self.tokens) / self.rate
        reset = math.ceil(reset * 1000) / 1000
        return {
            "Ratelimit": f'"default";r={left};t={reset:g}',
            "Ratelimit-Policy": f'"default";q={self.capacity:g};w={self.capacity / self.rate:g}',
        }


@dataclass
class _Script:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    hang: bool = False


@dataclass
class _State:
    received: list[Received] = field(default_factory=list)
    scripts: list[_Script] = field(default_factory=list)
    buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)


def _error_body(code: int | None, message: str) -> dict[str, Any]:
    """A failure as Cloudflare's API answers it; no code: an empty ``errors`` list."""
    return {
        "success": False,
        "errors": [] if code is None else [{"code": code, "message": message}],
        "messages": [],
        "result": None,
    }


class FakeCloudflare:
    """A fake Cloudflare purge API on a free local port; a context manager (sync or async).

    ``tokens`` maps each valid token to its account. ``bucket`` = (capacity, refill per
    second) replaces the plan's figures for tag/host/prefix/everything calls; ``url_rate``
    replaces URLs per second. A hung request is answered after ``hang_seconds`` or at stop.
    """

    def __init__(
        self,
        *,
        tokens: Mapping[str, str] | None = None,
        plan: str = "free",
        bucket: tuple[float, float] | None = None,
        url_rate: float | None = None,
        bad_tags: Iterable[str] = (),
        ratelimit_headers: bool = True,
        hang_seconds: float = 5.0,
        answer_delay: float = 0.0,
    ) -> None:
        calls_bucket, calls_rate, urls_rate, files_per_call = PLANS[plan]
        self.tokens = dict(tokens or {"test-token": "test-account"})
        self.plan = plan
        self.calls_bucket = bucket or (calls_bucket, calls_rate)
        self.url_rate = url_rate or urls_rate
        self.files_per_call = files_per_call
        self.bad_tags = frozenset(bad_tags)
        self.ratelimit_headers = ratelimit_headers
        self.hang_seconds = hang_seconds
        self.answer_delay = answer_delay  # seconds each answer takes, like the real API's latency
        self._state = _State()
        self._cond = threading.Condition()
        self._release = threading.Event()
        self._holds = 0
        self._gate = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        """The base URL to configure as a zone's ``api_base``."""
        assert self._server is not None, "FakeCloudflare is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/client/v4"

    def start(self) -> None:
        """Listen on a free port and serve from a daemon thread."""
        fake = self

        class Handler(_Handler):
            owner = fake

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Release hung and held requests and stop serving."""
        self._release.set()
        self._gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- scripting ---------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 503,
        code: int | None = None,
        message: str = "Service unavailable",
        body: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``n`` requests with ``status`` (and this body and headers)."""
        with self._cond:
            for _ in range(n):
                self._state.scripts.append(
                    _Script(status, body or _error_body(code, message), dict(headers or {}))
                )

    def hang_next(self, n: int = 1) -> None:
        """Leave the next ``n`` requests unanswered (the client should time out)."""
        with self._cond:
            for _ in range(n):
                self._state.scripts.append(_Script(0, {}, {}, hang=True))

    def hold_next(self, n: int = 1) -> None:
        """Handle the next ``n`` requests as usual (recorded and counted on arrival) but
        send no answer until :meth:`release` (or stop)."""
        with self._cond:
            self._holds += n
            self._gate.clear()

    def release(self) -> None:
        """Answer every held request."""
        self._gate.set()

    # -- reading back ------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        """Every request, in arrival order."""
        with self._cond:
            return list(self._state.received)

    @property
    def accepted(self) -> list[Received]:
        """Requests answered with success."""
        return [r for r in self.received if r.status == 200]

    @property
    def rejected(self) -> list[Received]:
        """Requests answered with an error, or left hanging."""
        return [r for r in self.received if r.status != 200]

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Received]:
        """Block until ``n`` requests have been received; raise TimeoutError after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._state.received) >= n, timeout):
                got = len(self._state.received)
                raise TimeoutError(f"FakeCloudflare received {got} of {n} requests")
            return list(self._state.received)

    def wait_until(
        self, done: Callable[[list[Received]], bool], timeout: float = 5.0
    ) -> list[Received]:
        """Block until ``done(received)`` is true; raise TimeoutError after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: done(self._state.received), timeout):
                got = len(self._state.received)
                raise TimeoutError(f"FakeCloudflare: not done after {got} requests")
            return list(self._state.received)

    async def wait_for_async(self, n: int, timeout: float = 5.0) -> list[Received]:
        """:meth:`wait_for` for async tests (waits in a worker thread)."""
        return await asyncio.to_thread(self.wait_for, n, timeout)

    # -- the API -----------------------------------------------------------------------------

    def _record(
        self,
        zone: str,
        endpoint: str,
        body: Any,
        status: int | None,
        code: int | None,
        reference: str | None,
    ) -> None:
        with self._cond:
            self._state.received.append(
                Received(zone, endpoint, body, status, code, time.monotonic(), reference)
            )
            self._cond.notify_all()

    def _bucket(self, account: str, which: str) -> _Bucket:
        key = (account, which)
        if key not in self._state.buckets:
            capacity, rate = (
                self.calls_bucket if which == "calls" else (self.url_rate, self.url_rate)
            )
            self._state.buckets[key] = _Bucket(capacity, rate, capacity, time.monotonic())
        return self._state.buckets[key]

    def handle(
        self, path: str, authorization: str | None, raw: bytes
    ) -> tuple[int | None, dict[str, Any], dict[str, str]]:
        """Answer one request: (status or None to hang, JSON body, extra headers)."""
        match = _PATH.fullmatch(path)
        if match is None:
            return (
                404,
                _error_body(
                    7003, f"Could not route to {path}, perhaps your object identifier is invalid?"
                ),
                {},
            )
        zone, endpoint = match.groups()
        try:
            body: Any = json.loads(raw or b"null")
        except ValueError:
            body = None

        def answer(
            status: int | None, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> tuple[int | None, dict[str, Any], dict[str, str]]:
            errors = payload.get("errors") or [{}]
            result = payload.get("result")
            reference = result.get("id") if isinstance(result, dict) else None
            self._record(zone, endpoint, body, status, errors[0].get("code"), reference)
            if held:
                self._gate.wait()
            return status, payload, headers or {}

        with self._cond:
            script = self._state.scripts.pop(0) if self._state.scripts else None
            held = self._holds > 0
            self._holds -= held
        if script is not None:
            if script.hang:
                return answer(None, {})
            return answer(script.status, script.body, script.headers)

        scheme, _, token = (authorization or "").partition(" ")
        account = self.tokens.get(token) if scheme == "Bearer" else None
        if account is None:
            return answer(403, _error_body(10000, "Authentication error"))

        problem = self._validate(body)
        if problem is not None:
            return answer(400, _error_body(*problem))

        which = "urls" if "files" in body else "calls"
        cost = float(len(body["files"])) if which == "urls" else 1.0
        with self._cond:
            bucket = self._bucket(account, which)
            bucket.refill(time.monotonic())
            headers = bucket.header() if self.ratelimit_headers else {}
            if bucket.tokens < cost:
                retry_after = max(1, math.ceil((cost - bucket.tokens) / bucket.rate))
                headers["Retry-After"] = str(retry_after)
                rate_limited = True
            else:
                bucket.tokens -= cost
                headers = bucket.header() if self.ratelimit_headers else {}
                rate_limited = False
        if rate_limited:
            message = (
                "Unable to purge, rate limit reached. "
                "Please wait and consider throttling your request speed"
            )
            return answer(429, _error_body(1134, message), headers)
        ok = {"success": True, "errors": [], "messages": [], "result": {"id": uuid.uuid4().hex}}
        return answer(200, ok, headers)

    def _validate(self, body: Any) -> tuple[int, str] | None:
        if not isinstance(body, dict):
            return 1014, "Request must be a JSON object"
        kinds = [k for k in KINDS if k in body]
        if "purge_everything" in kinds and len(kinds) > 1:
            return 1092, (
                'Request cannot contain "purge_everything" and any of "files", "tags", '
                '"hosts" or "prefixes"'
            )
        if len(kinds) != 1 or len(body) != 1:
            return 1014, "Request must contain exactly one of " + ", ".join(KINDS)
        kind = kinds[0]
        if kind == "purge_everything":
            return None if body[kind] is True else (1014, "purge_everything must be true")
        items = body[kind]
        if not isinstance(items, list) or not items:
            return 1014, f'"{kind}" must be a non-empty array'
        limit = self.files_per_call if kind == "files" else 100
        if len(items) > limit:
            return 1014, f"Only {limit} {kind} may be purged per request, got {len(items)}"
        for item in items:
            if kind == "files" and isinstance(item, dict):
                # {"url", "headers"}: headers a map of strings (Cloudflare's schema).
                headers = item.get("headers", {})
                if set(item) - {"url", "headers"} or not (
                    isinstance(headers, dict)
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
                ):
                    return 1014, f"Invalid files item {item!r}"
            value = item.get("url") if kind == "files" and isinstance(item, dict) else item
            if not isinstance(value, str) or not value:
                return 1014, f"Invalid {kind} item {item!r}"
            if kind == "files" and not value.startswith(("http://", "https://")):
                return 1014, f"Invalid url {value!r}"
            if kind == "prefixes" and ("://" in value or "?" in value):
                return 1014, f"Invalid prefix {value!r}: no scheme or query string"
            # "Path separators are limited to 31 for a prefix" (purge_by_prefix docs).
            if kind == "prefixes" and value.count("/") > 31:
                return 1014, f"Invalid prefix {value[:40]!r}: more than 31 path separators"
            # "Spaces are not allowed in Cache-Tags"; commas separate tags (purge-by-tags docs).
            if kind == "tags" and (
                len(value) > 1024
                or value in self.bad_tags
                or any(c == "," or c.isspace() for c in value)
            ):
                return 1014, f"Invalid tag {value[:40]!r}"
            if kind == "hosts" and ("/" in value or ":" in value or _is_ip(value)):
                return 1014, f"Invalid host {value!r}"
        return None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class _Handler(BaseHTTPRequestHandler):
    owner: FakeCloudflare
    protocol_version = "HTTP/1.1"
    timeout = 10
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.owner.answer_delay:
            time.sleep(self.owner.answer_delay)
        status, payload, headers = self.owner.handle(
            self.path, self.headers.get("Authorization"), raw
        )
        if status is None:
            self.owner._release.wait(self.owner.hang_seconds)
            self.close_connection = True
            status, payload = 504, _error_body(None, "Gateway timeout")
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up on us

    def log_message(self, format: str, *args: Any) -> None:
        pass
