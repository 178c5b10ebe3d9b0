"""How the nginx cache index's tables are filled: a scan of the cache tree, and one file at a time.

:class:`Tables` holds what the index knows (each file's key, tags and key readings, and the
reverse maps from tag, host, path and key to files); :func:`scan` walks a folder, watching
each subfolder before listing it, and reads every file's head with read-ahead;
:func:`load` reads one file that inotify reported. :class:`~drainbus.drain.nginx_index.CacheIndex`
decides when each runs (at start, after a queue overflow, on each event).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from asyncinotify import Inotify, Mask

from drainbus.drain.cache_file import (
    HEAD_FIRST_READ,
    CacheHead,
    is_cache_file_name,
    open_cache_file,
    parse_cache_head,
    read_head,
)
from drainbus.drain.key_template import KeyTemplate, Reading
from drainbus.drain.purges import fold_tag

__all__ = ["FileAdded", "Tables", "fresh_scan", "key_of", "load", "readings_of", "scan"]

log = structlog.get_logger("drainbus.drain.nginx")

# Files opened and asked for ahead of the one being read (see _read_ahead): enough to keep
# a disk busy, few enough that the daemon's file descriptors never run short.
_READ_AHEAD_FILES = 32
_WATCH_MASK = (
    Mask.CLOSE_WRITE
    | Mask.MOVED_TO
    | Mask.MOVED_FROM
    | Mask.DELETE
    | Mask.CREATE
    | Mask.ONLYDIR
    | Mask.DONT_FOLLOW
)

#: Called with a file's path and head each time nginx puts a finished file in place.
FileAdded = Callable[[str, CacheHead], None]


# What the index keeps is made of strings, None, plain tuples and dicts, never NamedTuples or
# sets: the garbage collector stops tracking a tuple or dict that holds only strings, but
# never a tuple subclass or a set. Kept as CacheEntry, KeyParts and sets, 100,000 files were
# 600,000 tracked objects, which every full collection walked (0.2 s each, a quarter of the
# scan's time, then pauses of the event loop for as long as the daemon runs).
#: A file's (key, tags, readings): a CacheEntry whose readings are plain tuples.
_Entry = tuple[str, tuple[str, ...], tuple[Reading, ...]]
#: A set of file paths, as the keys of a dict (values None).
_Paths = dict[str, None]


def key_of(entry: _Entry) -> str:
    """The cache key of an entry."""
    return entry[0]


def readings_of(entry: _Entry) -> tuple[Reading, ...]:
    """Every reading of an entry's key (none: the template cannot read it)."""
    return entry[2]


@dataclass
class Tables:
    """Each indexed file's entry, the files by tag, host, path and key, and the counts."""

    entries: dict[str, _Entry] = field(default_factory=dict)
    by_tag: dict[str, _Paths] = field(default_factory=dict)
    by_host: dict[str, _Paths] = field(default_factory=dict)
    by_path: dict[str, _Paths] = field(default_factory=dict)
    # Only entries no path can be read from: the rest are found by path, then key.
    by_key: dict[str, _Paths] = field(default_factory=dict)
    any_host: set[str] = field(default_factory=set)
    unreadable: int = 0
    invalid: int = 0
    # Entries now indexed whose key the template could not read (no readings).
    unmatched: int = 0

    def _links(self, entry: _Entry) -> Iterator[tuple[dict[str, _Paths], str]]:
        key, tags, readings = entry
        for tag in tags:
            yield self.by_tag, tag
        # by_key is read only for keys no path can be read from: linking one more is waste.
        has_path = False
        for host, path, _ in readings:
            if host is not None:
                yield self.by_host, host
            if path is not None:
                has_path = True
                yield self.by_path, path
        if not has_path:
            yield self.by_key, key

    def add(self, path: str, entry: _Entry) -> None:
        if path in self.entries:
            self.remove(path)
        self.entries[path] = entry
        for table, value in self._links(entry):
            paths = table.get(value)
            if paths is None:
                table[value] = {path: None}
            else:
                paths[path] = None  # values never read: a dict is an ordered set here
        # A wider set would do too: paths_for_host checks every candidate's readings.
        if any(host is None and key_path is not None for host, key_path, _ in readings_of(entry)):
            self.any_host.add(path)
        if not readings_of(entry):
            self.unmatched += 1

    def remove(self, path: str) -> None:
        entry = self.entries.pop(path, None)
        if entry is None:
            return
        for table, value in self._links(entry):
            paths = table.get(value)
            if paths is not None:
                paths.pop(path, None)
                if not paths:
                    del table[value]
        self.any_host.discard(path)
        if not readings_of(entry):
            self.unmatched -= 1


def load(tables: Tables, template: KeyTemplate, path: str) -> CacheHead | None:
    """(Re)index the file at ``path``; its head, or None if it was dropped or skipped."""
    try:
        data = read_head(open_cache_file(path))
    except OSError as exc:
        _skip(tables, path, exc)
        return None
    return _add(tables, template, path, data)


