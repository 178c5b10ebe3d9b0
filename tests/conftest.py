"""Fixtures that start real things: a Redis-compatible server, the SSH bus, OpenSSH clients.

Redis: the one at ``DRAINBUS_TEST_REDIS_URL`` if set, else one embedded server started for
the whole session (the same code path ``drainbus serve`` uses). Each test gets its own key
namespace, so tests never see each other's topics and nothing needs flushing.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from drainbus.bus import Bus
from drainbus.bus.embedded import EmbeddedRedis
from drainbus.config import Settings, load_settings
from drainbus.node import Node, open_node
from tests.nginx_env import nginx_directives, nginx_env, origin  # real nginx, for every module
from tests.redis_topology import (  # started only when asked for
    make_servers,
    redis_cluster,
    redis_cluster_url,
    redis_sentinel,
)

RunningBus = Node  # what the tests call a started node
__all__ = [  # fixtures
    "make_servers",
    "nginx_directives",
    "nginx_env",
    "origin",
    "redis_cluster",
    "redis_cluster_url",
    "redis_sentinel",
]

SSH = shutil.which("ssh") or "/usr/bin/ssh"


@pytest.fixture(autouse=True)
def fresh_url_memos() -> None:
    """The grammar and the key code remember URLs and hosts process-wide: each test (and each
    mutant scripts/mutate runs in a fork of a process that already ran the tests) works its
    URLs out afresh, or a mutant would read answers its original computed."""
    from drainbus.drain import key_template, purges, url_rules

    url_rules.split_url.cache_clear()
    key_template.forget_urls()
    purges._host.cache_clear()


@pytest.fixture
def fresh_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """structlog as before any configure_logging(), for structlog.testing.capture_logs.

    A module's logger is cached at its first use with the processors and level configured
    then: after a test that ran the CLI it would no longer reach capture_logs. So each
    module logging in the core gets a new, unbound logger for the test.
    """
    import structlog

    from drainbus import identity
    from drainbus.bus import fanout, publisher

    saved = structlog.get_config()
    structlog.reset_defaults()
    for module in (identity, fanout, publisher):
        monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short temp dir: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="db-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(short_tmp: Path) -> Iterator[str]:
    """URL of the Redis-compatible server the tests share."""
    external = os.environ.get("DRAINBUS_TEST_REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis(short_tmp / "shared-redis") as server:
        yield server.url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the tests' Redis (bytes replies), closed after the test."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def namespace() -> str:
    """A key namespace of this test's own."""
    return f"t{secrets.token_hex(4)}"


@dataclass
class User:
    """A throwaway user: name, private key file, public key text."""

    name: str
    key_file: Path

    @property
    def public_key(self) -> str:
        return self.key_file.with_suffix(".pub").read_text()


@pytest.fixture
def make_key(tmp_path: Path) -> Callable[[str], Path]:
    """Generate an ed25519 key pair with ssh-keygen; return the private key's path."""

    def make(label: str) -> Path:
        path = tmp_path / "client-keys" / label
        path.parent.mkdir(exist_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", label, "-f", str(path)],
            check=True,
        )
        return path

    return make


