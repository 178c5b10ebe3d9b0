"""A real nginx with a ``proxy_cache`` in front of a tiny origin, for tests.

Use the fixtures::

    from tests.nginx_env import nginx_env  # or let tests/conftest.py import it

    def test_something(nginx_env: NginxEnv) -> None:
        assert nginx_env.get("/", host="acme-blog.pages.example").cache == "MISS"

``tests/conftest.py`` is expected to import ``origin`` and ``nginx_env`` from here so every
test module gets them; until it does, import them directly as ``tests/test_nginx.py`` does.

The origin (:class:`Origin`) answers every GET with ``Cache-Control: max-age=3600``, a
``Cache-Tag`` header and a body that ends in a request counter, so a test can tell a cached
copy from a fresh one. Tags default to the first label of the Host (``acme-blog.pages.example``
-> ``acme-blog``) plus any tags a test registers for a path prefix in ``Origin.path_tags``.
With ``Origin.etag`` set it also sends that ETag and answers a matching ``If-None-Match``
with 304; ``Origin.requests`` records what each request asked, and clearing ``Origin.gate``
holds answers until the test sets it again. A test can also make the origin slow
(``delay``) and give its content a ``version``, sent as the ETag when ``etag`` is not set;
both are read when a request starts, as a real origin reads the page it will send.

nginx (:class:`Nginx`) is the real binary, run in the foreground with every path inside a
temporary folder and the cache configured as the drainbus docs assume::

    proxy_cache_path <tmp>/cache levels=1:2 keys_zone=z:10m use_temp_path=off;
    proxy_cache_key  $scheme$host$request_uri;

A test adds directives to the cached location by parametrising the ``nginx_directives``
fixture, e.g. with :data:`SOFT_PURGE_DIRECTIVES`. ``run_nginx_env(root, cache_key=None)``
leaves ``proxy_cache_key`` out, so nginx uses its default key
(``http://127.0.0.1:<origin port><request URI>``).

It is never skipped: when nginx is missing the fixture fails and says how to install it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from asyncinotify import Inotify, Mask

from drainbus.drain.nginx import cache_file_path

__all__ = [
    "CACHE_KEY",
    "CACHE_LEVELS",
    "SOFT_PURGE_DIRECTIVES",
    "STALE_WHILE_UPDATING",
    "Nginx",
    "NginxEnv",
    "Origin",
    "OriginRequest",
    "Response",
    "cache_file_written",
    "find_nginx",
    "nginx_directives",
    "nginx_env",
    "origin",
    "run_nginx",
    "run_nginx_env",
    "run_origin",
    "write_cache_file",
]

#: The proxy_cache_key and levels the test nginx uses.
CACHE_KEY = "$scheme$host$request_uri"
CACHE_LEVELS = "1:2"

#: What makes a soft purge pay off: serve the expired copy at once, revalidate it in the
#: background with a conditional request.
#: An expired object is served as it is while nginx refetches it in the background.
STALE_WHILE_UPDATING = """
    proxy_cache_use_stale updating;
    proxy_cache_background_update on;
"""
#: What makes soft purges pay off: stale while updating, and the update is conditional.
SOFT_PURGE_DIRECTIVES = (
    STALE_WHILE_UPDATING
    + """
    proxy_cache_revalidate on;
"""
)
_GATE_DEADLINE_S = 10.0

_START_DEADLINE_S = 10.0
_STOP_DEADLINE_S = 10.0


def find_nginx() -> str:
    """The nginx binary's path; fails the test (never skips) when nginx is not installed."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.fail(
            "nginx is not installed: the nginx target is tested against real nginx; "
            "run `apt-get install -y nginx-light`"
        )
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _host_label_tags(host: str, path: str) -> list[str]:
    del path
    return [host.split(":", 1)[0].split(".", 1)[0]]


class OriginRequest(NamedTuple):
    """One request that reached the origin: its path, ``If-None-Match`` and answer status."""

    path: str
    if_none_match: str | None
    status: int


