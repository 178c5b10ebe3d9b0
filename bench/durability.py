"""10. What each ``topics.durability`` mode costs a publish, on a primary and its replica.

It starts its own pair of servers (the embedded server's binary, ``appendonly yes`` and
``appendfsync everysec`` on both, as the embedded server runs), whatever ``--redis-url``
says: ``replica`` needs a replica, and the figures must not depend on another load. Then,
in this process, one drainbus publisher stores one-line batches in a row, for each mode:

- ``reply only``: what ``pub`` counted as stored before the persistence check (Redis's reply);
- ``os``: the reply, then an ``INFO persistence`` read (the default now);
- ``fsync``: ``WAITAOF 1 0``, under ``everysec`` and then under ``appendfsync always``;
- ``replica``: ``WAITAOF 1 1``.

And 32 publishers at once, ``reply only`` against ``os``: the one ``INFO`` every waiting
publisher shares is what keeps ``os`` cheap under load (batches per second).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bench.report import Row, WorkloadResult, percentile
from drainbus.bus.connection import command_client
from drainbus.bus.embedded import find_server_binary
from drainbus.bus.persistence import Persistence
from drainbus.bus.publisher import Publisher
from drainbus.bus.streams import Keys
from drainbus.lifeline import die_with_parent
from drainbus.values import Durability

__all__ = ["durability"]

_CONCURRENT = 32
_POLL = 0.05


@contextlib.contextmanager
def _pair(base: Path) -> Iterator[tuple[str, str]]:
    """A primary and its replica on unix sockets; their URLs. Killed on exit."""
    binary = find_server_binary()
    if binary is None:
        raise RuntimeError("no valkey-server or redis-server to run")
    processes: list[subprocess.Popen[bytes]] = []
    base.mkdir(parents=True, exist_ok=True)
    sockets = [base / "primary.sock", base / "replica.sock"]
    port = _free_port()
    try:
        for index, sock in enumerate(sockets):
            folder = base / sock.stem
            folder.mkdir(parents=True)
            args = [str(binary), "--port", str(port if index == 0 else 0), "--bind", "127.0.0.1",
                    "--unixsocket", str(sock), "--dir", str(folder), "--save", "",
                    "--appendonly", "yes", "--appendfsync", "everysec"]  # fmt: skip
            if index == 1:
                args += ["--replicaof", "127.0.0.1", str(port)]
            # The main thread only (bench.run has no other), where preexec_fn is safe.
            process = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),  # noqa: PLW1509
            )
            processes.append(process)
        yield f"unix://{sockets[0]}", f"unix://{sockets[1]}"
    finally:
        for process in processes:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_linked(primary_url: str, replica_url: str) -> None:
    primary, replica = command_client(primary_url), command_client(replica_url)
    try:
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(Exception):
                    info = await replica.info("replication")
                    if info.get("master_link_status") == "up" and await primary.ping():
                        return
                await asyncio.sleep(_POLL)  # servers have no readiness event: poll
    finally:
        await primary.aclose()
        await replica.aclose()


async def _one_by_one(publisher: Publisher, topic: str, n: int) -> list[float]:
    """Milliseconds each of ``n`` one-line publishes took, in a row, sorted."""
    times = []
    for i in range(n):
        started = time.perf_counter()
        await publisher.publish(topic, [f"m{i}".encode()], user="bench")
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)


async def _concurrent(publisher: Publisher, topic: str, n: int) -> float:
    """Batches per second with ``_CONCURRENT`` publishers storing ``n`` batches each."""

    async def one() -> None:
        for i in range(n):
            await publisher.publish(topic, [f"m{i}".encode()], user="bench")

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(_CONCURRENT)))
    return _CONCURRENT * n / (time.perf_counter() - started)


async def durability(workdir: Path, result: WorkloadResult, *, quick: bool) -> None:
    """Measure each mode (see the module docstring) and add a row per figure."""
    result.has_floor = False
    fast, slow = (30, 3) if quick else (2000, 60)  # slow: waits for a once-a-second fsync
    with _pair(workdir) as (primary_url, replica_url):
        await _wait_linked(primary_url, replica_url)
        redis = command_client(primary_url)
        try:
            persistence = Persistence(redis)
            await persistence.check_support({"fsync", "replica"})
            keys = Keys("bench")

            def publisher(mode: Durability | None) -> Publisher:
                return Publisher(redis, keys, max_len=100_000, retention=86400.0,
                                 persistence=None if mode is None else persistence,
                                 durability=lambda topic: mode or "os")  # fmt: skip

            modes: list[tuple[str, Durability | None, int]] = [
                ("reply only (before)", None, fast), ("os", "os", fast),
                ("fsync, appendfsync everysec", "fsync", slow),
                ("replica, everysec on both", "replica", slow),
            ]  # fmt: skip
            for label, mode, n in modes:
                _latency_rows(result, label, await _one_by_one(publisher(mode), "lat", n))
            await redis.config_set("appendfsync", "always")
            times = await _one_by_one(publisher("fsync"), "lat", fast)
            _latency_rows(result, "fsync, appendfsync always", times)
            await redis.config_set("appendfsync", "everysec")
            await _concurrent(publisher(None), "burst", max(1, fast // 10))  # warm-up
            for label, mode in (("reply only (before)", None), ("os", "os")):
                rate = await _concurrent(publisher(mode), "burst", max(1, fast // 10))
                result.rows.append(Row(f"{_CONCURRENT} publishers at once, {label}",
                                       "batches/s", rate))  # fmt: skip
        finally:
            await redis.aclose()
    result.notes.append(
        "one-line batches from one in-process publisher to a local valkey pair over unix "
        "sockets (no SSH): the cost each mode adds to every pub"
    )


def _latency_rows(result: WorkloadResult, label: str, times: list[float]) -> None:
    n = len(times)
    result.rows += [
        Row(f"publish p50, {label}", "ms", percentile(times, 0.5), note=f"{n} batches"),
        Row(f"publish p99, {label}", "ms", percentile(times, 0.99)),
    ]
