"""The nginx target: evict purged objects from a local ``proxy_cache`` folder.

Open-source nginx has no purge command, but deleting a cache file evicts the object: the
next request is a MISS and refetches. URL purges need no index (the file name is the MD5 of
the key the template renders); host, prefix and tag purges use a :class:`CacheIndex` that
follows the folder with inotify (see :mod:`drainbus.drain.nginx_index`); keys are rendered
and read back by :mod:`drainbus.drain.key_template`.

Usage::

    config = NginxCacheConfig(cache_path=Path("/var/cache/nginx/pages"),
                              key="$scheme://$host$request_uri")
    async with NginxCache(config) as cache:
        removed = await cache.purge(purge, key_hosts=["acme-blog.pages.example"])

Every purge is idempotent: a file already gone counts as evicted (but not as removed).

A soft purge (``Purge.soft``, or every purge with ``mode = "soft"``) expires the matched
files in place instead of deleting them (:func:`~drainbus.drain.cache_file.expire_cache_file`):
with ``proxy_cache_use_stale updating``, ``proxy_cache_background_update on`` and
``proxy_cache_revalidate on`` nginx then serves the old copy at once and revalidates it with a
conditional request, which the origin can answer with a 304. Expiring a file already stale or
gone is not an error either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import anyio.to_thread
import structlog
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from drainbus.drain.cache_file import cache_file_name, parse_levels
from drainbus.drain.cache_file import cache_file_path as _cache_file_path
from drainbus.drain.evict import Job, carry_out, expire_tree, unlink_tree
from drainbus.drain.key_check import SAMPLE_SIZE, check_keys
from drainbus.drain.key_template import KeyTemplate, proxy_host_of, template_variables
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
    wrong file. ``key`` None means no ``proxy_cache_key`` is set: nginx's default key, which
    is ``http://127.0.0.1:8080/docs/x?q=1`` for ``proxy_pass http://127.0.0.1:8080`` (not the
    ``$scheme$proxy_host$request_uri`` nginx's documentation prints). ``proxy_pass`` is that
    URL as written in nginx, without a URI part; without it keys are still read back (any
    upstream), but URL purges find files through the index only. ``proxy_host`` is the value
    of ``$proxy_host`` for a ``key`` that uses it (taken from ``proxy_pass`` when unset).
    ``name`` labels log lines. ``mode`` ``"soft"`` makes every purge of this cache soft
    (expire, not delete; see the module docstring); with ``"hard"`` only purges marked soft
    are.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cache_path: Path
    levels: str = "1:2"
    key: str | None = None
    proxy_pass: str | None = None
    proxy_host: str | None = None
    name: str | None = None
    mode: Literal["hard", "soft"] = "hard"

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, levels: str) -> str:
        parse_levels(levels)
        return levels

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str | None) -> str | None:
        if key is not None:
            template_variables(key)
        return key

    @field_validator("proxy_pass")
    @classmethod
    def _check_proxy_pass(cls, proxy_pass: str | None) -> str | None:
        if proxy_pass is not None:
            proxy_host_of(proxy_pass)
        return proxy_pass

    @model_validator(mode="after")
    def _check_proxy_host(self) -> Self:
        self.key_template()
        return self

    def key_template(self) -> KeyTemplate:
        """The template of the keys nginx writes in this cache; ``ValueError`` if unclear."""
        passed = proxy_host_of(self.proxy_pass)[1] if self.proxy_pass else None
        if self.proxy_host is not None and passed is not None and self.proxy_host != passed:
            raise ValueError(
                f"proxy_host {self.proxy_host!r} disagrees with proxy_pass {self.proxy_pass!r} "
                f"(whose $proxy_host is {passed!r}): set only proxy_pass"
            )
        if self.key is None:
            if self.proxy_host is not None and passed is None:
                raise ValueError(
                    "proxy_host is set but key is not: for nginx's default key set proxy_pass "
                    "to the URL written in nginx's proxy_pass (e.g. 'http://127.0.0.1:8080')"
                )
            return KeyTemplate.nginx_default(self.proxy_pass)
        proxy_host = self.proxy_host or passed
        if "proxy_host" in template_variables(self.key) and proxy_host is None:
            raise ValueError(
                f"key template {self.key!r} uses $proxy_host: set proxy_host to the host[:port] "
                "written in proxy_pass (e.g. 'origin:8080'), or proxy_pass"
            )
        return KeyTemplate(self.key, proxy_host)


def render_key(template: str, url: str, proxy_host: str | None = None) -> str:
    """The cache key nginx computes for ``url`` with key ``template``.

    ``$host`` is the URL's host lower-cased without port; ``$request_uri`` the path and
    query as sent; ``$uri`` the percent-decoded path; ``$args`` the query; ``$is_args`` ``?``
    when there is a query. Raises ``ValueError`` for an unsupported template, or one using
    ``$proxy_host`` without ``proxy_host``.
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


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


