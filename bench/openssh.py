"""Workloads driven by the real OpenSSH client, as users run it.

The same functions measure drainbus and the thin asyncssh floor server, so both sides see
exactly the same client, options and timing code.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.report import percentile

__all__ = ["PubSubFigures", "one_shot_publishes", "pub_sub_figures", "ssh_argv"]

SSH = shutil.which("ssh") or "/usr/bin/ssh"
_PAYLOAD = b"x" * 40 + b"\n"  # the 41-byte line of the throughput figure
_CHUNK_LINES = 1000
_SYNC_TIMEOUT = 30.0


def ssh_argv(port: int, key: Path, *command: str) -> list[str]:
    """The OpenSSH command line for running ``command`` on 127.0.0.1:``port``."""
    return [
        SSH, "-F", "/dev/null", "-T", "-p", str(port), "-i", str(key),
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "IdentityAgent=none", "-o", "ConnectTimeout=10",
        "bench@127.0.0.1", *command,
    ]  # fmt: skip


@dataclass(frozen=True)
class PubSubFigures:
    """Sequential latency (ms) and throughput (messages/s) of one pub -> one sub."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    messages_per_s: float


async def pub_sub_figures(
    port: int, key: Path, topic: str, n_lat: int, n_tput: int
) -> PubSubFigures:
    """One long-lived ``ssh … pub`` and one ``ssh … sub``, as floor_pubsub.py drives them.

    Latency: a timestamp line is written and read back, one at a time. Throughput: n_tput
    41-byte lines written in chunks of 1,000, timed until the subscriber has them all.
    Raises RuntimeError if a client fails or the subscriber never attaches.
    """
    sub = await asyncio.create_subprocess_exec(
        *ssh_argv(port, key, "sub", topic),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        limit=1 << 20,
    )
    pub = await asyncio.create_subprocess_exec(
        *ssh_argv(port, key, "pub", topic),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert sub.stdout is not None
        assert pub.stdin is not None
        await _wait_attached(pub.stdin, sub.stdout)
        latencies = []
        for _ in range(n_lat):
            pub.stdin.write(f"{time.perf_counter_ns()}\n".encode())
            await pub.stdin.drain()
            line = await asyncio.wait_for(sub.stdout.readline(), _SYNC_TIMEOUT)
            latencies.append((time.perf_counter_ns() - int(line)) / 1e6)
        latencies.sort()

        started = time.perf_counter()

        async def feed(stdin: asyncio.StreamWriter) -> None:
            for sent in range(0, n_tput, _CHUNK_LINES):
                stdin.write(_PAYLOAD * min(_CHUNK_LINES, n_tput - sent))
                await stdin.drain()

        feeder = asyncio.create_task(feed(pub.stdin))
        got = 0
        while got < n_tput:
            chunk = await asyncio.wait_for(sub.stdout.read(1 << 20), _SYNC_TIMEOUT)
            if not chunk:
                raise RuntimeError(f"sub ended after {got} of {n_tput} lines: {await _err(sub)}")
            got += chunk.count(b"\n")
        await feeder
        elapsed = time.perf_counter() - started

        pub.stdin.close()  # EOF: pub exits 0 once every message is stored
        code = await asyncio.wait_for(pub.wait(), _SYNC_TIMEOUT)
        if code != 0:
            raise RuntimeError(f"pub exited {code}: {await _err(pub)}")
        return PubSubFigures(
            p50_ms=percentile(latencies, 0.5),
            p99_ms=percentile(latencies, 0.99),
            max_ms=latencies[-1] if latencies else float("nan"),
            messages_per_s=n_tput / elapsed,
        )
    finally:
        for proc in (pub, sub):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def _wait_attached(stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader) -> None:
    """Return once the subscriber receives what the publisher writes, with nothing pending.

    A ``sub`` only sees messages stored after it attached, so probes are written until one
    comes back; then a final marker is read up to, discarding any late probe before it.
    """
    deadline = time.monotonic() + _SYNC_TIMEOUT
    probe = 0
    while True:
        probe += 1
        stdin.write(f"probe {probe}\n".encode())
        await stdin.drain()
        try:
            await asyncio.wait_for(stdout.readline(), 0.2)
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError("the subscriber never received a message") from None
    stdin.write(b"ready\n")
    await stdin.drain()
    while (await asyncio.wait_for(stdout.readline(), _SYNC_TIMEOUT)) != b"ready\n":
        pass


async def one_shot_publishes(port: int, key: Path, topic: str, n: int) -> list[float]:
    """Wall seconds of ``echo x | ssh … pub TOPIC``, each on a fresh connection; one warm-up
    run is not counted. Raises RuntimeError if any run fails."""
    times = []
    for attempt in range(n + 1):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *ssh_argv(port, key, "pub", topic),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(b"x\n"), _SYNC_TIMEOUT)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"pub exited {proc.returncode}: {err.decode(errors='replace')}")
        if attempt:
            times.append(elapsed)
    return times


def median(values: list[float]) -> float:
    """The median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


async def _err(proc: asyncio.subprocess.Process) -> str:
    if proc.stderr is None:
        return ""
    try:
        data = await asyncio.wait_for(proc.stderr.read(), 2)
    except TimeoutError:
        return "(stderr unavailable)"
    return data.decode(errors="replace").strip()
