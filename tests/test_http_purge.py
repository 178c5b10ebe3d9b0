"""The HTTP-purge target against a small local server that records every request."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

import drainbus.drain.http_purge as http_purge_module
from drainbus.drain.http_purge import HttpPurgeConfig, HttpPurger
from drainbus.drain.purges import Purge
from drainbus.drain.retry import RetryPolicy

FAST = RetryPolicy(base=0.01, cap=0.05, max_attempts=3, max_retry_after=2.0)


@dataclass(frozen=True)
class Seen:
    """One request the cache received."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    at: float


class RecordingCache:
    """A local HTTP server standing in for Varnish/Souin: records requests, answers as told."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.replies: list[tuple[int, dict[str, str]]] = []  # scripted, then 200
        self.status_for: dict[str, int] = {}  # path -> status, for every request to it
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls

            def __getattr__(self, name: str) -> Any:
                if name.startswith("do_"):
                    return self.answer
                raise AttributeError(name)

            def answer(self) -> None:
                with owner._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    owner.seen.append(Seen(self.command, self.path, headers, time.monotonic()))
                    status, extra = owner.replies.pop(0) if owner.replies else (200, {})
                    status = owner.status_for.get(self.path, status)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def reply_next(self, *statuses: int, headers: dict[str, str] | None = None) -> None:
        """Answer the next requests with these statuses (and headers), then 200 again."""
        with self._lock:
            self.replies.extend((s, dict(headers or {})) for s in statuses)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


MakePurger = Callable[..., AbstractAsyncContextManager[HttpPurger]]


@pytest.fixture
def cache() -> Iterator[RecordingCache]:
    """A running recording cache, closed after the test."""
    server = RecordingCache()
    yield server
    server.close()


@pytest.fixture
def purger() -> MakePurger:
    """Open an HttpPurger with fast retries for a config built from keyword settings."""

    @asynccontextmanager
    async def open_purger(**settings: Any) -> AsyncIterator[HttpPurger]:
        async with HttpPurger(HttpPurgeConfig(**settings), retry=FAST) as target:
            yield target

    return open_purger


async def test_url_purges_send_one_request_per_url(
    cache: RecordingCache, purger: MakePurger
) -> None:
    """Each distinct URL is one PURGE with the path, query and original Host filled in."""
    purges = [
        Purge(urls=frozenset({"https://site.example/a?x=1", "https://site.example/b"})),
        Purge(urls=frozenset({"https://site.example/a?x=1"})),
    ]
    async with purger(url=cache.base + "{path}", headers={"Host": "{host}"}) as target:
        outcomes = await target.apply(purges)

    assert [o.status for o in outcomes] == ["done", "done"]
    assert sorted((s.method, s.path, s.headers["host"]) for s in cache.seen) == [
        ("PURGE", "/a?x=1", "site.example"),
        ("PURGE", "/b", "site.example"),
    ]


@pytest.mark.parametrize(
    ("per_request", "expected"),
    [(100, ["a b c"]), (2, ["a b", "c"])],
    ids=["one-request", "chunked"],
)
async def test_tags_and_keys_travel_in_the_header_template(
    cache: RecordingCache, purger: MakePurger, per_request: int, expected: list[str]
) -> None:
    """Tags and keys of a batch go space-joined in the tag header; empty headers are left out."""
    purges = [Purge(tags=frozenset({"b", "a"})), Purge(keys=frozenset({"c", "a"}))]
    settings = {
        "url": cache.base + "{path}",
        "tags_url": cache.base + "/",
        "tags_per_request": per_request,
        "headers": {"Surrogate-Key": "{tags}", "X-Purge-Host": "{host}"},
    }
    async with purger(**settings) as target:
        outcomes = await target.apply(purges)

    assert [o.status for o in outcomes] == ["done", "done"]
    assert sorted(s.headers["surrogate-key"] for s in cache.seen) == expected
    assert all("x-purge-host" not in s.headers and s.method == "PURGE" for s in cache.seen)


async def test_hosts_prefixes_and_everything_use_the_ban_templates(
    cache: RecordingCache, purger: MakePurger
) -> None:
    """Host and prefix purges are BANs with a boundary-keeping regex; everything has its URL."""
    purges = [
        Purge(prefixes=frozenset({"https://site.example/docs"})),
        Purge(hosts=frozenset({"other.example"})),
        Purge(everything=True),
    ]
    settings = {
        "url": cache.base + "{path}",
        "ban_url": cache.base + "/ban",
        "everything_url": cache.base + "/ban-all",
        "headers": {"X-Ban-Host": "{host}", "X-Ban-Url": "{path_regex}"},
    }
    async with purger(**settings) as target:
        outcomes = await target.apply(purges)

    assert [o.status for o in outcomes] == ["done"] * 3
    seen = {(s.path, s.headers.get("x-ban-host")): s for s in cache.seen}
    assert {s.method for s in cache.seen} == {"BAN"}
    assert seen["/ban", "other.example"].headers["x-ban-url"] == "^/"
    regex = seen["/ban", "site.example"].headers["x-ban-url"]
    matches = [bool(re.match(regex, p)) for p in ["/docs", "/docs/a", "/docs?x=1", "/docs2"]]
    assert matches == [True, True, True, False]
    assert "x-ban-url" not in seen["/ban-all", None].headers


VARNISH_XKEY = {"headers": {"xkey-purge": "{tags}"}, "soft_headers": {"xkey-softpurge": "{tags}"}}
SOUIN = {"headers": {"Surrogate-Key": "{tags}"}}
SOUIN_SOFT = {"soft_headers": {"Surrogate-Key": "{tags}", "Souin-Purge-Mode": "soft"}}


async def test_soft_tag_purges_use_the_soft_headers(
    cache: RecordingCache, purger: MakePurger
) -> None:
    """With soft_headers (Varnish xkey), soft tags go in xkey-softpurge and hard in xkey-purge."""
    purges = [Purge(tags=frozenset({"a", "b"}), soft=True), Purge(keys=frozenset({"c"}))]
    settings = {"url": cache.base + "{path}", "tags_url": cache.base + "/", **VARNISH_XKEY}
    async with purger(**settings) as target:
        outcomes = await target.apply(purges)

    assert [o.status for o in outcomes] == ["done", "done"]
    assert len(cache.seen) == 2
    soft = [s.headers for s in cache.seen if "xkey-softpurge" in s.headers]
    hard = [s.headers for s in cache.seen if "xkey-purge" in s.headers]
    assert [h["xkey-softpurge"] for h in soft] == ["a b"]
    assert [h["xkey-purge"] for h in hard] == ["c"]
    assert all("xkey-purge" not in h for h in soft)
    assert all("xkey-softpurge" not in h for h in hard)


@pytest.mark.parametrize("configured", [True, False], ids=["soft-headers", "no-soft-headers"])
async def test_soft_url_purges_carry_the_soft_mode_only_when_configured(
    cache: RecordingCache, purger: MakePurger, configured: bool
) -> None:
    """Souin's soft form is a header; without soft_headers a soft purge is sent hard."""
    settings = {**SOUIN, **(SOUIN_SOFT if configured else {})}
    async with purger(url=cache.base + "{path}", **settings) as target:
        outcomes = await target.apply([Purge(urls=frozenset({"https://s.example/x"}), soft=True)])

    assert [o.status for o in outcomes] == ["done"]
    assert [(s.method, s.path, s.headers.get("souin-purge-mode")) for s in cache.seen] == [
        ("PURGE", "/x", "soft" if configured else None)
    ]


