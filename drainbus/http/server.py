"""Serving the purge API with uvicorn inside the node's own event loop.

uvicorn runs as one more task of ``serve``: it shares the loop (and the bus, the token store
and the Redis pool) with the SSH front door. drainbus owns the process's signals, so
uvicorn's own handlers are left out (:class:`_Server`); shutdown is ``should_exit``, after
which uvicorn lets requests in flight finish within ``server.shutdown_grace``.

Under ``serve --workers N`` only worker 0 serves HTTP, as only it runs the drain: the endpoint
carries a CMS's or a deploy's purges (a handful a second, each one small XADD), which one
process serves with room to spare, and one listener keeps the port an ordinary one (no
SO_REUSEPORT group to reserve in the supervisor). While worker 0 restarts the port refuses
connections; Cloudflare clients retry on connection errors.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import structlog
import uvicorn
from starlette.types import ASGIApp

from drainbus.errors import ConfigError, StartupError
from drainbus.http.settings import HttpSettings

__all__ = ["serve_http"]

log = structlog.get_logger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # SIGINT/SIGTERM/SIGHUP are drainbus's (cli._wait_for_stop): uvicorn must not take them.
        yield


@asynccontextmanager
async def serve_http(
    settings: HttpSettings, app: ASGIApp, *, grace: float, limit: int
) -> AsyncIterator[int]:
    """Serve ``app`` on ``settings.listen`` while the block runs; yield the bound port.

    ``grace``: seconds requests in flight get at shutdown; ``limit``: most connections and
    requests at once. The socket listens before this yields, so a client may connect at
    once. Raises
    StartupError when the address cannot be bound, ConfigError when the TLS files cannot be
    loaded.
    """
    address = settings.listen_address
    assert address is not None  # the caller serves only when listen is set
    host, port = address
    try:
        sock = socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
        )
    except OSError as exc:
        raise StartupError(
            f"cannot serve HTTP on {settings.listen}: {exc.strerror or exc}"
        ) from None
    with sock:
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,  # drainbus logs each request itself, without its headers
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=max(1, round(grace)),
            # A bound on what a flood of connections can hold (uvicorn answers 503 beyond
            # it); purge clients are few and their requests short.
            limit_concurrency=limit,
            ssl_certfile=settings.tls_cert,
            ssl_keyfile=settings.tls_key,
        )
        try:
            config.load()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"http.tls_cert / http.tls_key cannot be loaded: {exc.strerror or exc}"
            ) from None
        server = _Server(config)
        bound = int(sock.getsockname()[1])
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(server.serve, [sock])
            scheme = "https" if settings.tls else "http"
            log.info("http_listening", listen=f"{scheme}://{host}:{bound}")
            try:
                yield bound
            finally:
                server.should_exit = True
