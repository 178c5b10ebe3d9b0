"""The workloads: each measures drainbus, then its floor in the same run, and returns rows.

Every workload starts a fresh ``drainbus serve`` (so one workload's leftovers never colour
the next one's figures, as each floor program is a fresh process too); the floor runs while
that server is up, against the same Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.durability import durability
from bench.floors import (
    FloorError,
    PubSubFloor,
    handshake_server,
    run_drain_floor,
    run_fanout_floor,
    run_pubsub_floor,
)
from bench.openssh import PubSubFigures, median, one_shot_publishes, pub_sub_figures
from bench.report import Row, Target, WorkloadResult
from bench.server import DrainbusServer, start_drainbus
from bench.sessions import short_sessions
from drainbus.bus.embedded import EmbeddedRedis

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
    purges: int  # workload 6: pub -> file gone / Cloudflare call, one purge at a time
    burst: int  # workload 6: URL purges in one pub, paced to the Enterprise plan's limits
    index_files: int  # workload 7: nginx cache files indexed
    index_repeat: int  # workload 7: cold builds, warm builds and tag purges of each
    receipt_purges: int  # workload 8: pub --wait, one purge at a time
    receipt_waiters: int  # workload 8: pub --wait sessions waiting at once
    drain_purges: int  # workload 9: url: purges, and tag: purges over as many cache files
    drain_backlog: int  # workload 9: url: purges in the backlog whose RSS growth is measured
    fair_burst: int  # workload 12: one user's url: purges queued ahead of another's one
    fair_rounds: int  # workload 12: rounds, each on a fresh stream


FULL = Sizes(
    n_lat=2000,
    n_tput=50_000,
    fanout=((100, 20.0, 200), (1000, 5.0, 50)),
    one_shots=20,
    capacity_subs=10_000,
    floor_timeout=300.0,
    purges=100,
    burst=50_000,
    index_files=100_000,
    index_repeat=3,
    receipt_purges=100,
    receipt_waiters=200,
    drain_purges=100_000,
    drain_backlog=1_000_000,
    fair_burst=20_000,
    fair_rounds=3,
)
QUICK = Sizes(
    n_lat=50,
    n_tput=2000,
    fanout=((10, 20.0, 6), (20, 5.0, 3)),
    one_shots=3,
    capacity_subs=100,
    floor_timeout=60.0,
    purges=5,
    burst=2000,
    index_files=2000,
    index_repeat=1,
    receipt_purges=3,
    receipt_waiters=20,
    drain_purges=300,
    drain_backlog=600,
    fair_burst=2000,
    fair_rounds=1,
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
    workers: int = 1  # drainbus serve --workers: 1 matches the floors, single processes
    _pubsub: tuple[PubSubFigures, PubSubFloor | None, list[str]] | None = field(
        default=None, repr=False
    )

    @asynccontextmanager
    async def drainbus(self, label: str) -> AsyncIterator[DrainbusServer]:
        """A fresh ``drainbus serve`` for one workload."""
        profile = self.profile_dir / f"{label}.prof" if self.profile_dir else None
        async with start_drainbus(
            self.workdir / label,
            self.key,
            redis_url=self.redis_url,
            profile=profile,
            workers=self.workers,
        ) as server:
            yield server

    def own_redis(self, stack: contextlib.ExitStack, name: str) -> str:
        """``--redis-url``, else the URL of an embedded server of the workload's own, named
        ``name`` in the work dir and stopped with ``stack``."""
        if self.redis_url:
            return self.redis_url
        return stack.enter_context(EmbeddedRedis(self.workdir / name)).url

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


async def _run_module(module: str, args: list[str], time_limit: float) -> str:
    """Run ``python -m module *args`` in a process of its own; return its stdout.

    Raises RuntimeError, with the end of its stderr, if it fails or outlives ``time_limit``
    (seconds).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), time_limit)
    except TimeoutError:
        raise RuntimeError(f"{module} did not finish within {time_limit:g} s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        tail = " | ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"{module} exited {proc.returncode}: {tail}")
    return out.decode()


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
        "server_pids": server.serving_pids,
        "other_pids": [server.redis_pid] if server.redis_pid else [],
        "settle": settle,
    }
    out = await _run_module("bench.fleet", [json.dumps(options)], bench.sizes.floor_timeout)
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
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
        Row(
            "idle subscribers held",
            "subs",
            float(ours["held"]),
            # The target is 10,000; --quick holds a hundred and is not judged.
            target=Target("value>=", 10_000) if subs >= 10_000 else None,
        ),
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


