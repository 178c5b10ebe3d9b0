"""A fault suite anyone can run: break the bus under load and count what it lost.

    .venv/bin/python -m bench.faults [--quick] [--only NAME,...]

Each scenario runs real processes (``drainbus serve``, its workers, the embedded
Redis-compatible server, OpenSSH clients, the fake Cloudflare API of ``tests/fakes``), puts
load on them, injects one fault and prints one row:

* published: messages given to ``pub`` (purge lines, for the Cloudflare scenarios);
* acknowledged: of those, the ones in a ``pub`` that exited 0 (the bus said "stored");
* received: acknowledged messages that arrived (at every subscriber; at Cloudflare);
* lost: acknowledged messages that never arrived (summed over subscribers);
* duplicated: deliveries of a message id a subscriber already had (Cloudflare: items
  purged more than once), which at-least-once allows and ``--json``'s id lets a reader drop;
* recovery: seconds from the fault until a message published after it reached every
  subscriber (Cloudflare: until every acknowledged purge was carried out).

A ``pub`` whose exit status Python lost (a rare "Unknown child process" warning) counts as
not acknowledged: its lines are then not checked, never wrongly counted as lost.

Subscribers are ``sub TOPIC --durable NAME --json`` in a restart loop, as an operator would
run them. The exit status is 1 if any scenario lost an acknowledged message, 2 if one could
not run; a scenario the machine cannot host (disk full needs a tmpfs mount) is skipped with
the reason. Figures are printed, never judged on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.openssh import ssh_argv
from bench.server import DrainbusServer, make_key, start_drainbus
from drainbus.bus.embedded import EmbeddedRedis
from tests.fakes.cloudflare_api import FakeCloudflare  # the one fake Cloudflare, as tests use

__all__ = ["main"]

_TOPIC = "bench/faults"
_CHUNK = 20  # lines per pub
_SETTLE_S = 30.0  # how long acknowledged messages get to arrive once the load stopped


@dataclass
class Row:
    """One scenario's figures."""

    name: str
    published: int = 0
    acknowledged: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    recovery_s: float | None = None
    status: str = "ok"  # ok, LOSS, skipped, failed
    note: str = ""


@dataclass
class Sizes:
    """How long each phase lasts (seconds) and how big the load is."""

    before: float
    after: float
    publishers: int
    subscribers: int
    purges: int


QUICK = Sizes(before=2.0, after=3.0, publishers=2, subscribers=2, purges=600)
FULL = Sizes(before=10.0, after=20.0, publishers=4, subscribers=3, purges=5000)


# --- pub/sub under a fault ---------------------------------------------------------------


@dataclass
class _Sub:
    name: str
    got: dict[str, float] = field(default_factory=dict)  # data -> first arrival
    ids: set[str] = field(default_factory=set)
    duplicated: int = 0
    proc: asyncio.subprocess.Process | None = None