@pytest.fixture
def users_dir(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "users"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def add_user(users_dir: Path, make_key: Callable[[str], Path]) -> Callable[[str], User]:
    """Create a user with a fresh key registered in the users folder."""

    def add(name: str) -> User:
        key = make_key(name)
        (users_dir / f"{name}.pub").write_text(key.with_suffix(".pub").read_text())
        return User(name, key)

    return add


@pytest.fixture
def settings_for(
    tmp_path: Path, users_dir: Path, redis_url: str, namespace: str
) -> Callable[..., Settings]:
    """Build Settings for a test bus: free port, this test's namespace and users folder."""

    def build(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "redis_url": redis_url,
            "namespace": namespace,
            "data_dir": str(tmp_path / "data"),
            "server": {
                "listen": "127.0.0.1:0",
                "host_keys_dir": str(tmp_path / "keys" / "host"),
                "users_dir": str(users_dir),
                "admins": ["root"],
                "users_reload_interval": 0.2,
            },
            "acl": [{"topics": ["cache-drain", "shared/**"], "publish": ["*"], "subscribe": ["*"]}],
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return load_settings(None, base)

    return build


@pytest.fixture
async def start_bus(
    settings_for: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """Start in-process nodes exactly as ``drainbus serve`` does; stop them after.

    Each node runs in a task of its own, as under ``serve``: its task groups must be entered
    and left in one task.
    """
    nodes: list[tuple[asyncio.Task[None], asyncio.Event]] = []

    async def start(settings: Settings | None = None, **overrides: Any) -> Node:
        settings = settings or settings_for(**overrides)
        ready: asyncio.Future[Node] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()

        async def run() -> None:
            try:
                async with open_node(settings) as node:
                    ready.set_result(node)
                    await stop.wait()
            except BaseException as exc:
                if not ready.done():
                    ready.set_exception(exc)
                raise

        nodes.append((asyncio.create_task(run()), stop))
        return await ready

    yield start
    for _, stop in nodes:
        stop.set()
    for task, _ in nodes:
        await task


def ssh_argv(port: int, key: Path, *args: str, login: str = "anyone") -> list[str]:
    """The OpenSSH command line for running ``args`` on the bus as the key's owner."""
    return [
        SSH, "-F", "/dev/null", "-T", "-p", str(port), "-i", str(key),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "IdentityAgent=none", "-o", "ConnectTimeout=10",
        f"{login}@127.0.0.1", *args,
    ]  # fmt: skip


@dataclass
class Result:
    """What an ssh invocation ended with."""

    code: int
    stdout: bytes
    stderr: str


async def run_ssh(
    port: int, key: Path, *args: str, stdin: bytes = b"", timeout: float = 30, **kw: Any
) -> Result:
    """Run the real OpenSSH client to completion."""
    argv = ssh_argv(port, key, *args, **kw)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return Result(proc.returncode, out, err.decode(errors="replace"))


async def publish_retrying(
    port: int, key: Path, topic: str, data: bytes, timeout: float = 30
) -> Result:
    """``pub`` the way a person does while Redis fails over: again after each exit 69."""
    async with asyncio.timeout(timeout):
        while True:
            result = await run_ssh(port, key, "pub", topic, stdin=data)
            if result.code != 69:
                return result
            await asyncio.sleep(0.1)  # the pause before trying again, not a wait for a state


class Subscriber:
    """A live ``ssh … sub`` process whose output the test reads line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = 15) -> bytes:
        assert self.proc.stdout is not None
        data = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not data:
            err = await self.proc.stderr.read() if self.proc.stderr else b""
            raise AssertionError(f"subscriber ended: {err.decode(errors='replace')}")
        return data.rstrip(b"\n")

    async def lines(self, n: int, timeout: float = 15) -> list[bytes]:
        return [await self.line(timeout) for _ in range(n)]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


@pytest.fixture
async def subscribe() -> AsyncIterator[Callable[..., Awaitable[Subscriber]]]:
    """Start ``ssh … sub …`` processes; the test awaits readiness with ``wait_subscribed``."""
    started: list[Subscriber] = []

    async def start(port: int, key: Path, *args: str, stdin_eof: bool = False) -> Subscriber:
        argv = ssh_argv(port, key, "sub", *args)
        if stdin_eof:
            argv.insert(1, "-n")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL if stdin_eof else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            limit=1 << 20,
        )
        sub = Subscriber(proc)
        started.append(sub)
        return sub

    yield start
    for sub in started:
        await sub.stop()


async def wait_subscribed(bus: Bus, topic: str, count: int = 1, timeout: float = 15) -> None:
    """Wait until ``count`` local ``sub`` sessions on ``topic`` are attached to the fan-out."""
    async with asyncio.timeout(timeout):
        while bus.fanout.subscriber_counts().get(topic, 0) < count:
            await asyncio.sleep(0.01)


@asynccontextmanager
async def serve_process(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> AsyncIterator[ServeProcess]:
    """Run ``drainbus serve`` as a real process; wait for it to listen; stop it after.

    One process (``--workers 1``) unless ``args`` say otherwise: a test that signals or kills
    "the server" means the process that holds the sessions and the drain. The supervisor of
    ``--workers N`` has tests of its own (test_workers.py).
    """
    if "--workers" not in args:
        args = ("--workers", "1", *args)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drainbus", "--log-json", "serve", *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})}, cwd=cwd,
    )  # fmt: skip
    server = ServeProcess(proc)
    try:
        await server.wait_for_event("serving")
        yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
        await server.reader


class ServeProcess:
    """A running ``drainbus serve`` and every JSON line it has logged (read continuously,
    so the server never blocks on a full stderr pipe)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.port = 0
        self.log: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                event: dict[str, Any] = json.loads(raw)
            except ValueError:
                event = {"event": "raw", "text": raw.decode(errors="replace")}
            if event.get("event") == "serving":
                self.port = int(event["port"])
            async with self._changed:
                self.log.append(event)
                self._changed.notify_all()
        async with self._changed:
            self.log.append({"event": "(exited)"})
            self._changed.notify_all()

    async def wait_for_event(self, name: str, timeout: float = 20, **fields: Any) -> dict[str, Any]:
        """The first logged event called ``name`` (with ``fields``), waiting for it if needed."""
        return (await self.wait_for_events(name, 1, timeout, **fields))[0]

    async def wait_for_events(
        self, name: str, count: int, timeout: float = 20, **fields: Any
    ) -> list[dict[str, Any]]:
        """The first ``count`` logged events called ``name`` whose ``fields`` match, in order."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                found = [
                    e for e in self.log if e.get("event") == name and fields.items() <= e.items()
                ]
                if len(found) >= count:
                    return found[:count]
                if self.log and self.log[-1]["event"] == "(exited)":
                    raise AssertionError(f"serve exited without logging {name}: {self.log}")
                await self._changed.wait()
