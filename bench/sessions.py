"""11. No slow leak per session: serve's RSS over 10,000 short sessions.

Each session is a connection of its own (asyncssh, ``_CONCURRENT`` at a time) running one
of, in turn: ``whoami``; a one-line ``pub``; a ``sub`` closed after 0.2 s. serve's RSS is
read once the first 1,000 have ended (its warm-up: allocator arenas, caches, the first
stream readers) and again after all 10,000: the growth between the two is what a leak
would add, 3 MiB at most. ``--quick`` runs 300 sessions with its mark at 100, which keeps the
path running but says nothing about leaks.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import asyncssh

from bench.report import Row, Target, WorkloadResult
from bench.server import BENCH_USER, DrainbusServer, rss_kib

__all__ = ["short_sessions"]

_CONCURRENT = 8
_SUB_FOR = 0.2
_SETTLE = 1.0  # after the last session ends: serve finishes closing what it had open


async def _session(port: int, key: asyncssh.SSHKey, kind: int) -> bool:
    """One short session of ``kind`` (0 whoami, 1 pub, 2 sub); True if it went as expected."""
    async with asyncssh.connect(
        "127.0.0.1", port, username=BENCH_USER, client_keys=[key], known_hosts=None,
        agent_path=None, config=None, encoding=None,
    ) as conn:  # fmt: skip
        if kind == 0:
            return (await conn.run("whoami")).exit_status == 0
        if kind == 1:
            return (await conn.run("pub bench/sessions", input=b"x\n")).exit_status == 0
        process = await conn.create_process("sub bench/sessions")
        await asyncio.sleep(_SUB_FOR)  # the session's length is the workload, not a wait
        process.close()
        await process.wait_closed()
        return True


async def _run(port: int, key: asyncssh.SSHKey, kinds: itertools.count[int], n: int) -> int:
    """Run ``n`` sessions, ``_CONCURRENT`` at a time; return how many failed."""
    left = iter(range(n))
    failed = 0

    async def worker() -> None:
        nonlocal failed
        for _ in left:
            try:
                ok = await _session(port, key, next(kinds) % 3)
            except (OSError, asyncssh.Error):
                ok = False
            failed += not ok

    await asyncio.gather(*(worker() for _ in range(_CONCURRENT)))
    return failed


def _rss(server: DrainbusServer) -> int:
    return sum(rss_kib(pid) or 0 for pid in server.serving_pids)


async def short_sessions(
    server: DrainbusServer, key_path: Path, result: WorkloadResult, *, quick: bool
) -> None:
    """Run the sessions against ``server``; add the RSS rows to ``result``."""
    result.has_floor = False
    total, mark = (300, 100) if quick else (10_000, 1_000)
    key = asyncssh.read_private_key(str(key_path))
    kinds = itertools.count()
    started = time.perf_counter()
    failed = await _run(server.port, key, kinds, mark)
    await asyncio.sleep(_SETTLE)
    at_mark = _rss(server)
    failed += await _run(server.port, key, kinds, total - mark)
    seconds = time.perf_counter() - started
    await asyncio.sleep(_SETTLE)
    at_end = _rss(server)
    mib = 1024.0
    result.rows += [
        Row(f"serve RSS growth, sessions {mark:,} -> {total:,}", "MiB", (at_end - at_mark) / mib,
            target=None if quick else Target("value<=", 3),
            note=f"RSS {at_mark / mib:.1f} MiB after {mark:,}, {at_end / mib:.1f} MiB after "
                 f"{total:,}"),
        Row("short sessions per second", "sessions/s", total / seconds,
            note=f"{_CONCURRENT} at a time, each a new connection; {failed} failed"),
    ]  # fmt: skip
    if failed:
        raise RuntimeError(f"{failed} of {total} sessions failed")