class Traffic:
    """Publishers and durable subscribers over OpenSSH, against whichever node is up."""

    def __init__(self, key: Path, ports: Callable[[], list[int]], sizes: Sizes) -> None:
        self._key = key
        self._ports = ports
        self.sizes = sizes
        self.published = 0
        self.acked: dict[str, float] = {}  # data -> when the pub that stored it started
        self.subs = [_Sub(f"s{i}") for i in range(sizes.subscribers)]
        self._stop_pub = asyncio.Event()
        self._stop_sub = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._publishers: list[asyncio.Task[None]] = []

    def _port(self, turn: int) -> int:
        ports = self._ports()
        return ports[turn % len(ports)]

    async def start(self) -> None:
        self._tasks += [asyncio.create_task(self._subscribe(s)) for s in self.subs]
        # Each name's first session starts at the topic's beginning (--since all): no
        # publisher needs to wait for it.
        self._publishers = [asyncio.create_task(self._publish(f"p{i}"))
                            for i in range(self.sizes.publishers)]  # fmt: skip

    async def _publish(self, name: str) -> None:
        seq = turn = 0
        while not self._stop_pub.is_set():
            lines = [f"{name}-{seq + i}" for i in range(_CHUNK)]
            seq += _CHUNK
            self.published += len(lines)
            proc = await asyncio.create_subprocess_exec(
                *ssh_argv(self._port(turn), self._key, "pub", _TOPIC),
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            turn += 1
            started = time.monotonic()
            await proc.communicate("".join(f"{line}\n" for line in lines).encode())
            if proc.returncode == 0:
                self.acked.update(dict.fromkeys(lines, started))
            else:
                await asyncio.sleep(0.1)  # the publisher's pause before trying again

    async def stop_publishing(self) -> None:
        """Let each publisher finish the ``pub`` it is in (its exit status decides), then stop.

        Not cancelled: an ``ssh`` left running would be reaped later by another
        subprocess call, and asyncio would report it as exit 255.
        """
        self._stop_pub.set()
        await asyncio.gather(*self._publishers)

    async def _subscribe(self, sub: _Sub) -> None:
        turn = 0
        while not self._stop_sub.is_set():
            argv = ssh_argv(self._port(turn), self._key, "sub", _TOPIC, "--durable", sub.name,
                            "--since", "all", "--json")  # fmt: skip
            turn += 1
            sub.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, limit=1 << 20,
            )  # fmt: skip
            assert sub.proc.stdout is not None
            try:
                while line := await sub.proc.stdout.readline():
                    message = json.loads(line)
                    if message["id"] in sub.ids:
                        sub.duplicated += 1
                        continue
                    sub.ids.add(message["id"])
                    sub.got.setdefault(message["data"], time.monotonic())
            finally:
                if sub.proc.returncode is None:
                    sub.proc.kill()
                await sub.proc.wait()
            await asyncio.sleep(0.1)  # the restart loop's pause, as in a shell loop

    async def finish(self, row: Row, fault_at: float | None) -> None:
        """Stop publishing, give subscribers time to catch up, fill in ``row``."""
        await self.stop_publishing()
        deadline = time.monotonic() + _SETTLE_S
        while time.monotonic() < deadline and not all(  # noqa: ASYNC110 - counts, not an event
            self.acked.keys() <= s.got.keys() for s in self.subs
        ):
            await asyncio.sleep(0.1)
        self._stop_sub.set()
        for sub in self.subs:
            if sub.proc is not None and sub.proc.returncode is None:
                sub.proc.kill()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        row.published = self.published
        row.acknowledged = len(self.acked)
        row.received = len(set.intersection(*(set(s.got) & set(self.acked) for s in self.subs)))
        row.lost = sum(len(self.acked.keys() - s.got.keys()) for s in self.subs)
        row.duplicated = sum(s.duplicated for s in self.subs)
        if fault_at is not None:
            later = [m for m, at in self.acked.items() if at > fault_at]
            arrivals = [max(s.got.get(m, float("inf")) for s in self.subs) for m in later]
            first = min(arrivals, default=float("inf"))
            row.recovery_s = round(first - fault_at, 2) if first != float("inf") else None


async def _pubsub(
    name: str, ctx: Context, fault: Callable[[Traffic], Awaitable[None]], *, workers: int = 1
) -> Row:
    """Serve on a Redis of the scenario's own, load it, inject ``fault``, count."""
    row = Row(name)
    async with AsyncExitStack() as stack:
        redis = ctx.redis(name)
        stack.callback(redis.stop)
        server = await stack.enter_async_context(
            start_drainbus(ctx.root(name), ctx.key, redis_url=redis.url, workers=workers)
        )
        ctx.servers = [server]
        traffic = Traffic(ctx.key, lambda: [s.port for s in ctx.servers if s.port], ctx.sizes)
        ctx.stack = stack
        ctx.redis_server = redis
        await traffic.start()
        await asyncio.sleep(ctx.sizes.before)  # load before the fault
        fault_at = time.monotonic()
        await fault(traffic)
        await asyncio.sleep(ctx.sizes.after)  # load after it
        # ... and on until a pub started after the fault was stored, so recovery is known.
        deadline = time.monotonic() + _SETTLE_S
        while time.monotonic() < deadline and max(traffic.acked.values(), default=0) < fault_at:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await traffic.finish(row, fault_at)
    row.status = "LOSS" if row.lost else "ok"
    return row


