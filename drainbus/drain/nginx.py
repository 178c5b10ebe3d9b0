"""The nginx target: evict purged objects from a local ``proxy_cache`` folder.

Open-source nginx has no purge command, but deleting a cache file evicts the object: the
next request is a MISS and refetches. URL purges need no index (the file name is the MD5 of
the key the template renders); host, prefix and tag purges use a :class:`CacheIndex` that
follows the folder with inotify (see :mod:`drainbus.drain.nginx_index`); keys are rendered
and read back by :mod:`drainbus.drain.key_template`.

Usage::

    config = NginxCacheConfig(cache_path=Path("/var/cache/nginx/pages"),
                              key="$scheme$host$request_uri")
    async with NginxCache(config) as cache:
        removed = await cache.purge(purge, key_hosts=["acme-blog.pages.example"])

Every purge is idempotent: a file already gone counts as evicted (but not as removed).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from drainbus.drain.cache_file import cache_file_path as _cache_file_path
from drainbus.drain.cache_file import cache_files, parse_levels
from drainbus.drain.key_template import KeyTemplate, template_variables
from drainbus.drain.nginx_index import CacheIndex
from drainbus.drain.purges import Purge
from drainbus.drain.refill import DEFAULT_REFILL_WINDOW, RefillGuard
from drainbus.errors import BackendError, ConfigError, DataError

__all__ = [
    "CacheEvictionFailed",
    "CacheIndex",
    "NginxCache",
    "NginxCacheConfig",
    "cache_file_path",
    "render_key",
]

log = structlog.get_logger("drainbus.drain.nginx")


class NginxCacheConfig(BaseModel):
    """One nginx ``proxy_cache_path`` and the ``proxy_cache_key`` used with it.

    ``levels`` and ``key`` must be what nginx is configured with, or URL purges compute the
    wrong file. ``proxy_host`` is the value of ``$proxy_host`` (the host[:port] in
    ``proxy_pass``), required when the key uses it. ``name`` labels log lines.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_path: Path
    levels: str = "1:2"
    key: str = "$scheme$proxy_host$request_uri"
    proxy_host: str | None = None
    name: str | None = None

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, levels: str) -> str:
        parse_levels(levels)
        return levels

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str) -> str:
        template_variables(key)
        return key

    @model_validator(mode="after")
    def _check_proxy_host(self) -> Self:
        KeyTemplate(self.key, self.proxy_host)
        return self


def render_key(template: str, url: str, proxy_host: str | None = None) -> str:
    """The cache key nginx computes for ``url`` with key ``template``.

    ``$host`` is the URL's host lower-cased without port; ``$request_uri`` the path and
    query as sent; ``$uri`` the percent-decoded path; ``$args`` the query; ``$is_args`` ``?``
    when there is a query. Raises ``ValueError`` for an unsupported template.
    """
    return KeyTemplate(template, proxy_host).render(url)


def cache_file_path(cache_path: Path, levels: str, key: str) -> Path:
    """The file nginx stores ``key`` in: ``levels="1:2"`` -> ``<cache_path>/c/29/<md5>``."""
    return _cache_file_path(cache_path, parse_levels(levels), key)


class CacheEvictionFailed(BackendError):
    """Some cache files could not be deleted; the purge must not be acknowledged."""

    def __init__(self, message: str, *, paths: tuple[str, ...]) -> None:
        super().__init__(message)
        self.paths = paths


def _unlink(paths: Iterable[str]) -> tuple[int, list[tuple[str, OSError]]]:
    # A file nginx replaced since it was indexed is deleted all the same (its name is the
    # key's), and one already gone is evicted: neither is an error. The index learns of the
    # deletions from inotify, in order with any file nginx writes again meanwhile.
    removed, failed = 0, []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed.append((path, exc))
        else:
            removed += 1
    return removed, failed


# A large purge is deleted by several threads at once: an unlink waits on the file system's
# journal, not on Python (about 70 us each on ext4), and files in different folders do not
# contend. 1,000 files took 73 ms in one thread, 49 ms in four.
_UNLINK_THREADS = 4
_UNLINK_PER_THREAD_MIN = 128


