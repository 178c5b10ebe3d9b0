"""Running the floor programs of ``../shared/bench-floor/`` and reading their figures.

The floors are thin asyncssh + Redis-streams servers with none of drainbus's features; each
drainbus figure is read as a ratio to its floor measured in the same run. They are run
unchanged, as separate processes, against the same Redis as drainbus, and their printed
lines are parsed. The Redis-backed ones run under ``floor_shim.py``, which gives their
clients the socket timeout they were written for (none); with an external Redis they leave
their own streams (``floor:t``, ``fan:t``) behind, as they always do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.server import make_key

__all__ = [
    "DrainFloor",
    "FanoutFloor",
    "FloorError",
    "PubSubFloor",
    "floor_dir",
    "handshake_server",
    "run_drain_floor",
    "run_fanout_floor",
    "run_pubsub_floor",
]

FLOOR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "bench-floor"
_SHIM = Path(__file__).resolve().parent / "floor_shim.py"

_LATENCY = re.compile(r"latency ms .*: p50=([\d.]+) p99=([\d.]+) max=([\d.]+)")
_THROUGHPUT = re.compile(r"throughput: ([\d,]+) msgs/s")
_CONNECT = re.compile(
    r"connect (\d+) subs: ([\d.]+)s \((\d+) conn/s\); server RSS (-?[\d.]+) MB -> (-?[\d.]+) MB "
    r"\((-?[\d.]+) KiB/sub\)"
)
_DRAIN = re.compile(r"floor drain: (\d+) url purges in ([\d.]+) s -> ([\d,]+) purges/s")
_DELIVERY = re.compile(r"delivery latency p50=([\d.]+) ms p99=([\d.]+) ms max=([\d.]+) ms")


class FloorError(Exception):
    """A floor program failed, timed out, or printed something unexpected."""


def floor_dir() -> Path | None:
    """The floor programs' directory, or None if this checkout has none beside it."""
    return FLOOR_DIR if (FLOOR_DIR / "floor_pubsub.py").is_file() else None


async def _run(
    script: str, *args: str, redis_url: str, time_limit: float, gap: float | None = None
) -> str:
    directory = floor_dir()
    if directory is None:
        raise FloorError(f"no floor programs in {FLOOR_DIR}")
    env = {**os.environ, "REDIS_URL": redis_url}
    if gap is not None:
        env["GAP"] = str(gap)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(_SHIM),  # see floor_shim.py: redis-py >= 6 would time the floor's XREAD out
        str(directory / script),
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its server child is in the group too: one kill ends both
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), time_limit)
    except TimeoutError:
        raise FloorError(f"{script} did not finish within {time_limit:.0f} s") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise FloorError(f"{script} exited {proc.returncode}: {' | '.join(tail)}")
    return text


def _search(pattern: re.Pattern[str], text: str, script: str) -> re.Match[str]:
    match = pattern.search(text)
    if match is None:
        raise FloorError(f"{script} printed no line matching {pattern.pattern!r}: {text!r}")
    return match


@dataclass(frozen=True)
class PubSubFloor:
    """floor_pubsub.py's figures: sequential latency (ms) and throughput (messages/s)."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    messages_per_s: float


async def run_pubsub_floor(
    redis_url: str, n_lat: int, n_tput: int, time_limit: float
) -> PubSubFloor:
    """``floor_pubsub.py redis N_LAT N_TPUT``: OpenSSH pub -> XADD -> XREAD -> OpenSSH sub."""
    script = "floor_pubsub.py"
    out = await _run(
        script, "redis", str(n_lat), str(n_tput), redis_url=redis_url, time_limit=time_limit
    )
    latency = _search(_LATENCY, out, script)
    throughput = _search(_THROUGHPUT, out, script)
    return PubSubFloor(
        p50_ms=float(latency[1]),
        p99_ms=float(latency[2]),
        max_ms=float(latency[3]),
        messages_per_s=float(throughput[1].replace(",", "")),
    )


@dataclass(frozen=True)
class FanoutFloor:
    """floor_fanout.py's figures: connection rate, memory per subscriber, delivery latency."""

    conn_per_s: float
    kib_per_sub: float
    p50_ms: float
    p99_ms: float


async def run_fanout_floor(
    redis_url: str, subs: int, messages: int, gap: float, time_limit: float
) -> FanoutFloor:
    """``GAP=gap floor_fanout.py SUBS MESSAGES``: N asyncssh subscribers in a second process."""
    script = "floor_fanout.py"
    out = await _run(
        script, str(subs), str(messages), redis_url=redis_url, time_limit=time_limit, gap=gap
    )
    connect = _search(_CONNECT, out, script)
    delivery = _search(_DELIVERY, out, script)
    return FanoutFloor(
        conn_per_s=float(connect[3]),
        kib_per_sub=float(connect[6]),
        p50_ms=float(delivery[1]),
        p99_ms=float(delivery[2]),
    )


@dataclass(frozen=True)
class DrainFloor:
    """floor_drain.py's figures: URL purges read, evicted and acknowledged per second."""

    purges: int
    seconds: float
    purges_per_s: float


async def run_drain_floor(
    redis_url: str, purges: int, cache_dir: Path, time_limit: float
) -> DrainFloor:
    """``floor_drain.py N CACHE_DIR``: read 1,000 at a time, unlink each file, one XACK."""
    script = "floor_drain.py"
    out = await _run(
        script, str(purges), str(cache_dir), redis_url=redis_url, time_limit=time_limit
    )
    match = _search(_DRAIN, out, script)
    return DrainFloor(
        purges=int(match[1]), seconds=float(match[2]), purges_per_s=float(match[3].replace(",", ""))
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def handshake_server(workdir: Path, client_key: Path) -> AsyncIterator[int]:
    """Run ``floor_handshake_server.py`` on a free port; yield the port once it answers."""
    directory = floor_dir()
    if directory is None:
        raise FloorError(f"no floor programs in {FLOOR_DIR}")
    host_key = workdir / "floor-host-key"
    if not host_key.exists():
        make_key(host_key)
    port = _free_port()
    log = (workdir / "floor-handshake.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(directory / "floor_handshake_server.py"),
        str(port),
        str(host_key),
        str(client_key.with_suffix(".pub")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,  # a file, not a pipe nobody reads: it must never block the server
        start_new_session=True,
    )
    try:
        await _wait_for_banner(port, proc, workdir / "floor-handshake.log")
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        log.close()


async def _wait_for_banner(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            tail = _tail(log)
            raise FloorError(f"floor_handshake_server.py exited {proc.returncode}: {tail}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        try:
            if (await asyncio.wait_for(reader.readline(), 5)).startswith(b"SSH-"):
                return
        finally:
            writer.close()
    raise FloorError("floor_handshake_server.py did not answer within 20 s")


def _tail(log: Path) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
