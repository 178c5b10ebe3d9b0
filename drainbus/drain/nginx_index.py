"""An index of one nginx ``proxy_cache`` folder: which file holds which key, host, path and tag.

:class:`CacheIndex` reads those heads once at start (a scan of the tree, by
:mod:`drainbus.drain.cache_scan`, which also keeps the tables) and then follows inotify, so
host, prefix and tag purges never need a scan. nginx (``use_temp_path=off``)
writes a temporary ``<md5>.<10 digits>`` file and renames it into place, so a finished file
shows up as ``IN_MOVED_TO``; an in-place header update as ``IN_CLOSE_WRITE``.

Host and path come from the key by running the key template backwards. ``$scheme$host`` is
ambiguous (``httpshop.example`` is ``http`` + ``shop.example`` or ``https`` + ``hop.example``),
so an entry keeps every reading the template allows, and a host, prefix or URL purge finds it
only when EVERY reading matches: the owner of ``hop.example`` cannot evict ``shop.example``'s
pages (tag purges still find such files). A template without ``$host`` (such as nginx's default key,
``http://127.0.0.1:8080/docs/x?q=1``) makes one object serve every host, so such entries
match any host. Files whose key the template cannot read at all are counted
(:attr:`CacheIndex.unmatched_keys`): only tag purges can find them.

asyncio on purpose: inotify's descriptor is read with the event loop's ``add_reader``, which
anyio has no equivalent for (its ``wait_readable`` takes sockets, not an inotify fd).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import time
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self

import anyio
import structlog
from asyncinotify import Event, Inotify, Mask

from drainbus.drain.cache_file import CacheHead, is_cache_file_name
from drainbus.drain.cache_scan import FileAdded, Tables, fresh_scan, key_of, load, readings_of, scan
from drainbus.drain.key_template import (
    KeyParts,
    KeyTemplate,
    host_reading_matches,
    prefix_reading_matches,
    url_parts,
    url_reading_matches,
)
from drainbus.drain.purges import fold_tag
from drainbus.errors import BackendError, DrainbusError, StartupError

__all__ = ["CacheEntry", "CacheIndex", "FileAdded"]

log = structlog.get_logger("drainbus.drain.nginx")

_EVENT_BATCH = 1024


# inotify's event bits as ints, for _apply (see there).
_Q_OVERFLOW, _IGNORED, _ISDIR = int(Mask.Q_OVERFLOW), int(Mask.IGNORED), int(Mask.ISDIR)
_CREATE, _CLOSE_WRITE, _DELETE = int(Mask.CREATE), int(Mask.CLOSE_WRITE), int(Mask.DELETE)
_MOVED_FROM, _MOVED_TO = int(Mask.MOVED_FROM), int(Mask.MOVED_TO)


class CacheEntry(NamedTuple):
    """One indexed cache file: its key, its tags (folded by :func:`fold_tag`, sorted) and
    every reading of the key."""

    key: str
    tags: tuple[str, ...]
    readings: tuple[KeyParts, ...]

    @property
    def hosts(self) -> frozenset[str]:
        """The hosts the key may belong to (empty: unknown, or the key ignores the host)."""
        return frozenset(r.host for r in self.readings if r.host is not None)


def _watch_failure(kind: type[DrainbusError], root: Path, exc: OSError) -> DrainbusError:
    hint = ""
    if exc.errno in (errno.ENOSPC, errno.EMFILE):
        hint = "; raise the sysctls fs.inotify.max_user_watches / max_user_instances"
    return kind(f"cannot index nginx cache folder {str(root)!r}: {exc}{hint}")


class CacheIndex:
    """An in-memory index of one nginx cache folder, kept current by inotify.

    Use as an async context manager: entering scans the tree (in a worker thread) and starts
    following inotify events on the event loop; leaving stops. Call :meth:`sync` before
    acting on the index so it includes every file nginx finished before the call. Lookups
    return sets of absolute file paths (``str``).

    Entering raises :class:`StartupError` when the folder cannot be watched (inotify limits);
    a later rescan that fails the same way raises :class:`BackendError` from :meth:`sync`.

    ``on_file_added``, when set, is called on the event loop with the path and head of each
    file nginx puts in place while the index follows the folder (renamed in, or found in a
    folder made since), after the file is indexed; not for files found by a full scan, nor
    for in-place header updates (``IN_CLOSE_WRITE``), which never bring a new response.
    Whatever it raises is logged, never passed on.
    """

    def __init__(
        self,
        root: Path,
        template: KeyTemplate,
        *,
        name: str | None = None,
        on_file_added: FileAdded | None = None,
    ) -> None:
        self.root = root
        self.template = template
        self.name = name or str(root)
        self.on_file_added = on_file_added
        # Start values: entering sets each of the next five before it is read.
        self._tables = Tables()
        self._inotify: Inotify | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stale = False
        self._held: list[Event] | None = None
        self._lock = anyio.Lock()

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        async with self._lock:
            await self._rebuild(StartupError)
            self._drain()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close_inotify()

    def __len__(self) -> int:
        return len(self._tables.entries)

    def __contains__(self, path: object) -> bool:
        return str(path) in self._tables.entries

    def get(self, path: str | Path) -> CacheEntry | None:
        """The entry indexed for the file at ``path``, if any."""
        entry = self._tables.entries.get(str(path))
        if entry is None:
            return None
        key, tags, readings = entry
        return CacheEntry(key, tags, tuple(KeyParts(*reading) for reading in readings))

    @property
    def skipped_unreadable(self) -> int:
        """Files (and folders) skipped because reading them was not permitted."""
        return self._tables.unreadable

    @property
    def unmatched_keys(self) -> int:
        """Indexed files whose key the template cannot read: host and prefix purges miss
        them (tag purges still find them)."""
        return self._tables.unmatched

    def sample_keys(self, limit: int) -> list[str]:
        """The keys of up to ``limit`` indexed files."""
        return [key_of(entry) for entry in itertools.islice(self._tables.entries.values(), limit)]

    @property
    def skipped_invalid(self) -> int:
        """Files skipped because they hold no complete nginx cache head (truncated, garbage)."""
        return self._tables.invalid

    async def sync(self) -> None:
        """Apply every inotify event queued so far; rescan instead after a queue overflow.

        Events are also applied whenever the event loop sees them, so between calls the
        index lags nginx only by what the loop has not run yet.
        """
        async with self._lock:
            if self._stale:
                await self._rebuild()
            self._drain()

    def paths_for_key(self, key: str) -> set[str]:
        """Files whose cache key is exactly ``key`` (the main file and any Vary variants)."""
        tables = self._tables
        paths = {r.path for r in self.template.invert(key) if r.path is not None}
        if not paths:
            return set(tables.by_key.get(key, ()))
        candidates = set().union(*(tables.by_path.get(path, ()) for path in paths))
        return {path for path in candidates if key_of(tables.entries[path]) == key}

    def paths_for_tag(self, tag: str) -> set[str]:
        """Files tagged ``tag``, whole tags compared ignoring ASCII case (:func:`fold_tag`)."""
        return set(self._tables.by_tag.get(fold_tag(tag), ()))

    def paths_for_host(self, host: str) -> set[str]:
        """Files of ``host`` (case-insensitive), including objects whose key ignores the host.

        A file whose key may also be another host's (an ambiguous template) is left out.
        """
        tables = self._tables
        host = host.lower()
        return {
            path
            for path in tables.any_host.union(tables.by_host.get(host, ()))
            if all(host_reading_matches(r, host) for r in readings_of(tables.entries[path]))
        }

    def paths_for_url(self, url: str) -> set[str]:
        """Files holding ``url``'s host, path and (if the key has it) query, any scheme.

        A file whose key may also be another URL's (an ambiguous template) is left out.
        """
        want = url_parts(url)
        has_query = self.template.has_query
        found = set()
        for path in self._tables.by_path.get(want.path or "/", ()):  # (url_parts gives "/")
            readings = readings_of(self._tables.entries[path])
            if all(url_reading_matches(r, want, has_query=has_query) for r in readings):
                found.add(path)
        return found

    def paths_for_prefix(self, prefix_url: str) -> set[str]:
        """Files of the prefix's host whose path is the prefix path or below it.

        Boundaries hold (:func:`~drainbus.drain.purges.path_under`): ``/docs`` covers
        ``/docs``, ``/docs?x`` and ``/docs/…``, never ``/docs2``; ``/docs/`` covers ``/docs/``
        and below only; ``/`` covers the whole host. A file whose key may also be another
        host's or path's (an ambiguous template) is left out.
        """
        want = url_parts(prefix_url)
        return {
            path
            for path in self.paths_for_host(want.host or "")  # (url_parts always has one)
            if all(prefix_reading_matches(r, want) for r in readings_of(self._tables.entries[path]))
        }

    async def _rebuild(self, failure: type[DrainbusError] = BackendError) -> None:
        self._close_inotify()
        started = time.monotonic()
        try:
            inotify = Inotify(cache_size=_EVENT_BATCH)
        except OSError as exc:
            raise _watch_failure(failure, self.root, exc) from exc
        inotify.sync_timeout = 0  # sync_get: never block, None when the queue is empty
        self._inotify, self._stale, self._held = inotify, False, []
        # Read events while the scan runs so a busy nginx cannot overflow the kernel's queue;
        # they are held and applied in order once the scan's tables are in place.
        assert self._loop is not None
        self._loop.add_reader(inotify.fd, self._drain)
        try:
            tables = await anyio.to_thread.run_sync(fresh_scan, self.root, self.template, inotify)
        except OSError as exc:
            self._close_inotify()
            raise _watch_failure(failure, self.root, exc) from exc
        except BaseException:
            self._close_inotify()
            raise
        self._tables, held, self._held = tables, self._held, None
        for event in held:
            self._apply(event, inotify)
        if not self.root.is_dir():
            self._stale = True  # retry at the next sync until nginx creates it
        log.info(
            "nginx_cache_indexed",
            cache=self.name,
            files=len(tables.entries),
            unmatched_keys=tables.unmatched,
            unreadable=tables.unreadable,
            invalid=tables.invalid,
            seconds=round(time.monotonic() - started, 3),
        )

    def _close_inotify(self) -> None:
        self._held = None  # read only while an inotify is open, and _rebuild sets it then
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None

    def _drain(self) -> None:
        inotify = self._inotify
        while inotify is not None and not self._stale:
            event = inotify.sync_get()
            if event is None:
                return
            if self._held is not None:
                self._held.append(event)
            else:
                self._apply(event, inotify)
        # The loop ends here only when stale, or closed (no inotify: no reader to remove).
        if self._stale and inotify is not None and self._loop is not None:
            # Stop reading until sync() rescans; the events left are superseded by that scan.
            self._loop.remove_reader(inotify.fd)

    def _apply(self, event: Event, inotify: Inotify) -> None:
        # The mask as a plain int: each operation on a Mask builds enum members, and a
        # drain deleting thousands of files a second reads as many events.
        mask, path = int(event.mask), event.path
        if mask & _Q_OVERFLOW or (mask & _IGNORED and path == self.root):
            log.warning("nginx_cache_index_stale", cache=self.name, reason=repr(event.mask))
            self._stale = True
        elif path is None or mask & _IGNORED:
            # (`and` would do: no other event lacks a path, and a folder whose watch is
            # IGNORED never has a cache file's name.)
            return
        elif mask & _ISDIR:
            if mask & (_CREATE | _MOVED_TO):
                try:
                    scan(self._tables, self.template, path, inotify, self._file_added)
                except OSError:  # out of watches: the next sync rescans, or says why
                    log.exception("nginx_cache_folder_unwatched", path=str(path))
                    self._stale = True
            elif mask & _MOVED_FROM:
                self._stale = True  # the folder's watch now names a wrong path
        elif is_cache_file_name(path.name):
            if mask & (_CLOSE_WRITE | _MOVED_TO):
                head = load(self._tables, self.template, str(path))
                if head is not None and mask & _MOVED_TO:
                    self._file_added(str(path), head)
            elif mask & (_DELETE | _MOVED_FROM):
                # (CREATE, the one event left, would find nothing to remove: not indexed yet.)
                self._tables.remove(str(path))

    def _file_added(self, path: str, head: CacheHead) -> None:
        if self.on_file_added is None:
            return
        try:
            self.on_file_added(path, head)
        except Exception:  # a listener's bug must not stop the index following nginx
            log.exception("nginx_cache_file_listener_failed", cache=self.name, path=path)
