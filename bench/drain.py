"""Drain throughput: how fast the drain daemon works through a burst of purges.

The real :class:`~drainbus.drain.daemon.Drain`, built by ``open_drain`` from the settings an
operator would write (one nginx target; optionally a Cloudflare zone on the Free plan, served
by the local stand-in, in the same config), runs in this process against the Redis at
``--redis-url``. Each phase publishes its whole burst to the ``cache-drain`` stream first
(entries as ``pub`` writes them), then starts a fresh drain node on it and times it from its
start (its first read) until its group has read and acknowledged every entry, as
``floor_drain.py`` does:

* ``url``: ``--urls`` ``url:`` purges whose cache files are absent (every purge a cheap
  unlink of a missing file, as in the floor);
* ``tag``: ``--tags`` ``tag:`` purges against an index of as many cache files, one file per
  tag (each purge deletes one file);
* ``backlog``: ``--backlog`` ``url:`` purges, for the RSS growth while working through a
  large backlog.

With ``--cloudflare`` the url and tag phases run again with the Cloudflare zone added: only
the nginx group is timed (the Free plan takes minutes for what nginx does in seconds; the
point is that it must not slow the local group down).

Peak RSS is this process's high-water mark (``VmHWM``, reset before each phase) minus its
RSS when the phase started (the index and the published burst's client side are in the
baseline). Memory earlier phases freed stays with the process and is reused, so run the
backlog alone (``--urls 0 --tags 0``), as ``bench.run`` does, for its growth.

    .venv/bin/python -m bench.drain --redis-url URL [--urls N] [--tags N] [--backlog N]
                                    [--cloudflare]

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
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.nginx_index import LEVELS, _cache_file
from drainbus.bus.connection import command_client
from drainbus.bus.streams import Keys, entry_fields
from drainbus.config import Settings
from drainbus.drain.build import open_drain
from drainbus.drain.cache_file import cache_file_path
from drainbus.log import configure_logging

__all__ = ["measure", "publish"]

# The key the README recommends, and the floor's: unambiguous, so every url: purge computes
# its file (MD5 of the key) and unlinks it, as floor_drain.py does. ($scheme$host$request_uri
# is ambiguous for these hosts: a URL purge would find its files through the index only.)
KEY = "$scheme://$host$request_uri"
USER = "bench"
URL_HOST = "absent.pages.example"  # no cache file of this host exists
TAG_HOST = "tagged.pages.example"
_PUBLISH_CHUNK = 1000


def _write_tagged(root: Path, files: int) -> None:
    """``files`` nginx cache files of ``TAG_HOST``, file n tagged ``t-n`` only (no body)."""
    now = int(time.time())
    made: set[Path] = set()
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    for n in range(files):
        key = f"https://{TAG_HOST}/p/{n}"
        path = cache_file_path(root, LEVELS, key)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        fd = os.open(path, flags, 0o600)
        try:
            os.write(fd, _cache_file(key, [f"t-{n}"], 0, now))
        finally:
            os.close(fd)


def _vm(field: str) -> int:
    """This process's ``/proc/self/status`` figure ``field`` (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _settings(namespace: str, node: str, cache: Path, cloudflare: str | None) -> Settings:
    drain: dict[str, Any] = {
        "node": node,
        "nginx": [{"cache_path": str(cache), "levels": "1:2", "key": KEY, "name": "pages"}],
    }
    if cloudflare:
        drain["cloudflare"] = [
            {"zone_id": "zone", "api_token": "test-token", "api_base": cloudflare, "plan": "free"}
        ]
    return Settings(namespace=namespace, server={"admins": [USER]}, drain=drain)


