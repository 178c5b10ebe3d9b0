"""A fleet of asyncssh ``sub`` clients and one ``pub``, in a process of their own.

Run by the benchmark as ``python -m bench.fleet '<json options>'``; prints one JSON object.
It does what floor_fanout.py's client half does, against drainbus: connect N subscribers
in batches of 50 (the connection rate), read the server's memory before and after
(per-subscriber cost), then publish timestamps every ``gap`` seconds and record when each
subscriber receives each one (delivery latency). Unlike the floor, which sleeps and hopes,
it first checks that every subscriber is attached (``held``), because a drainbus ``sub``
only sees messages stored after it attached.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import asyncssh

from bench.report import percentile
from bench.server import rss_kib

__all__ = ["FleetOptions", "run_fleet"]

_BATCH = 50  # connections opened concurrently, as in floor_fanout.py
_SYNC_EVERY = 0.2
_SYNC_TIMEOUT = 60.0


@dataclass(frozen=True)
class FleetOptions:
    """What one fleet run does; passed to the process as JSON."""

    port: int
    key: str
    topic: str
    subs: int
    messages: int
    gap: float
    server_pids: tuple[int, ...]  # serve, or its workers: their RSS is summed
    other_pids: tuple[int, ...] = ()  # e.g. the embedded Redis: its memory is reported apart
    settle: float = 1.0  # seconds before reading memory once all are attached, as the floor
    user: str = "bench"


def _rss_total(pids: tuple[int, ...]) -> int:
    return sum(rss_kib(pid) or 0 for pid in pids)


async def _connect(options: FleetOptions, key: asyncssh.SSHKey) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        options.port,
        username=options.user,
        client_keys=[key],
        known_hosts=None,
        agent_path=None,
        config=None,
        encoding=None,
    )


async def run_fleet(options: FleetOptions) -> dict[str, Any]:
    """Connect, check, measure; return the figures (see the module docstring)."""
    key = asyncssh.read_private_key(options.key)
    base = _rss_total(options.server_pids)
    others_base = {pid: rss_kib(pid) or 0 for pid in options.other_pids}
    subs: list[asyncssh.SSHClientProcess[bytes]] = []
    conns: list[asyncssh.SSHClientConnection] = []

    async def one() -> None:
        conn = await _connect(options, key)
        conns.append(conn)
        subs.append(await conn.create_process(f"sub {options.topic}"))

    started = time.perf_counter()
    for i in range(0, options.subs, _BATCH):
        await asyncio.gather(*(one() for _ in range(min(_BATCH, options.subs - i))))
    setup = time.perf_counter() - started

    pub_conn = await _connect(options, key)
    pub = await pub_conn.create_process(f"pub {options.topic}")
    ready = [asyncio.Event() for _ in subs]
    latencies: list[float] = []

    async def read(process: asyncssh.SSHClientProcess[bytes], attached: asyncio.Event) -> None:
        while (line := await process.stdout.readline()) != b"go\n":
            if not line:
                raise RuntimeError(f"a subscriber ended: {await process.stderr.read()!r}")
            attached.set()  # any sync line: this subscriber is attached
        now = time.perf_counter_ns
        for _ in range(options.messages):
            line = await process.stdout.readline()
            latencies.append((now() - int(line)) / 1e6)

    readers = [asyncio.create_task(read(p, r)) for p, r in zip(subs, ready, strict=True)]
    held = await _sync(pub, ready)
    for reader, attached in zip(readers, ready, strict=True):
        if not attached.is_set():  # never attached: counted as not held, not waited for
            reader.cancel()
    readers = [r for r, attached in zip(readers, ready, strict=True) if attached.is_set()]
    pub.stdin.write(b"go\n")
    # "go" goes to every subscriber too: the first timed message keeps the rate's spacing
    # from it, or it would be timed queueing behind the benchmark's own message.
    await asyncio.sleep(max(options.settle, options.gap))
    after = _rss_total(options.server_pids)
    others_after = {pid: rss_kib(pid) or 0 for pid in options.other_pids}

    for _ in range(options.messages):
        pub.stdin.write(f"{time.perf_counter_ns()}\n".encode())
        await asyncio.sleep(options.gap)
    await asyncio.wait_for(asyncio.gather(*readers), _SYNC_TIMEOUT)
    latencies.sort()

    pub.stdin.write_eof()
    await pub.wait_closed()
    for conn in (*conns, pub_conn):
        conn.close()
    return {
        "subs": options.subs,
        "held": held,
        "setup_s": setup,
        "conn_per_s": options.subs / setup if setup else None,
        "rss_base_kib": base,
        "rss_after_kib": after,
        "kib_per_sub": (after - base) / options.subs if options.subs else None,
        "other_rss_delta_kib": {
            str(pid): others_after[pid] - others_base[pid] for pid in options.other_pids
        },
        "samples": len(latencies),
        "p50_ms": percentile(latencies, 0.5) if latencies else None,
        "p99_ms": percentile(latencies, 0.99) if latencies else None,
        "max_ms": latencies[-1] if latencies else None,
    }


async def _sync(pub: asyncssh.SSHClientProcess[bytes], ready: list[asyncio.Event]) -> int:
    """Publish sync lines until every subscriber got one; return how many did."""
    deadline = time.monotonic() + _SYNC_TIMEOUT
    n = 0
    while not all(r.is_set() for r in ready) and time.monotonic() < deadline:
        n += 1
        pub.stdin.write(f"sync {n}\n".encode())
        await asyncio.sleep(_SYNC_EVERY)
    return sum(r.is_set() for r in ready)


def main() -> None:
    """``python -m bench.fleet '<json>'``: run once, print the figures as JSON."""
    raw = json.loads(sys.argv[1])
    raw["other_pids"] = tuple(raw.get("other_pids", ()))
    raw["server_pids"] = tuple(raw["server_pids"])
    figures = asyncio.run(run_fleet(FleetOptions(**raw)))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