@dataclass
class Origin:
    """A threaded HTTP origin on 127.0.0.1 whose responses nginx may cache for an hour.

    ``tags_for(host, path)`` gives each response's ``Cache-Tag`` list; ``path_tags`` adds
    tags for every path starting with a given prefix. ``hits`` counts the requests that
    reached the origin, and every body ends with that count. With ``etag`` (a quoted
    string) set, responses carry it, bodies name it, and a request whose ``If-None-Match``
    is ``etag`` gets a 304. ``requests`` lists every request answered, in order; while
    ``gate`` is clear, answers wait for it (at most 10 s).

    ``version``, when set (and ``etag`` not), is in every body and is the ETag
    (``"<version>"``); ``delay`` is how many seconds the origin waits before it answers;
    ``max_age`` the lifetime it sends. A request reads them when it starts: changing them
    affects later requests only.
    """

    tags_for: Callable[[str, str], Sequence[str]] = _host_label_tags
    path_tags: dict[str, list[str]] = field(default_factory=dict)
    tag_header: str = "Cache-Tag"
    etag: str | None = None
    version: str | None = None
    delay: float = 0.0
    max_age: int = 3600
    hits: int = 0
    port: int = 0
    requests: list[OriginRequest] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _counted: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.gate.set()
        self._counted = threading.Condition(self._lock)

    def tags(self, host: str, path: str) -> list[str]:
        """Every tag the response for ``host`` and ``path`` carries."""
        tags = list(self.tags_for(host, path))
        for prefix, extra in self.path_tags.items():
            if path.startswith(prefix):
                tags.extend(extra)
        return tags

    def count(self) -> int:
        """Count one request that reached the origin and return the new total."""
        return self.start()[0]

    def start(self) -> tuple[int, str | None, str | None, float, int]:
        """Count one request: its number, and the ETag, body label, ``delay`` and ``max_age``
        it uses (the label is ``etag``, else ``version``; the ETag ``etag``, else
        ``"<version>"``)."""
        with self._lock:
            self.hits += 1
            self._counted.notify_all()
            etag = self.etag
            if etag is None and self.version is not None:
                etag = f'"{self.version}"'
            label = self.etag if self.etag is not None else self.version
            return self.hits, etag, label, self.delay, self.max_age

    def wait_for_hits(self, hits: int, timeout: float = 10.0) -> None:
        """Block until ``hits`` requests have reached the origin; fails after ``timeout`` s."""
        with self._lock:
            if not self._counted.wait_for(lambda: self.hits >= hits, timeout):
                pytest.fail(f"the origin saw {self.hits} requests, not {hits}, in {timeout} s")

    def answered(self, request: OriginRequest) -> None:
        """Record ``request`` as answered and wake :meth:`wait_for_requests`."""
        with self._lock:
            self.requests.append(request)
            self._counted.notify_all()

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[OriginRequest]:
        """Wait until ``count`` requests were answered; returns them all, or fails the test."""
        with self._lock:
            if not self._counted.wait_for(lambda: len(self.requests) >= count, timeout):
                pytest.fail(f"origin answered {len(self.requests)} requests, not {count}")
            return list(self.requests)


def _handler_for(origin: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            origin.gate.wait(_GATE_DEADLINE_S)
            host = self.headers.get("Host", "")
            n, etag, label, delay, max_age = origin.start()
            if_none_match = self.headers.get("If-None-Match")
            if etag is not None and if_none_match == etag:
                self.send_response(304)
                self.send_header("ETag", etag)
                self.send_header("Cache-Control", f"max-age={max_age}")
                self.end_headers()
                origin.answered(OriginRequest(self.path, if_none_match, 304))
                return
            named = f" {label}" if label is not None else ""
            body = f"{host}{self.path}{named} #{n}\n".encode()
            if delay:
                time.sleep(delay)  # a slow origin: the delay is what is being simulated
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", f"max-age={max_age}")
            if etag is not None:
                self.send_header("ETag", etag)
            tags = origin.tags(host, self.path)
            if tags:
                # As UTF-8, like real origins: send_header encodes Latin-1.
                value = ",".join(tags).encode().decode("latin-1")
                self.send_header(origin.tag_header, value)
            self.end_headers()
            self.wfile.write(body)
            origin.answered(OriginRequest(self.path, if_none_match, 200))

        def log_message(self, format: str, *args: object) -> None:
            del format, args  # keep test output clean

    return Handler


@contextlib.contextmanager
def run_origin(origin: Origin | None = None) -> Iterator[Origin]:
    """Serve ``origin`` (a default one if omitted) on a free port until the block ends."""
    origin = origin or Origin()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(origin))
    server.daemon_threads = True
    origin.port = int(server.server_address[1])
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), name="test-origin", daemon=True
    )
    thread.start()
    try:
        yield origin
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Response(NamedTuple):
    """One response through nginx: status, ``X-Cache-Status`` (MISS/HIT/…) and body."""

    status: int
    cache: str
    body: str