async def publish(redis: Any, stream: str, lines: list[str], user: str = USER) -> None:
    """Append ``lines`` to ``stream`` as ``user``'s purges, entries as ``pub`` writes them."""
    for start in range(0, len(lines), _PUBLISH_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for line in lines[start : start + _PUBLISH_CHUNK]:
                fields = entry_fields(
                    line.encode(), user=user, message_id=secrets.token_hex(8), raw=False
                )
                pipe.xadd(stream, fields)
            await pipe.execute()


# The Cloudflare stand-in (tests/fakes) serves until its stdin closes.
_SERVE_CLOUDFLARE = """
import sys
from tests.fakes.cloudflare_api import FakeCloudflare
with FakeCloudflare(plan=sys.argv[1]) as api:
    print(api.api_base, flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def _cloudflare_elsewhere(plan: str) -> Iterator[str]:
    """The Cloudflare stand-in on ``plan``, in a process of its own; yields its API base.

    Cloudflare is never in the drain's process: in this one, the stand-in's HTTP server
    threads would take turns with the drain for Python's lock and slow the nginx group by
    what Cloudflare itself never costs a drain.
    """
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVE_CLOUDFLARE, plan],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        yield server.stdout.readline().strip()
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)


async def _group_done(redis: Any, stream: str, group: str, count: int) -> bool:
    for info in await redis.xinfo_groups(stream):
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        if name == group:
            return int(info.get("entries-read") or 0) >= count and int(info["pending"]) == 0
    return False


async def _phase(
    redis_url: str, cache: Path, lines: list[str], *, node: str, cloudflare: str | None
) -> dict[str, Any]:
    """Publish ``lines``, then drain them on a fresh node; return its figures."""
    namespace = f"bench-drain-{secrets.token_hex(3)}"
    settings = _settings(namespace, node, cache, cloudflare)
    keys = Keys(namespace)
    stream = keys.stream(settings.drain.topic)
    group = f"node-{node}"
    redis = command_client(redis_url)
    try:
        # The groups exist before the burst, as they would on a running bus.
        await redis.xgroup_create(stream, group, id="$", mkstream=True)
        if cloudflare:
            await redis.xgroup_create(stream, "cdn", id="$")
        await publish(redis, stream, lines)
        async with open_drain(settings, redis=redis, redis_url=redis_url) as drain:
            _reset_peak()
            rss_start = _vm("VmRSS")
            async with asyncio.TaskGroup() as tg:
                started = time.perf_counter()
                runner = tg.create_task(drain.run())
                while True:  # polled: nothing tells when another client acknowledged
                    if await _group_done(redis, stream, group, len(lines)):
                        break
                    await asyncio.sleep(0.01)
                seconds = time.perf_counter() - started
                peak = _vm("VmHWM")
                runner.cancel()
        stats = drain.stats
        return {
            "purges": len(lines),
            "seconds": seconds,
            "purges_per_s": len(lines) / seconds,
            "rss_start_kib": rss_start,
            "rss_growth_kib": peak - rss_start,
            "dead_lettered": stats.dead_lettered,
            "evicted": sum(t.snapshot().get("evicted", 0) for t in drain.all_targets),
        }
    finally:
        with contextlib.suppress(Exception):
            async for key in redis.scan_iter(match=f"{namespace}:*", count=1000):
                await redis.unlink(key)
        await redis.aclose()


async def _measure(
    redis_url: str, urls: int, tags: int, backlog: int, cloudflare: bool
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="dbd-"))
    try:
        cache = work / "cache"
        cache.mkdir()
        figures: dict[str, Any] = {"index_files": tags}
        url_lines = [f"url:https://{URL_HOST}/u/{n}" for n in range(urls)]
        tag_lines = [f"tag:t-{n}" for n in range(tags)]
        _write_tagged(cache, tags)
        if urls:
            figures["url"] = await _phase(redis_url, cache, url_lines, node="url", cloudflare=None)
        if tags:
            figures["tag"] = await _phase(redis_url, cache, tag_lines, node="tag", cloudflare=None)
        if cloudflare:
            shutil.rmtree(cache)
            cache.mkdir()
            _write_tagged(cache, tags)
            with _cloudflare_elsewhere("free") as base:
                figures["url_with_cloudflare"] = await _phase(
                    redis_url, cache, url_lines, node="urlcf", cloudflare=base
                )
                figures["tag_with_cloudflare"] = await _phase(
                    redis_url, cache, tag_lines, node="tagcf", cloudflare=base
                )
        del url_lines, tag_lines
        if backlog:
            lines = [f"url:https://{URL_HOST}/b/{n}" for n in range(backlog)]
            figures["backlog"] = await _phase(
                redis_url, cache, lines, node="backlog", cloudflare=None
            )
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(
    redis_url: str, urls: int, tags: int, backlog: int = 0, cloudflare: bool = False
) -> dict[str, Any]:
    """Run the phases (see the module docstring); return their figures."""
    return asyncio.run(_measure(redis_url, urls, tags, backlog, cloudflare))


def main(argv: list[str] | None = None) -> int:
    """Measure; print the figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__)
    parser.add_argument("--redis-url", required=True, help="the Redis to publish and drain on")
    parser.add_argument("--urls", type=int, default=100_000, help="url: purges (files absent)")
    parser.add_argument("--tags", type=int, default=100_000, help="tag: purges, one file each")
    parser.add_argument("--backlog", type=int, default=0, help="url: purges for the RSS phase")
    parser.add_argument(
        "--cloudflare", action="store_true", help="again with a Free-plan Cloudflare zone"
    )
    parser.add_argument("--log-level", default="info", help="the drain's log level")
    args = parser.parse_args(argv)
    # The drain logs as serve does (JSON lines); where to is not what is measured.
    stderr, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115 - for good
    configure_logging(args.log_level, json=True)
    sys.stderr = stderr
    figures = measure(args.redis_url, args.urls, args.tags, args.backlog, args.cloudflare)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
