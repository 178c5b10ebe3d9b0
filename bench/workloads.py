"""The workloads: each measures drainbus, then its floor in the same run, and returns rows.

Every workload starts a fresh ``drainbus serve`` (so one workload's leftovers never colour
the next one's figures, as each floor program is a fresh process too); the floor runs while
that server is up, against the same Redis.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.floors import (
    FloorError,
    PubSubFloor,
    handshake_server,
    run_fanout_floor,
    run_pubsub_floor,
)
from bench.openssh import PubSubFigures, median, one_shot_publishes, pub_sub_figures
from bench.report import Row, Target, WorkloadResult
from bench.server import DrainbusServer, start_drainbus

__all__ = ["WORKLOADS", "Bench", "Sizes", "Workload"]

REPO = Path(__file__).resolve().parents[1]
OPENSSH_SSHD_ONE_SHOT_S = 0.343  # ../shared/bench-floor/README.md; not measured here

T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    """How much each workload does; ``QUICK`` only keeps every code path running."""

    n_lat: int
    n_tput: int
    fanout: tuple[tuple[int, float, int], ...]  # (subscribers, messages per second, messages)
    one_shots: int
    capacity_subs: int
    floor_timeout: float


FULL = Sizes(
    n_lat=2000,
    n_tput=50_000,
    fanout=((100, 20.0, 200), (1000, 5.0, 50)),
    one_shots=20,
    capacity_subs=2000,
    floor_timeout=300.0,
)
QUICK = Sizes(
    n_lat=50,
    n_tput=2000,
    fanout=((10, 20.0, 6), (20, 5.0, 3)),
    one_shots=3,
    capacity_subs=100,
    floor_timeout=60.0,
)


@dataclass
class Bench:
    """What every workload shares: sizes, the client key, where servers live, the Redis."""

    sizes: Sizes
    workdir: Path
    key: Path
    redis_url: str | None = None
    profile_dir: Path | None = None
    floors: bool = True
    _pubsub: tuple[PubSubFigures, PubSubFloor | None, list[str]] | None = field(
        default=None, repr=False
    )

    @asynccontextmanager
    async def drainbus(self, label: str) -> AsyncIterator[DrainbusServer]:
        """A fresh ``drainbus serve`` for one workload."""
        profile = self.profile_dir / f"{label}.prof" if self.profile_dir else None
        async with start_drainbus(
            self.workdir / label, self.key, redis_url=self.redis_url, profile=profile
        ) as server:
            yield server

    async def floor(self, result: WorkloadResult, run: Awaitable[T]) -> T | None:
        """Run a floor program; on failure note why and return None (the column stays empty)."""
        if not self.floors:
            if asyncio.iscoroutine(run):
                run.close()
            return None
        try:
            return await run
        except FloorError as exc:
            result.notes.append(f"floor unavailable: {exc}")
            return None

    async def pubsub(self) -> tuple[PubSubFigures, PubSubFloor | None, list[str]]:
        """Workloads 1 and 2 share one pub -> sub run, as floor_pubsub.py does."""
        if self._pubsub is None:
            scratch = WorkloadResult("pubsub", "pub -> sub")
            sizes = self.sizes
            async with self.drainbus("pubsub") as server:
                ours = await pub_sub_figures(
                    server.port, self.key, "bench/lat", sizes.n_lat, sizes.n_tput
                )
                floor = await self.floor(
                    scratch,
                    run_pubsub_floor(
                        server.redis_url, sizes.n_lat, sizes.n_tput, sizes.floor_timeout
                    ),
                )
            self._pubsub = (ours, floor, scratch.notes)
        return self._pubsub


Workload = Callable[[Bench, WorkloadResult], Awaitable[None]]


async def latency(bench: Bench, result: WorkloadResult) -> None:
    """1. One OpenSSH pub -> one OpenSSH sub, sequential messages: p50 and p99."""
    ours, floor, notes = await bench.pubsub()
    result.notes += notes
    n = bench.sizes.n_lat
    result.rows += [
        Row(
            f"latency p50, {n} sequential msgs",
            "ms",
            ours.p50_ms,
            floor.p50_ms if floor else None,
            Target("ratio<=", 1.3),
        ),
        Row(
            f"latency p99, {n} sequential msgs",
            "ms",
            ours.p99_ms,
            floor.p99_ms if floor else None,
            Target("ratio<=", 1.5),
        ),
    ]


async def throughput(bench: Bench, result: WorkloadResult) -> None:
    """2. One pub -> one sub, 41-byte lines: messages per second."""
    ours, floor, notes = await bench.pubsub()
    result.notes += notes
    result.rows.append(
        Row(
            f"throughput, {bench.sizes.n_tput:,} x 41 B lines",
            "msgs/s",
            ours.messages_per_s,
            floor.messages_per_s if floor else None,
            Target("ratio>=", 2.0),
        )
    )


async def _fleet(
    bench: Bench,
    server: DrainbusServer,
    *,
    topic: str,
    subs: int,
    messages: int,
    gap: float,
    settle: float = 0.0,
    require_all: bool = True,
) -> dict[str, Any]:
    """Run bench.fleet (asyncssh clients) in a process of its own; return its figures.

    Raises RuntimeError if it fails, or (``require_all``) if a subscriber never attached.
    """
    options = {
        "port": server.port,
        "key": str(bench.key),
        "topic": topic,
        "subs": subs,
        "messages": messages,
        "gap": gap,
        "server_pid": server.pid,
        "other_pids": [server.redis_pid] if server.redis_pid else [],
        "settle": settle,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fleet",
        json.dumps(options),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), bench.sizes.floor_timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"bench.fleet exited {proc.returncode}: {tail}")
    figures: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    if require_all and figures["held"] < subs:
        raise RuntimeError(f"only {figures['held']} of {subs} subscribers were attached")
    return figures


async def fanout(bench: Bench, result: WorkloadResult) -> None:
    """3. N asyncssh subscribers, one publisher at a fixed rate: delivery p50 and p99."""
    last = len(bench.sizes.fanout) - 1
    for index, (subs, rate, messages) in enumerate(bench.sizes.fanout):
        gap = 1.0 / rate
        async with bench.drainbus(f"fanout{subs}") as server:
            ours = await _fleet(
                bench, server, topic=f"bench/fan{subs}", subs=subs, messages=messages, gap=gap
            )
            floor = await bench.floor(
                result,
                run_fanout_floor(server.redis_url, subs, messages, gap, bench.sizes.floor_timeout),
            )
        label = f"fan-out {subs:,} subs x {rate:g}/s"
        result.rows += [
            Row(f"{label}: delivery p50", "ms", ours["p50_ms"], floor.p50_ms if floor else None),
            Row(
                f"{label}: delivery p99",
                "ms",
                ours["p99_ms"],
                floor.p99_ms if floor else None,
                # The target is for the largest fan-out only.
                Target("ratio<=", 0.5) if index == last else None,
            ),
        ]


async def one_shot(bench: Bench, result: WorkloadResult) -> None:
    """4. ``echo x | ssh … pub TOPIC`` on a fresh connection each time: median wall time."""
    n = bench.sizes.one_shots
    async with bench.drainbus("oneshot") as server:
        ours = median(await one_shot_publishes(server.port, bench.key, "bench/oneshot", n))

    async def thin_server() -> float:
        async with handshake_server(bench.workdir, bench.key) as port:
            return median(await one_shot_publishes(port, bench.key, "t", n))

    floor = await bench.floor(result, thin_server())
    result.rows += [
        Row(
            f"one-shot pub, median of {n}",
            "s",
            ours,
            floor,
            Target("ratio<=", 1.2),
            note="floor: floor_handshake_server.py (thin asyncssh server)",
        ),
        Row(
            "one-shot pub vs OpenSSH sshd",
            "s",
            ours,
            OPENSSH_SSHD_ONE_SHOT_S,
            note="floor: OpenSSH sshd + ForceCommand, the figure in bench-floor/README.md "
            "(another machine, not measured in this run)",
        ),
    ]


async def capacity(bench: Bench, result: WorkloadResult) -> None:
    """5. Idle subscribers held, memory per subscriber, connections set up per second."""
    subs = bench.sizes.capacity_subs
    async with bench.drainbus("capacity") as server:
        ours = await _fleet(
            bench,
            server,
            topic="bench/idle",
            subs=subs,
            messages=0,
            gap=0.0,
            settle=1.0,
            require_all=False,  # how many it holds is the figure
        )
        # The floor sends one message (it cannot send none); it does not affect its figures.
        floor = await bench.floor(
            result, run_fanout_floor(server.redis_url, subs, 1, 0.05, bench.sizes.floor_timeout)
        )
    result.rows += [
        Row("idle subscribers held", "subs", float(ours["held"])),
        Row(
            "memory per idle subscriber (serve RSS)",
            "KiB",
            ours["kib_per_sub"],
            floor.kib_per_sub if floor else None,
            Target("value<=", 64),
        ),
        Row(
            "connection set-up rate",
            "conn/s",
            ours["conn_per_s"],
            floor.conn_per_s if floor else None,
            Target("value>=", 200),
        ),
    ]
    for pid, delta in ours["other_rss_delta_kib"].items():
        result.rows.append(
            Row(
                "embedded Redis RSS growth per subscriber",
                "KiB",
                delta / subs,
                note=f"valkey (pid {pid}) is a separate process, not in the serve RSS",
            )
        )
    result.notes.append(
        f"serve RSS {ours['rss_base_kib'] / 1024:.1f} MiB -> {ours['rss_after_kib'] / 1024:.1f} MiB"
        f" with {subs:,} subscribers"
    )


async def not_measured(bench: Bench, result: WorkloadResult) -> None:
    """A hook for a workload of the issue that has no measurement yet."""
    result.status = "not measured yet"


WORKLOADS: dict[str, tuple[str, Workload]] = {
    "latency": ("1. latency, OpenSSH pub -> sub", latency),
    "throughput": ("2. throughput, OpenSSH pub -> sub", throughput),
    "fanout": ("3. fan-out, asyncssh subscribers", fanout),
    "oneshot": ("4. one-shot publish", one_shot),
    "capacity": ("5. capacity, idle subscribers", capacity),
    # Hooks: give each a function like the ones above when it gets measured.
    "workload6": ("6. (issue workload 6)", not_measured),
    "workload7": ("7. (issue workload 7)", not_measured),
}
