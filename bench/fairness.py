"""Fair drain: how long one user's purge waits behind another user's burst.

The real drain, built by ``open_drain`` from an operator's settings (one nginx target and a
Cloudflare zone on the Free plan, served by the local stand-in at the Free plan's rate limit,
answering each call after 50 ms as the real API roughly does), runs in this process against
the Redis at ``--redis-url``. In each round, on a fresh stream, user ``burst`` publishes
``--burst`` ``url:`` purges as fast as Redis takes them, while the drain is running; the moment
that burst is stored, user ``single`` publishes one ``url:`` purge, and the round measures, from
that purge's XADD:

* **nginx**: until its receipt from the local group is written (the nginx target carried it
  out; a receipt is written after the target's work, before the XACK);
* **Cloudflare**: until the stand-in receives the call that carries its URL;
* how many of the burst's purges the local group had carried out before it.

Taken strictly in stream order, the single purge would wait for the whole burst: seconds on
nginx, and the burst divided by the Free plan's 800 URLs/s on Cloudflare.

    .venv/bin/python -m bench.fairness --redis-url URL [--burst N] [--rounds R]

Prints one JSON object of figures on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.drain import publish
from drainbus.bus.connection import command_client
from drainbus.bus.streams import Keys
from drainbus.config import Settings
from drainbus.drain.build import open_drain
from drainbus.drain.receipts import receipts_of, receipts_topic
from drainbus.log import configure_logging
from tests.fakes.cloudflare_api import FakeCloudflare

__all__ = ["measure"]

BURST_USER, SINGLE_USER = "burst", "single"
SINGLE_URL = "https://single.pages.example/changed"
_API_LATENCY = 0.05  # seconds the stand-in takes to answer a call


def _settings(namespace: str, cache: Path, api_base: str) -> Settings:
    drain: dict[str, Any] = {
        "node": "fair",
        "nginx": [{"cache_path": str(cache), "levels": "1:2", "key": "$scheme$host$request_uri"}],
        "cloudflare": [
            {"zone_id": "zone", "api_token": "test-token", "api_base": api_base, "plan": "free"}
        ],
    }
    return Settings(namespace=namespace, server={"admins": [BURST_USER, SINGLE_USER]}, drain=drain)


async def _local_receipt(redis: Any, receipts: str) -> tuple[float, int]:
    """When the single user's local receipt arrives (monotonic), and how many of the burst
    user's local receipts came before it."""
    position, before = "0-0", 0
    while True:
        reply = await redis.xread({receipts: position}, count=5000, block=1000)
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                position = entry_id
                for record in receipts_of(entry_id, fields):
                    if record["role"] != "local":
                        continue
                    if record["user"] == SINGLE_USER:
                        return time.monotonic(), before
                    before += 1


async def _round(redis_url: str, cache: Path, burst: int) -> dict[str, float]:
    namespace = f"bench-fair-{secrets.token_hex(3)}"
    keys = Keys(namespace)
    redis = command_client(redis_url)
    lines = [f"url:https://burst.pages.example/p/{n}" for n in range(burst)]
    try:
        async with FakeCloudflare(plan="free", answer_delay=_API_LATENCY) as api:
            settings = _settings(namespace, cache, api.api_base)
            stream = keys.stream(settings.drain.topic)
            receipts = keys.stream(receipts_topic(settings.drain.topic))
            async with (
                open_drain(settings, redis=redis, redis_url=redis_url) as drain,
                asyncio.TaskGroup() as tg,
            ):
                runner = tg.create_task(drain.run())
                await drain.ready.wait()
                watcher = tg.create_task(_local_receipt(redis, receipts))
                await publish(redis, stream, lines, BURST_USER)
                published = time.monotonic()
                await publish(redis, stream, [f"url:{SINGLE_URL}"], SINGLE_USER)
                nginx_at, before = await watcher
                calls = await asyncio.to_thread(
                    api.wait_until, lambda r: any(SINGLE_URL in c.items for c in r), 60
                )
                runner.cancel()
            sent_at = next(c.at for c in calls if SINGLE_URL in c.items)
        return {
            "nginx_ms": (nginx_at - published) * 1000,
            "cloudflare_ms": (sent_at - published) * 1000,
            "burst_done_before": before,
        }
    finally:
        with contextlib.suppress(Exception):
            async for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
                await redis.unlink(key)
        await redis.aclose()


async def _measure(redis_url: str, burst: int, rounds: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="dbf-"))
    try:
        cache = work / "cache"
        cache.mkdir()
        results = [await _round(redis_url, cache, burst) for _ in range(rounds)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures: dict[str, Any] = {"burst": burst, "rounds": rounds}
    for name in ("nginx_ms", "cloudflare_ms", "burst_done_before"):
        values = [r[name] for r in results]
        figures[name] = {"median": statistics.median(values), "max": max(values)}
    return figures


def measure(redis_url: str, burst: int, rounds: int) -> dict[str, Any]:
    """Run ``rounds`` rounds (see the module docstring); return their median and worst."""
    return asyncio.run(_measure(redis_url, burst, rounds))


def main(argv: list[str] | None = None) -> int:
    """Measure; print the figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__)
    parser.add_argument("--redis-url", required=True, help="the Redis to publish and drain on")
    parser.add_argument("--burst", type=int, default=20_000, help="url: purges in the burst")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each on a fresh stream")
    parser.add_argument("--log-level", default="warning", help="the drain's log level")
    args = parser.parse_args(argv)
    # The drain logs as serve does (JSON lines); where to is not what is measured.
    stderr, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115 - for good
    configure_logging(args.log_level, json=True)
    sys.stderr = stderr
    print(json.dumps(measure(args.redis_url, args.burst, args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
