"""nginx index: how long the index of a large cache folder takes to build, and a tag purge.

Writes ``--files`` cache files the way nginx 1.22 lays them out on disk (``levels=1:2``, key
``$scheme$host$request_uri``; each file is the 336-byte binary header, ``KEY:`` line,
upstream status line and headers with a ``Cache-Tag``, then the body) into a fresh folder,
spread over hosts of very different sizes. Then, on the same folder:

* build, warm: :class:`NginxCache` start-up (the index scan) with every file in the page cache;
* build, cold: the same after evicting every file's pages with ``posix_fadvise(DONTNEED)``
  (needs no root; inodes and directory entries stay cached, so this is a lower bound of a
  cold start after a reboot). ``--drop-caches`` (root only, drops the whole machine's caches)
  measures a truly cold start instead;
* tag lookup: ``CacheIndex.paths_for_tag`` for a tag on 1% of the files;
* tag purge: ``NginxCache.purge`` of such a tag, from the call until every file is deleted.

    .venv/bin/python -m bench.nginx_index [--files N] [--repeat K] [--drop-caches]

Prints one JSON object of figures (seconds and milliseconds) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.server import rss_kib
from drainbus.drain.cache_file import cache_file_path, cache_files
from drainbus.drain.nginx import NginxCache, NginxCacheConfig
from drainbus.drain.purges import Purge
from drainbus.log import configure_logging

__all__ = ["COMPONENTS", "CacheSpec", "measure", "write_cache"]

KEY = "$scheme$host$request_uri"
LEVELS = (1, 2)
SITES = 300
#: Every file carries one of these many component tags (``component-NN``), round robin, so
#: purging one tag removes 1% of the cache: a shared header or footer changed.
COMPONENTS = 100
_SECTIONS = ("blog", "docs", "news", "shop", "tag", "author", "page")
_BODY_MIN, _BODY_MAX = 512, 32 * 1024
# ngx_http_file_cache_header_t of nginx 1.22 on 64-bit Linux: version, valid_sec,
# updating_sec, error_sec, last_modified, date, crc32, valid_msec, header_start, body_start,
# etag_len, etag[128], vary_len, vary[128], variant[16]; padded to 336 bytes.
_NGX_HEADER = struct.Struct("<Qqqqqq I HHH B 128s B 128s 16s 4x")
_NGX_HEADER_VERSION = 5


@dataclass(frozen=True)
class CacheSpec:
    """A generated cache folder: where it is, how many files, which tags to purge."""

    root: Path
    files: int
    bytes: int
    purge_tags: tuple[str, ...]


def _site_weights(rng: random.Random) -> list[float]:
    # Zipf-like: a few large sites and a long tail of small ones, as on a shared cache.
    weights = [1 / (rank**1.1) for rank in range(1, SITES + 1)]
    rng.shuffle(weights)
    return weights


def _cache_file(key: str, tags: list[str], body_size: int, now: int) -> bytes:
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Server: nginx\r\n"
        "Date: Sat, 22 Nov 2025 06:00:00 GMT\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {body_size}\r\n"
        "Connection: close\r\n"
        "Last-Modified: Fri, 21 Nov 2025 18:00:00 GMT\r\n"
        f'ETag: "{body_size:x}-{now:x}"\r\n'
        "Cache-Control: public, max-age=3600\r\n"
        f"Cache-Tag: {','.join(tags)}\r\n"
        "\r\n"
    ).encode()
    key_line = f"\nKEY: {key}\n".encode()
    header_start = _NGX_HEADER.size + len(key_line)
    binary = _NGX_HEADER.pack(
        _NGX_HEADER_VERSION, now + 3600, 0, 0, now - 43200, now, 0, 0,
        header_start, header_start + len(head), 0, b"", 0, b"", b"",
    )  # fmt: skip
    return binary + key_line + head + b"x" * body_size


def write_cache(root: Path, files: int, seed: int = 7) -> CacheSpec:
    """Write ``files`` nginx cache files under ``root`` (created); return what was written.

    Keys are mostly ``https``, over ``SITES`` hosts with Zipf-like sizes; paths sit in a
    handful of sections, some with a query. Each file is tagged with its site, its site's
    section, its own page and one of ``COMPONENTS`` shared tags. Bodies are 0.5-32 KiB.
    """
    rng = random.Random(seed)
    sites = [f"site{n:03d}" for n in range(SITES)]
    chosen = rng.choices(range(SITES), weights=_site_weights(rng), k=files)
    now = int(time.time())
    made: set[Path] = set()
    total = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    for n, site_no in enumerate(chosen):
        site = sites[site_no]
        section = _SECTIONS[n % len(_SECTIONS)]
        scheme = "http" if n % 10 == 0 else "https"
        query = f"?page={n % 7}" if n % 9 == 0 else ""
        key = f"{scheme}{site}.pages.example/{section}/item-{n}{query}"
        tags = [site, f"{site}:{section}", f"{site}:item-{n}", f"component-{n % COMPONENTS:02d}"]
        body = int(math.exp(rng.uniform(math.log(_BODY_MIN), math.log(_BODY_MAX))))
        data = _cache_file(key, tags, body, now)
        path = cache_file_path(root, LEVELS, key)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        fd = os.open(path, flags, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        total += len(data)
    return CacheSpec(root, files, total, tuple(f"component-{n:02d}" for n in range(COMPONENTS)))


def evict(root: Path, *, drop_caches: bool = False) -> str:
    """Push the cache folder's files out of the page cache; return how (for the report).

    Without root, ``posix_fadvise(DONTNEED)`` drops each file's (clean, hence the sync
    first) data pages; inodes and directories stay cached. ``drop_caches`` also drops
    those, for the whole machine.
    """
    os.sync()
    if drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    for path in cache_files(root):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def _still_there(paths: set[str]) -> list[str]:
    return [path for path in paths if os.path.exists(path)]


async def _measure(spec: CacheSpec, repeat: int, drop_caches: bool) -> dict[str, Any]:
    config = NginxCacheConfig(cache_path=spec.root, levels="1:2", key=KEY)
    warm, cold, lookup_ms, purge_ms, purged = [], [], [], [], []
    rss_before = rss_kib(os.getpid()) or 0
    index_kib = 0
    for n in range(repeat):
        # Cold first: right after writing, every page is still cached (warm).
        evicted_by = evict(spec.root, drop_caches=drop_caches)
        started = time.perf_counter()
        async with NginxCache(config):  # entering scans the folder
            cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        async with NginxCache(config) as cache:
            warm.append(time.perf_counter() - started)
            if n == 0:
                index_kib = (rss_kib(os.getpid()) or 0) - rss_before
            tag = spec.purge_tags[n % len(spec.purge_tags)]
            started = time.perf_counter()
            paths = cache.index.paths_for_tag(tag)
            lookup_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            removed = await cache.purge(Purge(tags=frozenset({tag})))
            purge_ms.append((time.perf_counter() - started) * 1000)
        left = _still_there(paths)
        if left or removed != len(paths) or not paths:
            raise RuntimeError(
                f"purging tag {tag!r} removed {removed} of {len(paths)} files; "
                f"{len(left)} still exist"
            )
        purged.append(removed)
    return {
        "files": spec.files,
        "megabytes": round(spec.bytes / 1e6, 1),
        "evicted_by": evicted_by,
        "build_cold_s": cold,
        "build_warm_s": warm,
        "index_rss_kib": index_kib,
        "tag_files": purged,
        "tag_lookup_ms": lookup_ms,
        "tag_purge_ms": purge_ms,
    }


def measure(
    files: int, *, repeat: int = 3, drop_caches: bool = False, workdir: Path | None = None
) -> dict[str, Any]:
    """Write a cache of ``files`` files, measure ``repeat`` times, delete it; return figures.

    Lists of figures hold one value per repetition: ``build_cold_s``, ``build_warm_s``
    (seconds), ``tag_lookup_ms``, ``tag_purge_ms`` (milliseconds), ``tag_files`` (files the
    purged tag covered). Also ``write_s``, the seconds the cache took to write.
    """
    # Only warnings, on stderr: the index's info lines would land between the figures.
    configure_logging("warning", json=True)
    root = Path(tempfile.mkdtemp(prefix="dbn-", dir=workdir))
    try:
        started = time.perf_counter()
        spec = write_cache(root / "cache", files)
        written = time.perf_counter() - started
        figures = asyncio.run(_measure(spec, repeat, drop_caches))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {**figures, "write_s": written}


def summary(values: list[float]) -> str:
    """``median (min-max)`` of a list of figures, for a person reading them."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the figures as one JSON line; with ``--human`` also a summary."""
    parser = argparse.ArgumentParser(prog="python -m bench.nginx_index", description=__doc__)
    parser.add_argument("--files", type=int, default=100_000, help="cache files to write")
    parser.add_argument("--repeat", type=int, default=3, help="builds and purges of each kind")
    parser.add_argument("--workdir", type=Path, help="where to write the cache (default: TMPDIR)")
    parser.add_argument(
        "--drop-caches",
        action="store_true",
        help="evict with /proc/sys/vm/drop_caches (root; slows every process on the machine)",
    )
    parser.add_argument("--human", action="store_true", help="also print a summary on stderr")
    args = parser.parse_args(argv)
    figures = measure(
        args.files, repeat=args.repeat, drop_caches=args.drop_caches, workdir=args.workdir
    )
    print(json.dumps(figures))
    if args.human:
        for name in ("build_cold_s", "build_warm_s", "tag_lookup_ms", "tag_purge_ms"):
            print(f"{name:15} {summary(figures[name])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