@dataclass
class Context:
    """What every scenario shares: the run's folder, the client key and the sizes."""

    workdir: Path
    key: Path
    sizes: Sizes
    servers: list[DrainbusServer] = field(default_factory=list)
    stack: AsyncExitStack | None = None
    redis_server: EmbeddedRedis | None = None

    def root(self, name: str) -> Path:
        path = self.workdir / f"{name}-{len(list(self.workdir.iterdir()))}"
        path.mkdir()
        return path

    def redis(self, name: str) -> EmbeddedRedis:
        server = EmbeddedRedis(self.root(f"r-{name}"))
        server.start()
        return server


async def redis_kill(ctx: Context) -> Row:
    """kill -9 the Redis server under load; start it again a second later."""

    async def fault(traffic: Traffic) -> None:
        server = ctx.redis_server
        assert server is not None
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        await asyncio.to_thread(server.stop)  # reaps it and frees the data dir's lock
        await asyncio.sleep(1.0)  # down for a second
        await asyncio.to_thread(server.start)

    return await _pubsub("redis-kill", ctx, fault)


async def worker_kill(ctx: Context) -> Row:
    """kill -9 both workers of ``serve --workers 2``; the supervisor restarts them."""

    async def fault(traffic: Traffic) -> None:
        for pid in ctx.servers[0].serving_pids:
            os.kill(pid, signal.SIGKILL)

    return await _pubsub("worker-kill", ctx, fault, workers=2)


async def node_kill(ctx: Context) -> Row:
    """Two nodes on one Redis; kill -9 one, start a new one in its place."""

    async def fault(traffic: Traffic) -> None:
        assert ctx.stack is not None
        assert ctx.redis_server is not None
        first = ctx.servers[0]
        namespace = first.namespace
        second = await ctx.stack.enter_async_context(
            start_drainbus(
                ctx.root("node"), ctx.key, redis_url=ctx.redis_server.url, namespace=namespace
            )
        )
        ctx.servers.append(second)
        await asyncio.sleep(ctx.sizes.before / 2)
        ctx.servers.remove(first)
        first.proc.kill()
        third = await ctx.stack.enter_async_context(
            start_drainbus(
                ctx.root("node"), ctx.key, redis_url=ctx.redis_server.url, namespace=namespace
            )
        )
        ctx.servers.append(third)

    return await _pubsub("node-kill", ctx, fault)


async def stopped_sub(ctx: Context) -> Row:
    """SIGSTOP one subscriber's ssh for the length of the load, then SIGCONT."""

    async def fault(traffic: Traffic) -> None:
        proc = traffic.subs[0].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(ctx.sizes.after)
        proc.send_signal(signal.SIGCONT)

    return await _pubsub("stopped-sub", ctx, fault)


# --- Cloudflare ----------------------------------------------------------------------------


@dataclass
class _Node:
    """A serve node with a drain for the fake Cloudflare, and how to start another."""

    fake: FakeCloudflare
    server: DrainbusServer
    stack: AsyncExitStack
    root: Path
    redis_url: str
    config: str

    async def restart(self, key: Path) -> None:
        self.server = await self.stack.enter_async_context(
            start_drainbus(self.root, key, redis_url=self.redis_url,
                           namespace=self.server.namespace, extra_config=self.config)
        )  # fmt: skip


