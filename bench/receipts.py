"""Receipts: how long `ssh bus pub cache-drain --wait` takes, and what waiting costs Redis.

Two real `drainbus serve` processes share one bus (the first one's embedded server), each
draining its own real nginx; both are consumers of the Cloudflare group, whose stand-in
answers each call after 50 ms, as the real API roughly does.

- **pub --wait latency**: from starting the OpenSSH `pub --wait` of one URL purge to its exit
  (both nginx caches evicted, Cloudflare accepted), one purge at a time.
- **Waiting cost**: 200 `pub --wait` sessions wait at once for a node that never answers (a
  status heartbeat with no drain behind it), and the Redis server's CPU time over that wait is
  divided by its length: the share of a core that waiting publishers cost Redis.

    .venv/bin/python -m bench.receipts [N] [--waiters W]

Prints the figures as JSON on stdout. `bench.run` runs it as workload 8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh
from redis.asyncio import Redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.openssh import ssh_argv  # noqa: E402
from bench.server import BENCH_USER, DrainbusServer, make_key, start_drainbus  # noqa: E402
from drainbus.bus.streams import Keys  # noqa: E402
from tests.fakes.cloudflare_api import FakeCloudflare  # noqa: E402
from tests.nginx_env import NginxEnv, run_nginx_env  # noqa: E402

HOST = "acme-blog.pages.example"
_WAIT_SECONDS = 6.0  # how long the waiters wait for the silent node
_SETTLE_SECONDS = 1.0  # after the last waiter published, before the CPU is sampled


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _drain_config(env: NginxEnv, cloudflare: FakeCloudflare, node: str) -> str:
    return (
        f'\n[drain]\nnode = "{node}"\nkey_host = "{{key}}.pages.example"\n'
        f'[[drain.nginx]]\nname = "pages"\ncache_path = "{env.cache_path}"\n'
        'key = "$scheme$host$request_uri"\n'
        f'[drain.cloudflare]\nzone_id = "zone"\napi_token = "test-token"\n'
        f'api_base = "{cloudflare.api_base}"\nplan = "enterprise"\n'
    )


async def measure(count: int = 50, waiters: int = 200) -> dict[str, Any]:
    """Time ``count`` purges with ``--wait``; then hold ``waiters`` waits and sample Redis."""
    work = Path(tempfile.mkdtemp(prefix="dbr-"))
    try:
        key = make_key(work / "id")
        with (
            run_nginx_env(work / "n1") as env1,
            run_nginx_env(work / "n2") as env2,
            FakeCloudflare(plan="enterprise", answer_delay=0.05) as cloudflare,
        ):
            async with (
                start_drainbus(
                    work / "a", key, extra_config=_drain_config(env1, cloudflare, "web1")
                ) as one,
                start_drainbus(
                    work / "b",
                    key,
                    redis_url=one.redis_url,
                    namespace=one.namespace,
                    extra_config=_drain_config(env2, cloudflare, "web2"),
                ),
            ):
                latencies, plain = await _wait_latencies(one, key, (env1, env2), count)
                cost = await _waiting_cost(one, key, waiters)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "purges": count,
        "pub_wait_ms": {
            "p50": _quantile(latencies, 0.5),
            "p99": _quantile(latencies, 0.99),
            "mean": statistics.fmean(latencies),
        },
        # The same OpenSSH pub without --wait, alternating with the waits: what the SSH
        # connection alone costs on this machine at this moment.
        "plain_pub_ms": {"p50": _quantile(plain, 0.5), "p99": _quantile(plain, 0.99)},
        **cost,
    }


async def _wait_latencies(
    server: DrainbusServer, key: Path, envs: tuple[NginxEnv, ...], count: int
) -> tuple[list[float], list[float]]:
    """Milliseconds of each ``pub --wait``, and of a plain ``pub`` run after each."""
    argv = ssh_argv(server.port, key, "pub", "cache-drain", "--wait")
    plain_argv = ssh_argv(server.port, key, "pub", "bench/plain")
    latencies, plain = [], []
    for n in range(count):
        path = f"/page/{n}"
        for env in envs:
            await asyncio.to_thread(env.prime, path, HOST)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(f"url:http://{HOST}{path}\n".encode())
        latencies.append((time.monotonic() - started) * 1000)
        lines = out.decode().splitlines()
        if proc.returncode != 0 or sum("1 object evicted" in line for line in lines) != 2:
            raise RuntimeError(f"pub --wait ended {proc.returncode}: {out!r} {err!r}")
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *plain_argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate(b"x\n")
        plain.append((time.monotonic() - started) * 1000)
        if proc.returncode != 0:
            raise RuntimeError(f"plain pub ended {proc.returncode}: {err!r}")
    return latencies, plain


async def _waiting_cost(server: DrainbusServer, key: Path, waiters: int) -> dict[str, Any]:
    redis = Redis.from_url(server.redis_url)
    keys = Keys(server.namespace)
    # A node that crashed a moment ago: a fresh status, and nothing draining behind it.
    status = {"node": "ghost", "roles": ["local"], "local_targets": ["pages"]}
    await redis.set(keys.drain_status("ghost"), json.dumps(status), px=60_000)
    await redis.zadd(keys.drain_nodes, {"ghost": int(time.time() * 1000)})
    client_key = asyncssh.read_private_key(key)
    connections = [
        await asyncssh.connect(
            "127.0.0.1",
            server.port,
            username=BENCH_USER,
            client_keys=[client_key],
            known_hosts=None,
            agent_path=None,
        )
        for _ in range(max(1, waiters // 50))
    ]
    try:
        published = 0
        waits = []
        for n in range(waiters):
            conn = connections[n % len(connections)]
            process = await conn.create_process(
                f"pub cache-drain --wait={_WAIT_SECONDS:g}s", encoding=None
            )
            process.stdin.write(f"tag:waiter-{n}\n".encode())
            process.stdin.write_eof()
            waits.append(asyncio.create_task(process.wait()))
            published += 1
        await asyncio.sleep(_SETTLE_SECONDS)  # a measuring interval, not a synchronisation
        before = await _redis_cpu(redis)
        started = time.monotonic()
        await asyncio.sleep(_WAIT_SECONDS - 2 * _SETTLE_SECONDS)
        after = await _redis_cpu(redis)
        seconds = time.monotonic() - started
        results = await asyncio.gather(*waits)
        codes = sorted({-1 if r.exit_status is None else r.exit_status for r in results})
    finally:
        for conn in connections:
            conn.close()
        await redis.aclose()
    return {
        "waiters": published,
        "waiter_exit_codes": codes,
        "redis_cpu_share_while_waiting": round((after - before) / seconds, 5),
    }


async def _redis_cpu(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def main(argv: list[str] | None = None) -> int:
    """Measure; print the figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.receipts", description=__doc__)
    parser.add_argument("count", nargs="?", type=int, default=50, help="purges to time")
    parser.add_argument("--waiters", type=int, default=200, help="concurrent pub --wait")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(measure(args.count, args.waiters)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
