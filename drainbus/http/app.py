"""The Cloudflare-compatible purge API as an ASGI (Starlette) application.

``POST /client/v4/zones/{zone}/purge_cache`` (and ``invalidate_cache``, a soft purge) with a
bearer token from ``drainbus tokens add``. A request is answered as Cloudflare answers it
(same envelope, statuses and error codes, :mod:`drainbus.cloudflare_codes`) and becomes one
purge line on the drain topic, published as the token's user through the path ``ssh bus pub``
takes: the topic's access rule, the drain's line check (a bad purge: 400, one outside the
user's scope: 403), then :func:`drainbus.publishing.publish_as` (so per-user limits apply;
a retry-later refusal is Cloudflare's 429). ``result.id`` is the stream id of the entry.

| fault                                          | status | code       |
|------------------------------------------------|--------|------------|
| no token, unknown token                        | 401    | 10000      |
| topic or purge outside the user's rights       | 403    | 9109       |
| zone id not configured, unknown path           | 404    | 7003, 7000 |
| body not JSON                                  | 400    | 6007       |
| no purge kind / everything and another kind    | 400    | 1012, 1092 |
| several kinds, too many items, a bad item      | 400    | 1014       |
| body over 1 MiB                                | 413    | 1014       |
| rate limit or quota (exit 75)                  | 429    | 1134       |
| Redis unavailable (exit 69)                    | 503    | 503        |
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from drainbus import cloudflare_codes as codes
from drainbus.acl import Access
from drainbus.bus import Bus
from drainbus.bus.streams import format_id
from drainbus.config import Settings
from drainbus.drain.cloudflare import PLAN_LIMITS, PlanLimits
from drainbus.errors import DrainbusError, ExitCode
from drainbus.http.purge_body import CloudflareFault, purge_line
from drainbus.http.tokens import TokenStore
from drainbus.identity import Identity
from drainbus.metrics import REGISTRY
from drainbus.publishing import publish_as

__all__ = ["HTTP_REQUESTS", "MAX_BODY_BYTES", "build_app"]

log = structlog.get_logger(__name__)

MAX_BODY_BYTES = 1024 * 1024
"""Largest request body read: 500 URLs of 2 KiB each fit."""

HTTP_REQUESTS = Counter(
    "drainbus_http_requests", "Cloudflare-compatible purge API requests, by endpoint and status",
    ["endpoint", "status"], registry=REGISTRY,
)  # fmt: skip
HTTP_SECONDS = Histogram(
    "drainbus_http_request_seconds", "From a purge API request's arrival to its answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)  # fmt: skip

LineCheck = Callable[[Identity, bytes], None]  # as ssh pub runs it: raises to refuse
_ENDPOINTS = ("purge_cache", "invalidate_cache")
_DEFAULT_LIMITS = PlanLimits(calls_per_second=0, calls_bucket=0, urls_per_second=0)


def _envelope(result: dict[str, Any] | None, errors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"success": not errors, "errors": errors, "messages": [], "result": result}


def _failure(
    fault: CloudflareFault,
    extra: Sequence[dict[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    errors = [{"code": fault.code, "message": fault.message}, *extra]
    return JSONResponse(_envelope(None, errors), fault.status, headers=dict(headers or {}))


class _PurgeApi:
    """The state a request needs: who the tokens are, which zones exist, where to publish."""

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        tokens: TokenStore,
        access: Access,
        line_checks: Mapping[str, LineCheck],
    ) -> None:
        self.bus = bus
        self.tokens = tokens
        self.access = access
        self.topic = settings.drain.topic
        self.check = line_checks.get(self.topic)
        self.max_line = settings.server.max_message_bytes
        # A zone forwarded to Cloudflare takes what its plan takes; other listed ids what
        # every plan takes.
        self.zones: dict[str, PlanLimits] = dict.fromkeys(settings.http.zones, _DEFAULT_LIMITS)
        for zone in settings.drain.cloudflare:
            self.zones[zone.zone_id] = PLAN_LIMITS[zone.plan]

    async def purge(self, request: Request) -> Response:
        endpoint = request.url.path.rsplit("/", 1)[1]
        started = time.perf_counter()
        response = await self._answer(request, endpoint)
        HTTP_REQUESTS.labels(endpoint, str(response.status_code)).inc()
        HTTP_SECONDS.observe(time.perf_counter() - started)
        return response

    async def _answer(self, request: Request, endpoint: str) -> Response:
        zone = request.path_params["zone"]
        identity = self._identity(request)
        if identity is None:
            client = request.client.host if request.client else None
            log.info("http_refused", endpoint=endpoint, zone=zone, client=client,
                     reason="no valid token")  # fmt: skip
            code = codes.AUTHENTICATION_ERROR
            return _failure(CloudflareFault(401, code, codes.MESSAGES[code]))
        bound = log.bind(user=identity.user, token=identity.fingerprint, zone=zone)
        limits = self.zones.get(zone)
        if limits is None:
            bound.info("http_refused", endpoint=endpoint, reason="unknown zone")
            return _not_found(request.url.path)
        try:
            raw = await _read_body(request)
            line = purge_line(
                raw,
                soft=endpoint == "invalidate_cache",
                max_items=limits.items_per_call,
                max_files=limits.files_per_call,
            )
            entry_id = await self._publish(identity, line)
        except CloudflareFault as fault:
            bound.info("http_refused", endpoint=endpoint, status=fault.status, reason=fault.message)
            headers = {"Retry-After": str(fault.retry_after)} if fault.status == 429 else {}
            return _failure(fault, headers=headers)
        bound.info("http_purge", endpoint=endpoint, id=entry_id)
        return JSONResponse(_envelope({"id": entry_id}, []))

    def _identity(self, request: Request) -> Identity | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.tokens.lookup(token.strip())

    async def _publish(self, identity: Identity, line: bytes) -> str:
        """Publish ``line`` as ``identity``; return its stream id. Raises CloudflareFault."""
        try:
            if len(line) > self.max_line:
                raise CloudflareFault(
                    400, codes.INVALID_FIELD,
                    f"purge is {len(line)} bytes as a drainbus line; at most {self.max_line} "
                    "(server.max_message_bytes)",
                )  # fmt: skip
            self.access.require(identity, "publish", self.topic)
            if self.check is not None:
                self.check(identity, line)
            ids = await publish_as(self.bus, self.topic, [line], user=identity.user)
        except DrainbusError as exc:
            raise _as_fault(exc) from None
        return format_id(ids[0])


def _as_fault(exc: DrainbusError) -> CloudflareFault:
    """The Cloudflare answer for a drainbus error, by its exit code."""
    if exc.exit_code == ExitCode.NOPERM:
        return CloudflareFault(403, codes.UNAUTHORIZED, exc.message)
    if exc.exit_code in (ExitCode.DATAERR, ExitCode.USAGE):
        return CloudflareFault(400, codes.INVALID_FIELD, exc.message)
    if exc.exit_code == ExitCode.TEMPFAIL:
        # A limit that says when it frees up (a retry_after in seconds) is passed on.
        wait = getattr(exc, "retry_after", None)
        return CloudflareFault(
            429,
            codes.RATE_LIMITED,
            f"{codes.MESSAGES[codes.RATE_LIMITED]}: {exc.message}",
            retry_after=max(1, math.ceil(wait)) if isinstance(wait, int | float) else 1,
        )
    return CloudflareFault(503, 503, exc.message)  # Cloudflare has no code for this


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise CloudflareFault(
                413, codes.INVALID_FIELD, f"Request body is larger than {MAX_BODY_BYTES} bytes"
            )
    return bytes(body)


def _not_found(path: str) -> JSONResponse:
    fault = CloudflareFault(404, codes.ROUTE_INVALID, codes.route_invalid(path))
    return _failure(fault, [{"code": codes.NO_ROUTE, "message": codes.MESSAGES[codes.NO_ROUTE]}])


async def _no_route(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    HTTP_REQUESTS.labels("other", str(status)).inc()
    if status == 405:
        fault = CloudflareFault(405, codes.NO_ROUTE, f"Method {request.method} not allowed")
        return _failure(fault, headers={"Allow": "POST"})
    return _not_found(request.url.path)


def build_app(
    settings: Settings,
    bus: Bus,
    tokens: TokenStore,
    access: Access,
    line_checks: Mapping[str, LineCheck],
) -> Starlette:
    """The ASGI application serving the purge API for this node."""
    api = _PurgeApi(settings, bus, tokens, access, line_checks)
    routes = [
        Route(f"/client/v4/zones/{{zone}}/{endpoint}", api.purge, methods=["POST"])
        for endpoint in _ENDPOINTS
    ]
    return Starlette(routes=routes, exception_handlers={404: _no_route, 405: _no_route})