class NginxCache:
    """The nginx cache target: purges delete (soft ones expire) cache files; an async context
    manager.

    Entering checks the cache folder, builds the index and checks that the key template
    reads the keys nginx wrote (:class:`ConfigError` if most are unreadable); leaving stops
    following the folder. For ``refill_window`` seconds after each purge, stale copies that
    requests in flight during the purge write back are evicted (see
    :mod:`drainbus.drain.refill`; 0: never).
    """

    def __init__(
        self, config: NginxCacheConfig, *, refill_window: float = DEFAULT_REFILL_WINDOW
    ) -> None:
        self.config = config
        self.name = config.name or str(config.cache_path)
        self._levels = parse_levels(config.levels)
        self._root = str(config.cache_path)
        self._template = config.key_template()
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
        template = self._template
        if not template.has_host:
            log.info(
                "nginx_cache_key_without_host",
                cache=self.name,
                key=template.description,
                effect="one object serves every host: host and prefix purges match all hosts",
            )
        ambiguous = template.ambiguous_example()
        if ambiguous is not None:
            key, readings = ambiguous
            log.warning(
                "nginx_cache_key_ambiguous",
                cache=self.name,
                key=template.description,
                example=f"{key!r} reads as "
                + " and as ".join(f"host {r.host!r} path {r.path!r}" for r in readings),
                effect="host, prefix and URL purges leave such files alone (tag purges evict)",
                fix="set proxy_cache_key $scheme://$host$request_uri; in nginx and key here",
            )
        if not template.renders:
            log.info(
                "nginx_cache_key_not_rendered",
                cache=self.name,
                key=template.description,
                effect="URL purges find files through the index only; set proxy_pass",
            )
        await self.refill_guard.__aenter__()
        try:
            await self.index.__aenter__()
        except BaseException as exc:
            await self.refill_guard.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        try:
            check_keys(template, self.index.sample_keys(SAMPLE_SIZE), cache=self.name)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
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
        """The cache file nginx uses for ``url`` (computed; it may not exist).

        Raises ``ValueError`` when the key template cannot render keys (no ``proxy_pass``).
        """
        return _cache_file_path(self.config.cache_path, self._levels, self._template.render(url))

    async def purge(self, purge: Purge, *, key_hosts: Iterable[str] = ()) -> int:
        """Delete every cached object ``purge`` names, or expire it if the purge is soft.

        Returns how many files this call removed or expired (none already gone or stale).

        ``urls``: the file of the URL's key plus every indexed object with the same host, path
        and query (other schemes, Vary variants). ``tags`` and ``keys``: objects carrying the
        tag exactly. ``hosts`` and ``key_hosts`` (hosts the caller derived from ``keys``):
        every object of the host. ``prefixes``: objects of the host at or below the path.
        ``everything``: every file in the folder. ``soft`` (or ``mode = "soft"``): files are
        expired in place, not deleted. Stale copies written back after the purge are evicted
        in its refill window (:attr:`refills_evicted` counts them). Raises
        :class:`CacheEvictionFailed` (retryable) when a file could not be deleted or expired
        (a header version drainbus does not know is left untouched), after trying all of them;
        :class:`~drainbus.errors.DataError` for a malformed URL.
        """
        result = (await self.purge_batch([purge], [tuple(key_hosts)]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def purge_batch(
        self, purges: Sequence[Purge], key_hosts: Sequence[Iterable[str]] | None = None
    ) -> list[int | DataError | CacheEvictionFailed]:
        """Carry out ``purges`` as :meth:`purge` does each, in order, as one batch.

        ``key_hosts[i]`` are the hosts the caller derived from ``purges[i].keys``. Returns,
        per purge, how many files it removed or expired (a file two purges match counts for
        the first), or the error :meth:`purge` would have raised for it: one purge failing
        never fails the others. The index is synced once, every purge's files are looked
        up and its refill window opened without an await in between, and the files of the
        whole batch are deleted (or expired) in one trip to worker threads. Raises only what
        fails the whole batch (the index cannot be synced).
        """
        hosts = [tuple(h) for h in key_hosts] if key_hosts is not None else [()] * len(purges)
        results: list[int | DataError | CacheEvictionFailed] = [0] * len(purges)
        await self.index.sync()
        pending: list[int] = []
        for number, purge in enumerate(purges):
            if not purge.everything:
                pending.append(number)
                continue
            # A whole-folder purge is carried out in its place in the order.
            if pending:
                await self._evict(purges, hosts, pending, results)
                pending = []
            try:
                if purge.soft or self.config.mode == "soft":
                    results[number] = await self._expire_all()
                else:
                    results[number] = await self.flush_all()
            except CacheEvictionFailed as exc:
                results[number] = exc
        if pending:
            await self._evict(purges, hosts, pending, results)
        return results

    def _lookup(self, purge: Purge, hosts: Iterable[str]) -> set[str]:
        """The files ``purge`` matches; ``DataError`` for a malformed URL."""
        index = self.index
        paths: set[str] = set()
        try:
            for url in purge.urls:
                # Without proxy_pass nginx's default key cannot be computed, and an ambiguous
                # key is other URLs' too: then the index alone finds the URL's files.
                key = self._template.url_key(url)
                if key is not None:
                    paths.add(cache_file_name(self._root, self._levels, key))
                    paths |= index.paths_for_key(key)
                paths |= index.paths_for_url(url)
            for prefix in purge.prefixes:
                paths |= index.paths_for_prefix(prefix)
        except ValueError as exc:
            raise DataError(f"purge has a malformed URL ({exc}): expected absolute URLs") from exc
        for tag in purge.tags | purge.keys:
            paths |= index.paths_for_tag(tag)
        for host in hosts:
            paths |= index.paths_for_host(host)
        return paths

    async def _evict(
        self,
        purges: Sequence[Purge],
        key_hosts: Sequence[tuple[str, ...]],
        numbers: list[int],
        results: list[int | DataError | CacheEvictionFailed],
    ) -> None:
        """Look up, open the refill windows of, and evict the purges ``numbers``."""
        jobs: list[Job] = []
        watched: list[tuple[Purge, set[str]]] = []
        guard = self.refill_guard
        for number in numbers:
            purge = purges[number]
            hosts = {*purge.hosts, *key_hosts[number]}
            try:
                paths = self._lookup(purge, hosts)
            except DataError as exc:
                results[number] = exc
                continue
            watched.append((purge, hosts))
            soft = purge.soft or self.config.mode == "soft"
            jobs.append(Job(number, list(paths), soft, guard.window > 0))
        if not jobs:
            return
        # No await since the index lookups: every file nginx puts in place from here on is
        # seen by the batch's refill window.
        window = guard.open_batch(watched)
        outcomes = await carry_out(jobs)
        guard.armed(window, (validators for _, validators, _ in outcomes))
        debug = log.debug  # looked up once: each lookup on the lazy logger binds it anew
        for job, (count, _, failed) in zip(jobs, outcomes, strict=True):
            verb = "expire" if job.soft else "delete"
            try:
                results[job.number] = self._check((count, failed), verb=verb)
            except CacheEvictionFailed as exc:
                results[job.number] = exc
                continue
            debug(
                "nginx_cache_expired" if job.soft else "nginx_cache_purged",
                cache=self.name,
                matched=len(job.paths),
                evicted=count,
            )

    async def _expire_all(self) -> int:
        root = self.config.cache_path
        expired = self._check(await anyio.to_thread.run_sync(expire_tree, root), verb="expire")
        log.debug("nginx_cache_expired_all", cache=self.name, expired=expired)
        return expired

    async def flush_all(self) -> int:
        """Delete every cache file under the folder (walked, not taken from the index).

        Every file nginx puts in place in the refill window after it is evicted once more
        when the window closes: validators are not read for a whole folder.
        """
        window = self.refill_guard.open(Purge(everything=True), ())
        await self.refill_guard.arm(window, ())
        removed = self._check(await anyio.to_thread.run_sync(unlink_tree, self.config.cache_path))
        log.debug("nginx_cache_flushed", cache=self.name, removed=removed)
        return removed

    def _check(
        self, outcome: tuple[int, Sequence[tuple[str, Exception]]], *, verb: str = "delete"
    ) -> int:
        removed, failed = outcome
        if failed:
            path, exc = failed[0]
            raise CacheEvictionFailed(
                f"nginx cache {self.name!r}: could not {verb} {len(failed)} file(s), "
                f"first {path!r}: {_reason(exc)}; the purge will be retried",
                paths=tuple(p for p, _ in failed),
            )
        return removed