async def test_a_hard_purge_absorbs_the_same_soft_one(
    cache: RecordingCache, purger: MakePurger
) -> None:
    """The same item purged soft and hard in one batch is sent once, hard; both are done."""
    purges = [
        Purge(tags=frozenset({"a"}), hosts=frozenset({"h.example"}), soft=True),
        Purge(tags=frozenset({"a"}), hosts=frozenset({"h.example"})),
    ]
    settings = {"url": cache.base + "{path}", "tags_url": cache.base + "/", **VARNISH_XKEY}
    async with purger(ban_url=cache.base + "/ban", **settings) as target:
        outcomes = await target.apply(purges)

    assert [o.status for o in outcomes] == ["done", "done"]
    assert sorted((s.method, s.path, s.headers.get("xkey-purge")) for s in cache.seen) == [
        ("BAN", "/ban", None),
        ("PURGE", "/", "a"),
    ]
    assert not any("xkey-softpurge" in s.headers for s in cache.seen)


@pytest.mark.parametrize(
    ("on_unsupported", "status"), [("skip", "done"), ("permanent", "permanent")]
)
async def test_kinds_without_a_template_follow_on_unsupported(
    cache: RecordingCache,
    purger: MakePurger,
    on_unsupported: str,
    status: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tag purge with no tags_url is skipped with a warning, or fails if so configured."""
    # A fresh logger: one cached after an earlier test configured logging would bypass capture.
    monkeypatch.setattr(http_purge_module, "_log", structlog.get_logger(http_purge_module.__name__))
    with structlog.testing.capture_logs() as events:
        async with purger(url=cache.base + "{path}", on_unsupported=on_unsupported) as target:
            outcomes = await target.apply([Purge(tags=frozenset({"t"}))])
            stats = target.stats()

    assert [o.status for o in outcomes] == [status]
    assert cache.seen == []
    assert stats.skipped == 1
    assert [e["event"] for e in events] == ["http_purge_unsupported"]


async def test_a_5xx_and_a_429_are_retried(cache: RecordingCache, purger: MakePurger) -> None:
    """A 503 and then a 429 with Retry-After are retried, waiting as told, and succeed."""
    cache.reply_next(503)
    cache.reply_next(429, headers={"Retry-After": "0.2"})
    async with purger(url=cache.base + "{path}") as target:
        outcomes = await target.apply([Purge(urls=frozenset({"https://s.example/x"}))])
        stats = target.stats()

    assert [o.status for o in outcomes] == ["done"]
    assert len(cache.seen) == 3
    assert cache.seen[2].at - cache.seen[1].at >= 0.18
    assert stats.retries == 2


@pytest.mark.parametrize(
    ("expect", "status"),
    [([200, 204], "permanent"), ([200, 404], "done")],
    ids=["default", "404-ok"],
)
async def test_an_unexpected_status_is_permanent(
    cache: RecordingCache, purger: MakePurger, expect: list[int], status: str
) -> None:
    """A 404 fails the purge for good unless expect_status lists it."""
    cache.reply_next(404)
    async with purger(url=cache.base + "{path}", expect_status=expect) as target:
        outcomes = await target.apply([Purge(urls=frozenset({"https://s.example/x"}))])

    assert [o.status for o in outcomes] == [status]
    assert len(cache.seen) == 1
    if status == "permanent":
        assert "HTTP 404" in (outcomes[0].error or "")


async def test_one_failed_part_fails_only_the_purges_that_carry_it(
    cache: RecordingCache, purger: MakePurger
) -> None:
    """A purge is done only if all its requests succeeded; its neighbours are unaffected."""
    cache.status_for["/tags"] = 403
    purges = [
        Purge(tags=frozenset({"t"}), urls=frozenset({"https://s.example/x"})),
        Purge(urls=frozenset({"https://s.example/y"})),
    ]
    settings = {
        "url": cache.base + "{path}",
        "tags_url": cache.base + "/tags",
        "headers": {"xkey-purge": "{tags}"},
    }
    async with purger(**settings) as target:
        outcomes = await target.apply(purges)

    assert [o.status for o in outcomes] == ["permanent", "done"]
    assert "HTTP 403" in (outcomes[0].error or "")
    assert sorted(s.path for s in cache.seen) == ["/tags", "/x", "/y"]


async def test_an_unreachable_cache_is_retry_later(purger: MakePurger) -> None:
    """Connection refused on every try leaves the purge for redelivery."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with purger(url=f"http://127.0.0.1:{port}{{path}}") as target:
        outcomes = await target.apply([Purge(urls=frozenset({"https://s.example/x"}))])

    assert outcomes[0].status == "retry_later"
    assert "ConnectError" in (outcomes[0].error or "")


@pytest.mark.parametrize(
    "settings",
    [
        {"url": "http://cache{nope}"},
        {"url": "http://cache{path}", "tags_url": "http://cache/{host}"},
        {"url": "http://cache{path}", "headers": {"X-Ban": "{regex}"}},
        {"url": "cache{path}"},
        {"url": "http://cache{path}", "method": "purge"},
        {"url": "http://cache{path}", "soft_headers": {"X-Ban": "{regex}"}},
        {"url": "http://cache{path}", "soft_headers": {"X Soft": "1"}},
    ],
    ids=[
        "unknown-placeholder",
        "tags-url-placeholder",
        "header-placeholder",
        "no-scheme",
        "method",
        "soft-header-placeholder",
        "soft-header-name",
    ],
)
def test_bad_templates_are_rejected_at_load(settings: dict[str, Any]) -> None:
    """Unknown placeholders, non-HTTP URLs and bad methods fail when the config is loaded."""
    with pytest.raises(ValidationError):
        HttpPurgeConfig(**settings)