NO_FLOOR = "no floor program: the figures are judged against the issue's targets only"


async def purge_path(bench: Bench, result: WorkloadResult) -> None:
    """6. ``pub cache-drain`` returning -> nginx cache file gone; -> Cloudflare call sent;
    then a burst of URL purges paced to the Enterprise plan's limits.

    bench.purge_path runs its own ``drainbus serve`` (bus and drain daemon, default
    ``batch_window``) against a real nginx and a local stand-in for Cloudflare's API.
    """
    result.has_floor = False
    result.notes.append(NO_FLOOR)
    n, burst = bench.sizes.purges, bench.sizes.burst
    args = [str(n), "--burst", str(burst)]
    if bench.redis_url:
        args += ["--redis-url", bench.redis_url]
    figures = json.loads(await _run_module("bench.purge_path", args, bench.sizes.floor_timeout))
    gone, call = figures["nginx_file_gone_ms"], figures["cloudflare_call_ms"]
    before = (
        f"{call['before_pub_returned']} of {n} calls arrived before pub returned (counted as 0)"
    )
    b = figures["burst"]
    plan_rate = b["plan_urls_per_s"]
    result.rows += [
        Row(f"pub returns -> nginx file gone, p50 of {n}", "ms", gone["p50"]),
        Row(f"pub returns -> nginx file gone, p99 of {n}", "ms", gone["p99"], None,
            Target("value<=", 50)),
        Row("pub returns -> Cloudflare call, idle bus, p50", "ms", call["p50"], note=before),
        Row("pub returns -> Cloudflare call, idle bus, p99", "ms", call["p99"], None,
            Target("value<=", 20)),
        Row(f"burst of {burst:,} URL purges: URLs/s Cloudflare received", "URL/s", b["urls_per_s"],
            None, Target("value>=", 0.9 * plan_rate),
            note=f"first call to last; plan {plan_rate:,}/s; "
            f"end to end from pub start {b['end_to_end_urls_per_s']:.0f}/s, "
            f"after the first second {_per_s(b['steady_urls_per_s'])}"),
        Row("burst: 429 responses", "responses", b["responses_429"], None, Target("value<=", 0)),
        Row("burst: most URLs in one call", "URLs", b["max_urls_per_call"], None,
            Target("value<=", b["plan_files_per_call"]),
            note=f"{b['calls']} calls, {b['urls_accepted']:,} distinct URLs accepted"),
    ]  # fmt: skip


def _per_s(rate: float | None) -> str:
    return "n/a (under a second)" if rate is None else f"{rate:.0f}/s"


def _spread(values: list[float], unit: str) -> str:
    """The range of repeated figures, for a row's note."""
    if len(values) < 2:
        return ""
    return f"{len(values)} runs, median shown; range {min(values):.3g}-{max(values):.3g} {unit}"


async def nginx_index(bench: Bench, result: WorkloadResult) -> None:
    """7. nginx cache index: build time (cold and warm) and a tag purge over many files.

    bench.nginx_index writes the files in nginx's on-disk format and runs the drain's
    nginx target (``NginxCache``) on them in a process of its own.
    """
    result.has_floor = False
    result.notes.append(NO_FLOOR)
    sizes = bench.sizes
    args = ["--files", str(sizes.index_files), "--repeat", str(sizes.index_repeat)]
    args += ["--workdir", str(bench.workdir)]
    # Writing the files takes longer than any floor program, so allow it three times as long.
    out = await _run_module("bench.nginx_index", args, 3 * sizes.floor_timeout)
    figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    files = f"{figures['files']:,} files"
    evicted = {
        "fadvise": "file pages evicted with posix_fadvise(DONTNEED); inodes stay cached",
        "drop_caches": "all caches dropped",
    }[figures["evicted_by"]]
    cold, warm = figures["build_cold_s"], figures["build_warm_s"]
    lookup, purge = figures["tag_lookup_ms"], figures["tag_purge_ms"]
    tagged = f"{figures['tag_files'][0]:,} files"
    result.rows += [
        Row(f"index build, cold, {files}", "s", median(cold), None, Target("value<=", 10),
            note="; ".join(filter(None, [evicted, _spread(cold, "s")]))),
        Row(f"index build, warm, {files}", "s", median(warm), None, Target("value<=", 10),
            note=_spread(warm, "s")),
        Row(f"tag lookup in the index, {tagged}", "ms", median(lookup), note=_spread(lookup, "ms")),
        Row(f"tag purge until deleted, {tagged}", "ms", median(purge), None,
            Target("value<=", 100), note=_spread(purge, "ms")),
        Row("index memory (RSS growth)", "MiB", figures["index_rss_kib"] / 1024),
    ]  # fmt: skip