def _add(tables: Tables, template: KeyTemplate, path: str, data: bytes) -> CacheHead | None:
    head = parse_cache_head(data)
    if head is None:
        tables.invalid += 1
        tables.remove(path)
        return None
    # Tags are kept folded (purges.fold_tag): tag purges match them case-insensitively.
    tags = tuple(sorted({sys.intern(fold_tag(tag)) for tag in head.tags}))
    tables.add(path, (head.key, tags, template.readings(head.key)))
    return head


def _skip(tables: Tables, path: str, exc: OSError) -> None:
    tables.remove(path)
    if isinstance(exc, FileNotFoundError):
        return
    if isinstance(exc, PermissionError):
        tables.unreadable += 1
        # Once is enough to tell the operator; the count is in every index log line.
        level = log.warning if tables.unreadable == 1 else log.debug
        level("nginx_cache_file_unreadable", path=path, hint="run as nginx's worker user")
    else:  # a symlink, an I/O error: not a file nginx wrote
        tables.invalid += 1
        log.debug("nginx_cache_file_unusable", path=path, error=str(exc))


def scan(
    tables: Tables,
    template: KeyTemplate,
    top: Path,
    inotify: Inotify,
    added: FileAdded | None = None,
) -> None:
    """Index every cache file under ``top``, watching its folders; ``added`` hears of each."""
    for path, data in _read_ahead(_walk(tables, top, inotify)):
        if isinstance(data, OSError):
            _skip(tables, path, data)
        elif (head := _add(tables, template, path, data)) is not None and added is not None:
            added(path, head)


def _walk(tables: Tables, top: Path, inotify: Inotify) -> Iterator[str]:
    """The path of every cache file under ``top``, watching each folder before listing it.

    Watching first means a file nginx adds after the listing still arrives as an event.
    """
    stack = [str(top)]
    while stack:
        folder = stack.pop()
        try:
            inotify.add_watch(folder, _WATCH_MASK)
            listing = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError:
            tables.unreadable += 1
            log.warning("nginx_cache_folder_unreadable", path=folder)
            continue
        with listing:
            for item in listing:
                # Followed, a symlinked folder is refused by the watch (ONLYDIR | DONT_FOLLOW).
                if item.is_dir(follow_symlinks=False):
                    stack.append(item.path)
                elif is_cache_file_name(item.name):
                    yield item.path


def _read_ahead(paths: Iterable[str]) -> Iterator[tuple[str, bytes | OSError]]:
    """Each path with its file's first bytes, or the error reading them, in order.

    Every file costs a small random read when its head is not in the page cache (after a
    reboot, or once nginx's cache outgrows memory), and one read after another waits for the
    disk each time: reading 100,000 heads that way took 6-7 s on a 2-core VM. So each file
    is opened, and its first page asked for with ``POSIX_FADV_WILLNEED`` (which starts the
    read and returns), ``_READ_AHEAD_FILES`` files before it is read; the disk serves those
    reads together while this thread parses, and the same heads took 2 s. (Reader threads
    overlap the waits too, but each needs the GIL back after every read while this thread
    parses: 4 threads took 4 s.)
    """
    ahead: deque[tuple[str, int | OSError | None]] = deque()
    try:
        for path in paths:
            ahead.append((path, _open_ahead(path)))
            if len(ahead) > _READ_AHEAD_FILES:  # one file more or less ahead: tuning only
                yield _finish_read(*ahead.popleft())
        while ahead:
            yield _finish_read(*ahead.popleft())
    finally:
        for _, fd in ahead:  # only when the caller stopped early
            if isinstance(fd, int):
                os.close(fd)


def _open_ahead(path: str) -> int | OSError | None:
    try:
        fd = open_cache_file(path)
    except OSError as exc:
        # Out of descriptors (the bus holds one per connection): None opens the file at its
        # turn instead, once those ahead of it are closed, rather than skip it.
        # (Retrying after any error would do too: at its turn the open fails the same way.)
        return None if exc.errno in (errno.EMFILE, errno.ENFILE) else exc
    # Only a hint (its range and errors change no result; it fails only on a pipe or a bad fd).
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, HEAD_FIRST_READ, os.POSIX_FADV_WILLNEED)
    return fd


def _finish_read(path: str, fd: int | OSError | None) -> tuple[str, bytes | OSError]:
    if isinstance(fd, OSError):
        return path, fd
    try:
        return path, read_head(open_cache_file(path) if fd is None else fd)
    except OSError as exc:
        return path, exc


def fresh_scan(root: Path, template: KeyTemplate, inotify: Inotify) -> Tables:
    """New tables holding every cache file under ``root`` (run in a worker thread)."""
    tables = Tables()
    scan(tables, template, root, inotify)
    return tables
