"""A real ``drainbus serve`` process for the benchmarks, and the throwaway user it knows.

The server runs exactly as an operator would run it (``python -m drainbus serve``), on the
embedded Redis-compatible server unless a Redis URL is given. Its JSON log is read
continuously, so the server never blocks on a full stderr pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

__all__ = [
    "BENCH_USER",
    "DrainbusServer",
    "forget_namespace",
    "make_key",
    "rss_kib",
    "start_drainbus",
]

BENCH_USER = "bench"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0


def make_key(path: Path) -> Path:
    """Generate an ed25519 key pair with ssh-keygen; return the private key's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return path


def rss_kib(pid: int) -> int | None:
    """Resident memory of process ``pid`` in KiB (VmRSS), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class DrainbusServer:
    """A running ``drainbus serve``: its port, pids, Redis URL and everything it logged."""

    proc: asyncio.subprocess.Process
    namespace: str
    port: int = 0
    redis_url: str = ""
    redis_pid: int | None = None  # the embedded server, a process of its own
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The serve process's id (with several workers, their supervisor's)."""
        return self.proc.pid

    @property
    def serving_pids(self) -> list[int]:
        """The processes holding the sessions: serve itself, or each of its workers."""
        workers = {e["worker"]: int(e["pid"]) for e in self.events("worker_started")}
        return list(workers.values()) or [self.pid]

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every logged event called ``name``."""
        return [event for event in self.log if event.get("event") == name]


def _config(root: Path, namespace: str) -> str:
    users = root / "users"
    host = root / "host"
    # Limits raised above the fan-out and capacity workloads: they connect thousands of
    # sessions as one user from one address, all at once, which the defaults (1,000
    # connections, 32 per user, 64 sessions, 10:30:100 and 10 per source logging in) refuse.
    return f"""\
namespace = "{namespace}"

[server]
listen = "127.0.0.1:0"
host_keys_dir = "{host}"
users_dir = "{users}"
admins = ["{BENCH_USER}"]
max_connections = 20000
max_connections_per_user = 20000
max_sessions_per_user = 20000
max_startups = "20000"
max_startups_per_source = 20000

[[acl]]
topics = ["bench/**"]
publish = ["*"]
subscribe = ["*"]
"""


def _prepare(root: Path, client_key: Path, namespace: str, extra_config: str = "") -> Path:
    """Write the users folder and the config file; return the config's path."""
    (root / "users").mkdir(parents=True, exist_ok=True)
    (root / "users" / f"{BENCH_USER}.pub").write_text(client_key.with_suffix(".pub").read_text())
    config = root / "drainbus.toml"
    config.write_text(_config(root, namespace) + extra_config)
    return config


@asynccontextmanager
async def start_drainbus(
    root: Path,
    client_key: Path,
    *,
    redis_url: str | None = None,
    profile: Path | None = None,
    workers: int = 1,
    namespace: str | None = None,
    extra_config: str = "",
) -> AsyncIterator[DrainbusServer]:
    """Run ``drainbus serve --workers N`` with a config in ``root``; stop it (SIGTERM) on exit.

    ``client_key``'s public half is registered as user ``bench``. ``root`` must be short:
    the embedded server's unix socket lives in it. With ``profile``, the server runs under
    cProfile and writes its statistics there when it stops (one worker only: the profile
    covers the supervisor otherwise). ``namespace`` joins another server's bus (with its
    ``redis_url``); ``extra_config`` is TOML appended to the config (a ``[drain]`` section).
    """
    namespace = namespace or f"bench-{secrets.token_hex(3)}"
    config = _prepare(root, client_key, namespace, extra_config)
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += ["-m", "drainbus", "--log-json", "serve", "--config", str(config)]
    argv += ["--data-dir", str(root / "data"), "--workers", str(workers)]
    if redis_url:
        argv += ["--redis-url", redis_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAINBUS_")}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=root,
    )
    server = DrainbusServer(proc, namespace, redis_url=redis_url or "")
    serving = asyncio.Event()
    reader = asyncio.create_task(_read_log(server, serving))
    try:
        waiter = asyncio.create_task(serving.wait())
        await asyncio.wait({waiter, reader}, timeout=_START_TIMEOUT, return_when="FIRST_COMPLETED")
        waiter.cancel()
        if not serving.is_set():
            raise RuntimeError(f"drainbus serve did not start: {_tail(server)}")
        yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 5)
        if redis_url:
            await forget_namespace(redis_url, namespace)


async def forget_namespace(redis_url: str, namespace: str) -> None:
    """Delete this run's keys from a Redis that outlives it (the embedded one goes anyway)."""
    client = Redis.from_url(redis_url)
    try:
        async for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            await client.unlink(key)
    finally:
        await client.aclose()


async def _read_log(server: DrainbusServer, serving: asyncio.Event) -> None:
    assert server.proc.stderr is not None
    async for raw in server.proc.stderr:
        try:
            event: dict[str, Any] = json.loads(raw)
        except ValueError:
            event = {"event": "(raw)", "text": raw.decode(errors="replace").rstrip()}
        if not isinstance(event, dict):
            continue
        server.log.append(event)
        name = event.get("event")
        if name == "embedded_redis_started":
            server.redis_url = f"unix://{event['socket']}"
            server.redis_pid = int(event["pid"])
        elif name == "serving" and "worker" not in event:  # the supervisor's: all serve
            server.port = int(event["port"])
            serving.set()


def _tail(server: DrainbusServer) -> str:
    return " | ".join(json.dumps(event) for event in server.log[-5:]) or "(no output)"