async def receipts(bench: Bench, result: WorkloadResult) -> None:
    """8. ``pub --wait``: two drain nodes (nginx each) plus Cloudflare, and what waiting costs.

    bench.receipts runs two ``drainbus serve`` on one bus, each with its own real nginx, and a
    Cloudflare stand-in that answers in 50 ms.
    """
    result.has_floor = False
    result.notes.append(NO_FLOOR)
    sizes = bench.sizes
    args = [str(sizes.receipt_purges), "--waiters", str(sizes.receipt_waiters)]
    figures = json.loads(await _run_module("bench.receipts", args, sizes.floor_timeout))
    wait, n = figures["pub_wait_ms"], sizes.receipt_purges
    result.rows += [
        Row(f"pub --wait, 2 nginx nodes + Cloudflare (50 ms), p50 of {n}", "ms", wait["p50"]),
        Row(f"pub --wait, 2 nginx nodes + Cloudflare (50 ms), p99 of {n}", "ms", wait["p99"],
            None, Target("value<=", 150)),
        Row(f"plain OpenSSH pub in the same run, p50 of {n}", "ms",
            figures["plain_pub_ms"]["p50"], note=f"p99 {figures['plain_pub_ms']['p99']:.1f} ms"),
        Row(f"Redis CPU while {figures['waiters']} pub --wait sessions wait", "% of a core",
            100 * figures["redis_cpu_share_while_waiting"], None, Target("value<=", 1)),
    ]  # fmt: skip


async def drain(bench: Bench, result: WorkloadResult) -> None:
    """9. The drain daemon through a burst: url: and tag: purges/s, beside floor_drain.py.

    bench.drain runs the drain (one nginx target; again with a Free-plan Cloudflare zone in
    the same config) in a process of its own, against the same Redis the floor then uses:
    the embedded server, started here, unless ``--redis-url`` is given.
    """
    sizes = bench.sizes
    n, backlog = sizes.drain_purges, sizes.drain_backlog
    with contextlib.ExitStack() as stack:
        redis_url = bench.own_redis(stack, "drain-redis")
        args = ["--redis-url", redis_url, "--urls", str(n), "--tags", str(n), "--cloudflare"]
        # Writing the cache files and a large backlog take longer than any floor program.
        out = await _run_module("bench.drain", args, 4 * sizes.floor_timeout)
        figures: dict[str, Any] = json.loads(out)
        if backlog:
            # A process of its own: after the other phases its allocator would already hold
            # memory they freed, and the backlog's growth would read too low.
            args = ["--redis-url", redis_url, "--urls", "0", "--tags", "0"]
            out = await _run_module(
                "bench.drain", [*args, "--backlog", str(backlog)], 8 * sizes.floor_timeout
            )
            figures.update(json.loads(out))
        floor_cache = bench.workdir / "floor-drain-cache"
        floor_cache.mkdir(exist_ok=True)
        floor = await bench.floor(
            result, run_drain_floor(redis_url, n, floor_cache, sizes.floor_timeout)
        )
    floor_rate = floor.purges_per_s if floor else None
    url, tag = figures["url"], figures["tag"]
    url_cf, tag_cf = figures["url_with_cloudflare"], figures["tag_with_cloudflare"]
    mib = 1024
    result.rows += [
        Row(f"url: purges, {n:,} in one burst (files absent)", "purges/s", url["purges_per_s"],
            floor_rate, Target("ratio>=", 0.25),
            note="first read to last acknowledgement; floor: floor_drain.py, same Redis"),
        Row(f"tag: purges, {n:,} over {n:,} cache files (1 each)", "purges/s",
            tag["purges_per_s"], floor_rate, Target("ratio>=", 0.15),
            note=f"{tag['evicted']:,} files evicted; floor: floor_drain.py (url: purges)"),
        Row("url: purges, Free-plan Cloudflare in the same config", "purges/s",
            url_cf["purges_per_s"], floor_rate, Target("ratio>=", 0.25),
            note="the nginx group's figure while the cdn group waits out the Free plan"),
        Row("tag: purges, Free-plan Cloudflare in the same config", "purges/s",
            tag_cf["purges_per_s"], floor_rate, Target("ratio>=", 0.15)),
        Row(f"drain peak RSS growth, {n:,} url: burst", "MiB", url["rss_growth_kib"] / mib),
        Row(f"drain peak RSS growth, {n:,} tag: burst", "MiB", tag["rss_growth_kib"] / mib),
    ]  # fmt: skip
    if backlog:
        growth = figures["backlog"]
        result.rows.append(
            Row(f"drain peak RSS growth, {backlog:,}-purge backlog", "MiB",
                growth["rss_growth_kib"] / mib, None,
                # The target is for a 1,000,000-purge backlog; --quick is not judged.
                Target("value<=", 100) if backlog >= 1_000_000 else None,
                note=f"{growth['purges_per_s']:,.0f} purges/s through it")
        )  # fmt: skip