@dataclass
class Nginx:
    """A running nginx: where it listens, where its cache lives, and its log."""

    process: subprocess.Popen[bytes]
    port: int
    root: Path
    cache_path: Path
    error_log: Path

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of nginx's error log, for failure messages."""
        try:
            text = self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no error log)"
        return "\n".join(text.splitlines()[-lines:])


def _config(
    root: Path, port: int, origin_port: int, cache_key: str | None, directives: str = ""
) -> str:
    temp = {
        name: root / "temp" / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    }
    for path in temp.values():
        path.mkdir(parents=True, exist_ok=True)
    # Workers drop to the compiled-in user when the master is root; that user cannot reach
    # a private tmp folder, so stay root then.
    user = "user root;" if os.geteuid() == 0 else ""
    key = "" if cache_key is None else f"proxy_cache_key {cache_key};"
    return f"""
daemon off;
master_process on;
worker_processes 1;
{user}
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    proxy_cache_path {root}/cache levels={CACHE_LEVELS} keys_zone=z:10m use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location = /__ready {{ return 204; }}
        location / {{
            proxy_pass http://127.0.0.1:{origin_port};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_cache z;
            {key}
            proxy_cache_valid 200 1h;
            # A stale copy is served while one request refetches it (what a soft purge needs,
            # and how a refetch can be in flight when a purge runs).
            add_header X-Cache-Status $upstream_cache_status always;
            {directives}
        }}
    }}
}}
"""


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # fast shutdown: kept-alive clients do not delay it
        try:
            process.wait(timeout=_STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


@contextlib.contextmanager
def run_nginx(
    root: Path, origin_port: int, cache_key: str | None = CACHE_KEY, directives: str = ""
) -> Iterator[Nginx]:
    """Run nginx with its config, cache and temp folders under ``root`` until the block ends.

    ``cache_key`` is the ``proxy_cache_key`` (None: not set, nginx's default key);
    ``directives`` go into the cached location. Returns once nginx answers on its port; fails
    the test with nginx's log if it does not within the start deadline.
    """
    nginx = _start(find_nginx(), root, origin_port, cache_key, directives)
    try:
        yield nginx
    finally:
        _stop(nginx.process)


def _start(
    binary: str,
    root: Path,
    origin_port: int,
    cache_key: str | None,
    directives: str = "",
    attempts: int = 3,
) -> Nginx:
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    for attempt in range(1, attempts + 1):
        port = _free_port()
        conf.write_text(_config(root, port, origin_port, cache_key, directives))
        process = subprocess.Popen(
            [binary, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        nginx = Nginx(process, port, root, root / "cache", root / "error.log")
        try:
            failure = _wait_ready(nginx)
        except BaseException:
            _stop(process)
            raise
        if failure is None:
            return nginx
        _stop(process)
        # Another process may take the free port before nginx binds it: pick another.
        if "Address already in use" not in failure or attempt == attempts:
            pytest.fail(failure)
    raise AssertionError("unreachable")


def _wait_ready(nginx: Nginx) -> str | None:
    """None once nginx answers; otherwise why it did not."""
    deadline = time.monotonic() + _START_DEADLINE_S
    url = f"http://127.0.0.1:{nginx.port}/__ready"
    while True:
        if nginx.process.poll() is not None:
            stderr = nginx.process.stderr.read().decode() if nginx.process.stderr else ""
            return f"nginx exited with {nginx.process.returncode}: {stderr}\n{nginx.log_tail()}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1.0).status_code == 204:
                return None
        if time.monotonic() > deadline:
            return f"nginx did not answer within {_START_DEADLINE_S} s\n{nginx.log_tail()}"
        time.sleep(0.02)  # polling a port: there is no event to await


@dataclass
class NginxEnv:
    """An origin behind a caching nginx, plus a client that talks to nginx."""

    origin: Origin
    nginx: Nginx
    client: httpx.Client

    @property
    def cache_path(self) -> Path:
        """nginx's ``proxy_cache_path`` folder."""
        return self.nginx.cache_path

    @property
    def proxy_pass(self) -> str:
        """The URL nginx's ``proxy_pass`` names: the origin."""
        return f"http://127.0.0.1:{self.origin.port}"

    def get(self, path: str, host: str, *, new_connection: bool = False) -> Response:
        """GET ``path`` through nginx with ``Host: host``.

        ``new_connection`` sends it on a connection of its own: nginx reads the next request
        on a kept-alive connection only once a background cache update started on it is done.
        """
        url, headers = f"http://127.0.0.1:{self.nginx.port}{path}", {"Host": host}
        if new_connection:
            with httpx.Client(timeout=self.client.timeout) as client:
                response = client.get(url, headers=headers)
        else:
            response = self.client.get(url, headers=headers)
        return Response(
            response.status_code, response.headers.get("X-Cache-Status", ""), response.text
        )

    def prime(self, path: str, host: str) -> Response:
        """GET until nginx serves ``path`` from its cache; fails if it never does."""
        for _ in itertools.repeat(None, 3):
            response = self.get(path, host)
            if response.cache == "HIT":
                return response
        pytest.fail(f"nginx did not cache {host}{path}: {response}\n{self.nginx.log_tail()}")


@contextlib.contextmanager
def run_nginx_env(
    root: Path,
    origin: Origin | None = None,
    directives: str = "",
    *,
    cache_key: str | None = CACHE_KEY,
) -> Iterator[NginxEnv]:
    """An origin and nginx in front of it (``directives`` added to its cached location), both
    stopped when the block ends. ``cache_key`` as for :func:`run_nginx`."""
    with (
        run_origin(origin) as running_origin,
        run_nginx(root, running_origin.port, cache_key, directives) as nginx,
        httpx.Client(timeout=5.0) as client,
    ):
        yield NginxEnv(running_origin, nginx, client)


@contextlib.contextmanager
def cache_file_written(path: Path, timeout: float = 10.0) -> Iterator[Callable[[], None]]:
    """Watch the cache file ``path`` from now on; the yielded function returns once nginx has
    rewritten its header in place (after a 304) or replaced it (after a 200), or fails the
    test after ``timeout`` seconds."""
    with Inotify(sync_timeout=timeout) as inotify:
        inotify.add_watch(path.parent, Mask.CLOSE_WRITE | Mask.MOVED_TO)

        def wait() -> None:
            while (event := inotify.sync_get()) is not None:
                if event.name == Path(path.name):
                    return
            pytest.fail(f"nginx did not write {path} within {timeout} s")

        yield wait


# What nginx 1.22 writes before the KEY line: a version-dependent binary struct. Newlines and
# a stray "KEY" in it keep the parser honest.
_BINARY_HEADER = b"\x05\x00\x00\x00" + bytes(range(256)) + b"KEY\n\r\n\x00" * 8


def write_cache_file(
    cache_path: Path,
    key: str,
    *,
    headers: Sequence[str] = (),
    body: bytes = b"cached body\n",
    levels: str = CACHE_LEVELS,
    temp_suffix: str | None = None,
) -> Path:
    """Write a cache file for ``key`` the way nginx does (temp file, then rename into place).

    ``headers`` are ``"Name: value"`` lines after the status line. With ``temp_suffix``
    (e.g. ``".0000000001"``) the temp file is left in place instead, as while nginx writes.
    Returns the path written.
    """
    path = cache_file_path(cache_path, levels, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"{line}\r\n" for line in ["HTTP/1.1 200 OK", *headers])
    data = _BINARY_HEADER + f"\nKEY: {key}\n{head}\r\n".encode() + body
    temp = path.with_name(path.name + (temp_suffix or ".0000000001"))
    temp.write_bytes(data)
    if temp_suffix is not None:
        return temp
    temp.rename(path)
    return path


@pytest.fixture
def origin() -> Origin:
    """An origin to configure (tags) before ``nginx_env`` starts it."""
    return Origin()


@pytest.fixture
def nginx_directives() -> str:
    """Extra directives for nginx's cached location; parametrise to set them per test."""
    return ""


@pytest.fixture
def nginx_env(tmp_path: Path, origin: Origin, nginx_directives: str) -> Iterator[NginxEnv]:
    """A fresh nginx with an empty cache in front of ``origin``, stopped after the test."""
    with run_nginx_env(tmp_path / "nginx", origin, nginx_directives) as env:
        yield env