async def _unlink_in_threads(paths: Iterable[str]) -> tuple[int, list[tuple[str, OSError]]]:
    listed = list(paths)
    threads = max(1, min(_UNLINK_THREADS, len(listed) // _UNLINK_PER_THREAD_MIN))
    if threads == 1:
        return await asyncio.to_thread(_unlink, listed)
    results = await asyncio.gather(
        *(asyncio.to_thread(_unlink, listed[n::threads]) for n in range(threads))
    )
    return sum(r for r, _ in results), [failure for _, failed in results for failure in failed]


def _unlink_tree(root: Path) -> tuple[int, list[tuple[str, OSError]]]:
    return _unlink(cache_files(root))


class NginxCache:
    """The nginx cache target: purges delete cache files; an async context manager.

    Entering checks the cache folder and builds the index; leaving stops following it.
    For ``refill_window`` seconds after each purge, stale copies that requests in flight
    during the purge write back are evicted (see :mod:`drainbus.drain.refill`; 0: never).
    """

    def __init__(
        self, config: NginxCacheConfig, *, refill_window: float = DEFAULT_REFILL_WINDOW
    ) -> None:
        self.config = config
        self.name = config.name or str(config.cache_path)
        self._levels = parse_levels(config.levels)
        self._template = KeyTemplate(config.key, config.proxy_host)
        self.refill_guard = RefillGuard(refill_window, self._template, name=self.name)
        self.index = CacheIndex(
            config.cache_path,
            self._template,
            name=self.name,
            on_file_added=self.refill_guard.file_added,
        )

    async def __aenter__(self) -> Self:
        if not self.config.cache_path.is_dir():
            raise ConfigError(
                f"nginx cache folder {str(self.config.cache_path)!r} does not exist: "
                "expected the path of a proxy_cache_path that nginx has created"
            )
        if not self._template.has_host:
            log.info(
                "nginx_cache_key_without_host",
                cache=self.name,
                key=self.config.key,
                effect="one object serves every host: host and prefix purges match all hosts",
            )
        await self.refill_guard.__aenter__()
        try:
            await self.index.__aenter__()
        except BaseException as exc:
            await self.refill_guard.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.index.__aexit__(exc_type, exc, tb)
        finally:
            await self.refill_guard.__aexit__(exc_type, exc, tb)

    @property
    def refills_evicted(self) -> int:
        """Stale refills evicted after purges since start (see :mod:`drainbus.drain.refill`)."""
        return self.refill_guard.refills_evicted

    def path_for_url(self, url: str) -> Path:
        """The cache file nginx uses for ``url`` (computed; it may not exist)."""
        return _cache_file_path(self.config.cache_path, self._levels, self._template.render(url))

    async def purge(self, purge: Purge, *, key_hosts: Iterable[str] = ()) -> int:
        """Delete every cached object ``purge`` names; returns how many files were removed.

        ``urls``: the file of the URL's key plus every indexed object with the same host, path
        and query (other schemes, Vary variants). ``tags`` and ``keys``: objects carrying the
        tag exactly. ``hosts`` and ``key_hosts`` (hosts the caller derived from ``keys``):
        every object of the host. ``prefixes``: objects of the host at or below the path.
        ``everything``: every file in the folder. ``soft`` is ignored: nginx cannot revalidate
        on demand, so objects are deleted. Stale copies written back after the purge are
        evicted in its refill window (:attr:`refills_evicted` counts them). Raises
        :class:`CacheEvictionFailed` (retryable) when a file could not be deleted, after
        trying all of them.
        """
        key_hosts = tuple(key_hosts)
        await self.index.sync()
        if purge.everything:
            return await self.flush_all()
        index = self.index
        paths: set[str] = set()
        try:
            for url in purge.urls:
                paths.add(str(self.path_for_url(url)))
                paths |= index.paths_for_key(self._template.render(url))
                paths |= index.paths_for_url(url)
            for prefix in purge.prefixes:
                paths |= index.paths_for_prefix(prefix)
        except ValueError as exc:
            raise DataError(f"purge has a malformed URL ({exc}): expected absolute URLs") from exc
        for tag in purge.tags | purge.keys:
            paths |= index.paths_for_tag(tag)
        for host in {*purge.hosts, *key_hosts}:
            paths |= index.paths_for_host(host)
        # No await since the index lookups: every file nginx puts in place from here on is
        # seen by the refill window.
        window = self.refill_guard.open(purge, {*purge.hosts, *key_hosts})
        await self.refill_guard.arm(window, paths)
        removed = self._check(await _unlink_in_threads(paths))
        log.debug("nginx_cache_purged", cache=self.name, matched=len(paths), removed=removed)
        return removed

    async def flush_all(self) -> int:
        """Delete every cache file under the folder (walked, not taken from the index).

        Every file nginx puts in place in the refill window after it is evicted once more
        when the window closes: validators are not read for a whole folder.
        """
        window = self.refill_guard.open(Purge(everything=True), ())
        await self.refill_guard.arm(window, ())
        removed = self._check(await asyncio.to_thread(_unlink_tree, self.config.cache_path))
        log.debug("nginx_cache_flushed", cache=self.name, removed=removed)
        return removed

    def _check(self, outcome: tuple[int, list[tuple[str, OSError]]]) -> int:
        removed, failed = outcome
        if failed:
            path, exc = failed[0]
            raise CacheEvictionFailed(
                f"nginx cache {self.name!r}: could not delete {len(failed)} file(s), "
                f"first {path!r}: {exc.strerror}; the purge will be retried",
                paths=tuple(p for p, _ in failed),
            )
        return removed
