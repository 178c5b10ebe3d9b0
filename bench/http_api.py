"""The Cloudflare-compatible purge API: what one purge costs a client, against ``ssh pub``.

A real ``drainbus serve --http-listen`` (embedded Redis, no drain: this measures the door,
from request to the purge stored on the bus, which is what a 200 means):

- **new connection per purge**: a CMS hook or a deploy script's ``curl``: one POST on a fresh
  TCP connection, sequential, p50 / p99;
- **kept-alive connection**: an SDK client reusing its connection, sequential, p50 / p99;
- **one-shot ssh pub**: ``echo url:… | ssh bus pub cache-drain``, the SSH way to send the same
  purge, sequential, p50 / p99, and the ratio HTTP / SSH;
- **throughput**: ``--concurrency`` kept-alive clients sending purges at once, purges/s.

    .venv/bin/python -m bench.http_api [N] [--concurrency C] [--burst M]

Prints the figures as JSON on stdout; never fails on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.openssh import ssh_argv  # noqa: E402
from bench.server import BENCH_USER, make_key, start_drainbus  # noqa: E402
from drainbus.http.tokens import TokenStore  # noqa: E402

ZONE = "bench-zone"
HTTP_CONFIG = f'\n[http]\nlisten = "127.0.0.1:0"\nzones = ["{ZONE}"]\n'


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def _figures(values: list[float]) -> dict[str, float]:
    return {"p50": _quantile(values, 0.5), "p99": _quantile(values, 0.99)}


async def _post(client: httpx.AsyncClient, url: str, token: str, n: int) -> None:
    body = {"files": [f"https://acme-blog.pages.example/page/{n}"]}
    response = await client.post(url, json=body, headers={"Authorization": f"Bearer {token}"})
    if response.status_code != 200 or not response.json()["success"]:
        raise RuntimeError(f"purge {n} answered {response.status_code}: {response.text}")


async def measure(count: int = 200, concurrency: int = 16, burst: int = 5000) -> dict[str, Any]:
    """Sequential latencies of ``count`` purges each way, then a burst of ``burst``."""
    work = Path(tempfile.mkdtemp(prefix="dbh-"))
    try:
        key = make_key(work / "id")
        (work / "a" / "users").mkdir(parents=True)
        token = TokenStore(work / "a" / "users").add(
            BENCH_USER, acl_topics=(), owner_separator=None
        )
        async with start_drainbus(work / "a", key, extra_config=HTTP_CONFIG) as server:
            base = server.events("http_listening")[0]["listen"]
            url = f"{base}/client/v4/zones/{ZONE}/purge_cache"
            fresh, kept = [], []
            # No keep-alive: each request opens its own TCP connection, as a one-off curl
            # does (without the cost of making a client, which is the client's own).
            fresh_connections = httpx.Limits(max_keepalive_connections=0)
            async with (
                httpx.AsyncClient() as client,
                httpx.AsyncClient(limits=fresh_connections) as once,
            ):
                for n in range(count):
                    started = time.perf_counter()
                    await _post(once, url, token, n)
                    fresh.append((time.perf_counter() - started) * 1000)
                    started = time.perf_counter()
                    await _post(client, url, token, n)
                    kept.append((time.perf_counter() - started) * 1000)
            ssh = await _ssh_latencies(server.port, key, count)
            rate = await _burst(url, token, concurrency, burst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "purges": count,
        "http_new_connection_ms": _figures(fresh),
        "http_kept_alive_ms": _figures(kept),
        "ssh_pub_one_shot_ms": _figures(ssh),
        "ratio_new_connection_to_ssh_p50": round(_quantile(fresh, 0.5) / _quantile(ssh, 0.5), 3),
        "burst": {"purges": burst, "concurrency": concurrency, "purges_per_s": rate},
    }


async def _ssh_latencies(port: int, key: Path, count: int) -> list[float]:
    argv = ssh_argv(port, key, "pub", "cache-drain")
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate(f"https://acme-blog.pages.example/page/{n}\n".encode())
        latencies.append((time.perf_counter() - started) * 1000)
        if proc.returncode != 0:
            raise RuntimeError(f"ssh pub ended {proc.returncode}: {err!r}")
    return latencies


async def _burst(url: str, token: str, concurrency: int, total: int) -> float:
    """Purges per second with ``concurrency`` kept-alive clients sending ``total`` in all."""
    numbers = iter(range(total))

    async def client_loop() -> None:
        async with httpx.AsyncClient() as client:
            for n in numbers:
                await _post(client, url, token, n)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(client_loop())
    return round(total / (time.perf_counter() - started), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_api", description=__doc__)
    parser.add_argument("count", nargs="?", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--burst", type=int, default=5000)
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.count, args.concurrency, args.burst))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
