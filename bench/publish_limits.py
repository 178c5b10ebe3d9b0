"""What the purge rate limit and the storage quotas cost a publish, and what a burst meets.

On a private embedded server, times ``Publisher.publish`` calls (the bus layer every ``pub``
goes through) three ways, interleaved and best of ``--rounds``:

* floor: one plain ``XADD`` of the same fields (one round trip, no script);
* limits off: the append script with ``Limits()`` (byte counting only);
* limits on: the default limits (quota and byte cap on a user's topic; the rate limit on the
  drain topic, with a budget too large to refuse anything).

each for a one-message call, a packed batch of 2,048 lines and a drain batch of 2,048 purges
(one entry each). Then the issue #12 burst: one user's 20,000 purges at the default 1,000 a
minute, burst 5,000: how many are stored, and how long the refused call took.

    .venv/bin/python -m bench.publish_limits [--rounds N] [--single N] [--batches N]

Prints one JSON object of figures (microseconds per call, ratios) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from drainbus.bus.embedded import EmbeddedRedis
from drainbus.bus.limits import Limits, PublishRefused
from drainbus.bus.publisher import Publisher
from drainbus.bus.streams import Keys, entry_fields

LINE = b"acme-site-0000000000000000000000000000000"  # 41 bytes, as workload 2's lines
BATCH = 2048
DEFAULTS = Limits(
    purges_per_minute=1000,
    purge_burst=5000,
    max_user_bytes=64 << 20,
    max_topics_per_user=100,
    max_topic_bytes=64 << 20,
)
UNREFUSED = Limits(
    purges_per_minute=10**9,
    purge_burst=10**9,
    max_user_bytes=1 << 50,
    max_topic_bytes=1 << 50,
)


async def _per_call(calls: int, publish: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await publish()
    return (time.perf_counter() - started) / calls * 1e6


async def _round(redis: Redis, round_: int, single: int, batches: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    fields = entry_fields(LINE, user="acme", message_id="0" * 16, raw=False)
    figures["floor: one XADD, us"] = await _per_call(
        single, lambda: redis.xadd(f"floor{round_}", fields, maxlen=100_000, approximate=True)
    )
    for label, limits in (("limits off", Limits()), ("limits on", UNREFUSED)):
        pub = Publisher(
            redis, Keys(f"b{round_}{label[-2:]}"), max_len=100_000, retention=3600, limits=limits
        )
        one = partial(pub.publish, "acme/one", [LINE], user="acme")
        packed = partial(pub.publish, "acme/many", [LINE] * BATCH, user="acme", pack=True)
        purges = partial(pub.publish, "cache-drain", [LINE] * BATCH, user="acme")
        figures[f"{label}: one message, us"] = await _per_call(single, one)
        figures[f"{label}: 2,048 packed lines, us"] = await _per_call(batches, packed)
        figures[f"{label}: 2,048 purges (an entry each), us"] = await _per_call(batches, purges)
    return figures


async def _burst(redis: Redis) -> dict[str, Any]:
    """Issue #12's burst: 20,000 purges from one user, sent as pub sends them (2,048 a call)."""
    pub = Publisher(redis, Keys("burst"), max_len=100_000, retention=3600, limits=DEFAULTS)
    lines = [b"acme-site-%d" % n for n in range(20_000)]
    stored, refused_ms = 0, 0.0
    for start in range(0, len(lines), BATCH):
        started = time.perf_counter()
        try:
            await pub.publish("cache-drain", lines[start : start + BATCH], user="acme")
        except PublishRefused as refusal:
            stored += refusal.stored
            refused_ms = (time.perf_counter() - started) * 1000
            break
        stored += len(lines[start : start + BATCH])
    return {"burst of 20,000: stored": stored, "burst: the refused call, ms": round(refused_ms, 2)}


async def main(rounds: int, single: int, batches: int) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="bench-")
    with EmbeddedRedis(Path(folder)) as server:
        redis = Redis.from_url(server.url)
        try:
            best: dict[str, float] = {}
            for round_ in range(rounds):
                for name, value in (await _round(redis, round_, single, batches)).items():
                    best[name] = min(value, best.get(name, value))
            result: dict[str, Any] = {k: round(v, 1) for k, v in best.items()}
            one, floor = best["limits on: one message, us"], best["floor: one XADD, us"]
            result["limits on / floor, one message"] = round(one / floor, 2)
            for kind in ("one message", "2,048 packed lines", "2,048 purges (an entry each)"):
                on, off = best[f"limits on: {kind}, us"], best[f"limits off: {kind}, us"]
                result[f"limits on / off, {kind}"] = round(on / off, 2)
            result.update(await _burst(redis))
            return result
        finally:
            await redis.aclose()
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.publish_limits", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--single", type=int, default=2000, help="one-message calls per round")
    parser.add_argument("--batches", type=int, default=30, help="2,048-line calls per round")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.rounds, args.single, args.batches)), indent=2))