async def _purges(name: str, ctx: Context, storm: Callable[[_Node], Awaitable[None]],
                  fake: FakeCloudflare) -> Row:  # fmt: skip
    """Publish purge lines through serve's drain to the fake Cloudflare; ``storm(node)``
    breaks something; count what Cloudflare purged, once or twice."""
    row = Row(name)
    lines = [f"fault-{i}" for i in range(ctx.sizes.purges)]
    fake.start()
    try:
        async with AsyncExitStack() as stack:
            redis = ctx.redis(name)
            stack.callback(redis.stop)
            drain = ('\n[[acl]]\ntopics = ["cache-drain"]\npublish = ["*"]\nsubscribe = ["*"]\n'
                     f'\n[drain]\nnode = "{name}"\n[drain.cloudflare]\nzone_id = "zone-a"\n'
                     f'api_token = "test-token"\napi_base = "{fake.api_base}"\n'
                     'plan = "enterprise"\ntimeout = "1s"\n')  # fmt: skip
            root = ctx.root(name)
            server = await stack.enter_async_context(
                start_drainbus(root, ctx.key, redis_url=redis.url, extra_config=drain)
            )
            row.published = len(lines)
            pub = await asyncio.create_subprocess_exec(
                *ssh_argv(server.port, ctx.key, "pub", "cache-drain"),
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            _, err = await pub.communicate("".join(f"{x}\n" for x in lines).encode())
            if pub.returncode != 0:
                raise RuntimeError(f"pub exited {pub.returncode}: {err.decode()[-300:]}")
            row.acknowledged = len(lines)
            fault_at = time.monotonic()
            await storm(_Node(fake, server, stack, root, redis.url, drain))
            deadline = time.monotonic() + _SETTLE_S + ctx.sizes.after
            done: set[str] = set()
            while time.monotonic() < deadline:
                done = {i for r in fake.accepted for i in r.items}
                if done >= set(lines):
                    row.recovery_s = round(time.monotonic() - fault_at, 2)
                    break
                await asyncio.sleep(0.1)
            sent = Counter(i for r in fake.accepted for i in r.items)
            row.received = len(done & set(lines))
            row.lost = len(set(lines) - done)
            row.duplicated = sum(n - 1 for n in sent.values() if n > 1)
            row.note = f"{len(fake.received)} calls"
    finally:
        await asyncio.to_thread(fake.stop)
    row.status = "LOSS" if row.lost else "ok"
    return row


async def cloudflare_storm(ctx: Context) -> Row:
    """Cloudflare answers 429s (Retry-After 1), 500s, 503s and hangs for a while."""

    async def storm(node: _Node) -> None:
        fake = node.fake
        fake.fail_next(3, status=429, code=1134, headers={"Retry-After": "1"})
        fake.fail_next(3, status=500)
        fake.hang_next(2)
        fake.fail_next(3, status=503)

    return await _purges(
        "cloudflare-storm", ctx, storm, FakeCloudflare(plan="enterprise", hang_seconds=2.0)
    )


async def drain_kill(ctx: Context) -> Row:
    """kill -9 the node (its drain mid-batch, calls in flight), start it again."""

    async def storm(node: _Node) -> None:
        await asyncio.to_thread(node.fake.wait_for, 3, 20.0)
        node.server.proc.kill()
        await node.server.proc.wait()
        await node.restart(ctx.key)

    return await _purges(
        "drain-kill", ctx, storm, FakeCloudflare(plan="enterprise", answer_delay=0.2)
    )


async def disk_full(ctx: Context) -> Row:
    """Redis's data dir on a 16 MiB tmpfs that fills up; kill -9, make room, restart: every
    message ``pub`` called stored must still be there."""
    row = Row("disk-full")
    mount = ctx.root("disk")
    tried = await asyncio.to_thread(
        subprocess.run, ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if tried.returncode != 0:
        row.status, row.note = "skipped", f"cannot mount a tmpfs: {tried.stderr.strip()[:80]}"
        return row
    try:
        filler = mount / "filler"
        redis = EmbeddedRedis(mount / "r")
        redis.start()
        try:
            async with start_drainbus(ctx.root("disk-serve"), ctx.key, redis_url=redis.url) as s:
                await asyncio.to_thread(_fill, filler, 32 << 10)
                traffic = Traffic(ctx.key, lambda: [s.port], ctx.sizes)
                traffic.subs = []
                await traffic.start()
                await asyncio.sleep(ctx.sizes.before + ctx.sizes.after)
                await traffic.stop_publishing()
                assert redis.pid is not None
                os.kill(redis.pid, signal.SIGKILL)
                await asyncio.to_thread(redis.stop)
                filler.unlink()
                await asyncio.to_thread(redis.start)
                got = await _read_all(s.port, ctx.key)
        finally:
            await asyncio.to_thread(redis.stop)
        row.published, row.acknowledged = traffic.published, len(traffic.acked)
        row.received = len(traffic.acked.keys() & got)
        row.lost = row.acknowledged - row.received
        row.note = f"{row.published - row.acknowledged} refused while full"
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(mount)], check=False)
    row.status = "LOSS" if row.lost else "ok"
    return row