async def durability_modes(bench: Bench, result: WorkloadResult) -> None:
    """10. What each ``topics.durability`` mode adds to a publish (bench/durability.py)."""
    await durability(bench.workdir / "durability", result, quick=bench.sizes is QUICK)


async def sessions(bench: Bench, result: WorkloadResult) -> None:
    """11. serve's memory over many short sessions (bench/sessions.py)."""
    async with bench.drainbus("sessions") as server:
        await short_sessions(server, bench.key, result, quick=bench.sizes is QUICK)


async def fairness(bench: Bench, result: WorkloadResult) -> None:
    """12. Fair drain: one user's purge behind another user's burst, to nginx and Cloudflare.

    bench.fairness runs the drain (nginx plus a Free-plan Cloudflare stand-in answering in
    50 ms) in a process of its own, on the embedded server started here unless
    ``--redis-url`` is given.
    """
    result.has_floor = False
    result.notes.append(NO_FLOOR)
    sizes = bench.sizes
    burst, rounds = sizes.fair_burst, sizes.fair_rounds
    with contextlib.ExitStack() as stack:
        redis_url = bench.own_redis(stack, "fair-redis")
        args = ["--redis-url", redis_url, "--burst", str(burst), "--rounds", str(rounds)]
        figures = json.loads(await _run_module("bench.fairness", args, sizes.floor_timeout))
    nginx, cdn, before = figures["nginx_ms"], figures["cloudflare_ms"], figures["burst_done_before"]
    spread = f"median of {rounds}, worst {{:,.0f}} ms"
    result.rows += [
        Row(f"another user's purge behind a {burst:,}-purge burst -> nginx", "ms",
            nginx["median"], None, Target("value<=", 200), note=spread.format(nginx["max"])),
        Row(f"another user's purge behind a {burst:,}-purge burst -> Cloudflare (Free)", "ms",
            cdn["median"], None, Target("value<=", 1000), note=spread.format(cdn["max"])),
        Row("the burst's purges carried out on nginx before it", "purges", before["median"],
            note=f"of {burst:,}; in stream order it would be all of them"),
    ]  # fmt: skip


WORKLOADS: dict[str, tuple[str, Workload]] = {
    "latency": ("1. latency, OpenSSH pub -> sub", latency),
    "throughput": ("2. throughput, OpenSSH pub -> sub", throughput),
    "fanout": ("3. fan-out, asyncssh subscribers", fanout),
    "oneshot": ("4. one-shot publish", one_shot),
    "capacity": ("5. capacity, idle subscribers", capacity),
    "purge": ("6. purge path, pub -> nginx / Cloudflare", purge_path),
    "nginx_index": ("7. nginx index, build and tag purge", nginx_index),
    "receipts": ("8. receipts, pub --wait", receipts),
    "drain": ("9. drain throughput, url: and tag: bursts", drain),
    "durability": ("10. durability modes, publish cost", durability_modes),
    "sessions": ("11. short sessions, serve RSS", sessions),
    "fairness": ("12. fair drain, a purge behind another user's burst", fairness),
}