def _fill(path: Path, leave: int) -> None:
    """Fill ``path``'s file system to the last byte, then free ``leave`` bytes of it."""
    with path.open("wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)
    with path.open("r+b") as out:
        out.truncate(max(0, path.stat().st_size - leave))


async def _read_all(port: int, key: Path) -> set[str]:
    """Every message the topic holds now (``sub --since all`` until it goes quiet)."""
    proc = await asyncio.create_subprocess_exec(
        *ssh_argv(port, key, "sub", _TOPIC, "--since", "all", "--json"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, limit=1 << 20,
    )  # fmt: skip
    assert proc.stdout is not None
    got: set[str] = set()
    with contextlib.suppress(TimeoutError):
        while line := await asyncio.wait_for(proc.stdout.readline(), 3.0):
            got.add(json.loads(line)["data"])
    proc.kill()
    await proc.wait()
    return got


SCENARIOS: dict[str, Callable[[Context], Awaitable[Row]]] = {
    "redis-kill": redis_kill,
    "worker-kill": worker_kill,
    "node-kill": node_kill,
    "stopped-sub": stopped_sub,
    "cloudflare-storm": cloudflare_storm,
    "drain-kill": drain_kill,
    "disk-full": disk_full,
}


def _print(rows: list[Row]) -> None:
    head = ("scenario", "published", "acked", "received", "lost", "dup", "recovery s", "status")
    table = [head] + [
        (r.name, str(r.published), str(r.acknowledged), str(r.received), str(r.lost),
         str(r.duplicated), "-" if r.recovery_s is None else f"{r.recovery_s:.2f}",
         r.status + (f" ({r.note})" if r.note else ""))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    for t in table:
        cells = zip(t, widths, strict=True)
        print("  ".join(c.rjust(w) if 0 < i < 7 else c.ljust(w) for i, (c, w) in enumerate(cells))
              .rstrip())  # fmt: skip


async def _run(ctx: Context, names: list[str]) -> list[Row]:
    rows = []
    for name in names:
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            row = await SCENARIOS[name](ctx)
        except Exception as exc:  # one broken scenario must not hide the others' figures
            row = Row(name, status="failed", note=f"{type(exc).__name__}: {exc}"[:200])
        print(f"   {row.status} in {time.monotonic() - started:.1f} s", file=sys.stderr)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios; print the table; 1 on any loss, 2 if a scenario failed to run."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short phases (CI: under 2 min)")
    parser.add_argument("--only", metavar="NAME,...", help=", ".join(SCENARIOS))
    args = parser.parse_args(argv)
    names = [n.strip() for n in (args.only or "").split(",") if n.strip()] or list(SCENARIOS)
    if unknown := [n for n in names if n not in SCENARIOS]:
        parser.error(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    workdir = Path(tempfile.mkdtemp(prefix="dbf-"))  # short: unix sockets live in it
    ctx = Context(workdir, make_key(workdir / "id_faults"), QUICK if args.quick else FULL)
    rows = asyncio.run(_run(ctx, names))
    _print(rows)
    if any(r.status == "failed" for r in rows):
        return 2
    return 1 if any(r.lost for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
