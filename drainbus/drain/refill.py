"""The refill guard: no stale fill survives a purge of an nginx cache.

A request already in flight to the origin when a purge deletes a cache file can write the
old page back just after: nginx read the origin before the content changed, and the purge
"worked" while the stale page is cached again. nginx records nothing about when a request
began (the head's ``date`` is when the response headers arrived), so the guard judges by
what it sees. For ``window`` seconds after each purge it watches the files nginx puts in
place (the index's ``on_file_added``) that the purge matches:

- the purge evicted a copy of the object (same cache key) and the new file carries the same
  validator (``ETag``, else ``Last-Modified``): it is the old page coming back, so it is
  evicted at once, once per object and purge (a page whose content really did not change
  costs one extra miss, never a refill loop);
- a different validator is new content: it stays;
- nothing to compare (the object was not cached when the purge ran, or the origin sends no
  validator): it is evicted once more when the window closes, unless nginx replaced it since
  (a "double purge").

So a purge costs at most one extra miss per object refilled in its window. The window must
be at least the origin's response timeout (nginx's ``proxy_read_timeout``), or a response
slower than the window lands after it and is kept. ``window`` 0 turns the guard off.

Usage (what :class:`~drainbus.drain.nginx.NginxCache` does)::

    async with RefillGuard(10.0, template, name="pages") as guard:
        index.on_file_added = guard.file_added
        window = guard.open(purge, hosts)     # after the index lookups, before any await
        await guard.arm(window, paths)        # read the validators of what is evicted
        ...                                   # then delete ``paths``
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

import anyio
import anyio.to_thread
import structlog
from anyio.abc import TaskGroup

from drainbus.drain.cache_file import CacheHead, read_cache_head
from drainbus.drain.key_template import (
    KeyParts,
    KeyTemplate,
    Reading,
    host_reading_matches,
    prefix_reading_matches,
    url_parts,
    url_reading_matches,
)
from drainbus.drain.purges import Purge, fold_tag

__all__ = ["DEFAULT_REFILL_WINDOW", "RefillGuard", "RefillWindow", "read_validators"]

log = structlog.get_logger("drainbus.drain.nginx")

DEFAULT_REFILL_WINDOW = 10.0
"""Seconds the guard watches refills after a purge unless configured otherwise."""

_NO_HOSTS: frozenset[str] = frozenset()

#: A file as the guard saw it: (inode, mtime in ns), to tell whether nginx replaced it since.
_Stamp = tuple[int, int]
_Verdict = Literal["evict", "keep", "recheck"]


@dataclass(eq=False)
class RefillWindow:
    """What one purge (or one batch of purges) matched, what it evicted, and the refills seen
    since, until ``deadline``.

    ``evicted`` maps each evicted cache key to its copies' validators; it is None until
    :meth:`RefillGuard.arm` has read them, and files landing before then wait in ``waiting``.
    ``refills_evicted`` counts the files the guard removed for it. A batch's window has
    ``members`` (each purge and its hosts, to tell whose refill a file was) and no ``purge``.
    """

    deadline: float
    purge: Purge | None = None
    members: tuple[tuple[Purge, frozenset[str]], ...] = ()
    everything: bool = False
    url_keys: frozenset[str] = frozenset()
    urls: tuple[KeyParts, ...] = ()
    prefixes: tuple[KeyParts, ...] = ()
    hosts: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    evicted: dict[str, set[str | None]] | None = None
    waiting: list[tuple[str, CacheHead, _Stamp]] = field(default_factory=list)
    evicted_once: set[str] = field(default_factory=set)
    recheck: dict[str, _Stamp] = field(default_factory=dict)
    recheck_owners: dict[str, Purge] = field(default_factory=dict)  # a batch's, per path
    # A batch's members by cache key, tag and host, made the first time a file is caught.
    owners: dict[tuple[str, str], Purge] | None = None
    refills_evicted: int = 0

    def matches(self, head: CacheHead, readings: tuple[Reading, ...], has_query: bool) -> bool:
        """True when the purge would have evicted a file with ``head``.

        ``readings`` are the key's readings by the key template; they are matched as the
        index's lookups match them; ``has_query`` says whether the key holds the query.
        """
        if (
            self.everything
            or head.key in self.url_keys
            or not self.tags.isdisjoint(map(fold_tag, head.tags))
        ):
            return True
        if not readings:
            return False
        # As the index's lookups: one purge item must match every reading of the key.
        return (
            any(all(host_reading_matches(r, host) for r in readings) for host in self.hosts)
            or any(
                all(url_reading_matches(r, want, has_query=has_query) for r in readings)
                for want in self.urls
            )
            or any(all(prefix_reading_matches(r, want) for r in readings) for want in self.prefixes)
        )

    def verdict(self, head: CacheHead) -> _Verdict:
        """What to do with a matching file that landed in the window (once armed)."""
        validators = (self.evicted or {}).get(head.key, set()) - {None}
        if head.validator is None or not validators:
            return "recheck"
        if head.validator in validators and head.key not in self.evicted_once:
            return "evict"
        return "keep"


def _stamp(path: str) -> _Stamp | None:
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns


def _unlink_if_same(path: str, stamp: _Stamp) -> bool:
    # Between the check and the unlink nginx may rename a newer file in: a window of
    # microseconds, and its only cost is one more miss.
    if _stamp(path) != stamp:
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    return True


def read_validators(
    paths: Iterable[str], *, present: list[str] | None = None
) -> dict[str, set[str | None]]:
    """The cache keys of the files at ``paths`` and their validators (blocking: a thread's).

    What :meth:`RefillGuard.armed` takes; files gone or unreadable are left out. Every path
    that is not gone is appended to ``present`` when given.
    """
    evicted: dict[str, set[str | None]] = {}
    for path in paths:
        try:
            head = read_cache_head(path)
        except FileNotFoundError:
            continue
        except OSError:
            if present is not None:
                present.append(path)
            continue
        if present is not None:
            present.append(path)
        if head is not None:
            evicted.setdefault(head.key, set()).add(head.validator)
    return evicted


def _merged(found: Iterable[dict[str, set[str | None]]]) -> dict[str, set[str | None]]:
    merged: dict[str, set[str | None]] = {}
    for validators in found:
        for key, values in validators.items():
            merged.setdefault(key, set()).update(values)
    return merged


def _unlink_unchanged(recheck: dict[str, _Stamp]) -> list[str]:
    return [path for path, stamp in recheck.items() if _unlink_if_same(path, stamp)]


class RefillGuard:
    """Evicts stale refills of one nginx cache after each purge; an async context manager.

    Entering starts the task that closes windows; leaving cancels it, and windows still open
    are dropped without their double purge. ``refills_evicted`` counts every file removed;
    ``on_evicted(purge, count)``, when set, is told of each removal as it happens (on the
    event loop, so it must not block), with the purge whose window caught it.
    """

    def __init__(self, window: float, template: KeyTemplate, *, name: str) -> None:
        self.window = window
        self.template = template
        self.name = name
        self.refills_evicted = 0
        self.on_evicted: Callable[[Purge, int], None] | None = None
        self._windows: deque[RefillWindow] = deque()
        self._opened = anyio.Event()
        self._tasks: TaskGroup | None = None

    async def __aenter__(self) -> Self:
        if self.window > 0:
            self._tasks = anyio.create_task_group()
            await self._tasks.__aenter__()
            self._tasks.start_soon(self._close_windows)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tasks is not None:
            tasks, self._tasks = self._tasks, None
            tasks.cancel_scope.cancel()  # the closer is its only task
            # Not the caller's exception: a task group would re-raise it inside a group.
            await tasks.__aexit__(None, None, None)
        self._windows.clear()

    def __len__(self) -> int:
        """How many windows are open."""
        return len(self._windows)

    def open(self, purge: Purge, hosts: Collection[str]) -> RefillWindow | None:
        """Start watching refills of what ``purge`` matches; None when the guard is off.

        ``hosts`` are every host the purge evicts (``purge.hosts`` and any the caller derived
        from keys). Call it after looking up the files to evict and before awaiting anything,
        so no file nginx puts in place from then on goes unseen. Raises ``ValueError`` for a
        malformed URL, as rendering its key does.
        """
        if self.window <= 0:
            return None
        return self._watch(self._window(purge, hosts))

    def open_batch(self, purges: Sequence[tuple[Purge, Collection[str]]]) -> RefillWindow | None:
        """:meth:`open` for a batch of ``(purge, hosts)``: one window watching for what any
        of them matches; None when the guard is off or ``purges`` is empty.

        One window per batch, not per purge: a busy drain carries out thousands of purges a
        second and each is watched for ``window`` seconds, so windows of their own held
        about 1.6 KB per purge (260 MiB through a large backlog) and every file nginx wrote
        was matched against each of them. Whose refill a file was is worked out only for a
        file the window catches.
        """
        if self.window <= 0 or not purges:
            return None
        # Most purges name no host: they share one empty set (216 bytes each otherwise).
        members = tuple(
            (purge, frozenset(h.lower() for h in hosts) if hosts else _NO_HOSTS)
            for purge, hosts in purges
        )
        url_keys = (self.template.url_key(url) for purge, _ in purges for url in purge.urls)
        return self._watch(
            RefillWindow(
                deadline=0.0,
                members=members,
                everything=any(purge.everything for purge, _ in purges),
                url_keys=frozenset(key for key in url_keys if key is not None),
                urls=tuple({url_parts(u) for purge, _ in purges for u in purge.urls}),
                prefixes=tuple({url_parts(p) for purge, _ in purges for p in purge.prefixes}),
                hosts=frozenset().union(*(hosts for _, hosts in members)),
                tags=frozenset(
                    fold_tag(tag) for purge, _ in purges for tag in purge.tags | purge.keys
                ),
            )
        )

    def _window(self, purge: Purge, hosts: Collection[str]) -> RefillWindow:
        return RefillWindow(
            deadline=0.0,
            purge=purge,
            everything=purge.everything,
            # Without proxy_pass nginx's default key cannot be rendered: URLs then match by
            # the readings of the new file's key alone.
            url_keys=frozenset(
                key for url in purge.urls if (key := self.template.url_key(url)) is not None
            ),
            urls=tuple(url_parts(url) for url in purge.urls),
            prefixes=tuple(url_parts(url) for url in purge.prefixes),
            hosts=frozenset(host.lower() for host in hosts),
            tags=frozenset(map(fold_tag, purge.tags | purge.keys)),
        )

    def _watch(self, window: RefillWindow) -> RefillWindow:
        window.deadline = anyio.current_time() + self.window
        self._windows.append(window)
        self._opened.set()
        return window

    def _owner(self, window: RefillWindow, head: CacheHead) -> Purge | None:
        """The purge whose refill a file ``window`` caught is: its own, or the first of its
        batch that matches the file (rare: only files the window caught are asked about)."""
        if window.purge is not None or not window.members:
            return window.purge
        if window.owners is None:
            window.owners = self._owners(window.members)
        readings = self.template.readings(head.key)
        names = [("key", head.key), *(("tag", fold_tag(tag)) for tag in head.tags)]
        names += [("host", reading[0]) for reading in readings[:1] if reading[0] is not None]
        for name in names:
            if (purge := window.owners.get(name)) is not None:
                return purge
        # Matched by its URL's or a prefix's readings (a key this template cannot render).
        has_query = self.template.has_query
        for purge, hosts in window.members:
            if (purge.urls or purge.prefixes or purge.everything) and self._window(
                purge, hosts
            ).matches(head, readings, has_query):
                return purge
        return None

    def _owners(
        self, members: Sequence[tuple[Purge, frozenset[str]]]
    ) -> dict[tuple[str, str], Purge]:
        owners: dict[tuple[str, str], Purge] = {}
        for purge, hosts in reversed(members):  # the first member of a name wins
            for url in purge.urls:
                if (key := self.template.url_key(url)) is not None:
                    owners["key", key] = purge
            for tag in purge.tags | purge.keys:
                owners["tag", fold_tag(tag)] = purge
            for host in hosts:
                owners["host", host] = purge
        return owners

    async def arm(self, window: RefillWindow | None, paths: Iterable[str]) -> None:
        """Remember the keys and validators of the files at ``paths``, before they are deleted.

        Files in place since :meth:`open` are judged now; later ones as they land.
        """
        if window is None or window.evicted is not None:
            return
        evicted = await anyio.to_thread.run_sync(read_validators, list(paths))
        self._arm_now(window, evicted)

    def armed(
        self, window: RefillWindow | None, found: Iterable[dict[str, set[str | None]]]
    ) -> None:
        """:meth:`arm` with the validators already read (:func:`read_validators` of each purge
        of the window, in a worker thread, before the files were deleted)."""
        if window is None or window.evicted is not None:
            return
        self._arm_now(window, _merged(found))

    def file_added(self, path: str, head: CacheHead) -> None:
        """The index's ``on_file_added``: judge a file nginx put in place (on the loop)."""
        if not self._windows:
            return
        readings = self.template.readings(head.key)
        has_query = self.template.has_query
        windows = [w for w in self._windows if w.matches(head, readings, has_query)]
        if not windows:
            return
        stamp = _stamp(path)
        if stamp is None:  # gone already
            return
        armed = []
        for window in windows:
            if window.evicted is None:
                window.waiting.append((path, head, stamp))
            else:
                armed.append(window)
        self._judge(armed, path, head, stamp)

    def _arm_now(self, window: RefillWindow, evicted: dict[str, set[str | None]]) -> None:
        window.evicted = evicted
        waiting, window.waiting = window.waiting, []
        for path, head, stamp in waiting:
            self._judge([window], path, head, stamp)

    def _judge(
        self, windows: list[RefillWindow], path: str, head: CacheHead, stamp: _Stamp
    ) -> None:
        verdicts = [(window, window.verdict(head)) for window in windows]
        evict = [window for window, verdict in verdicts if verdict == "evict"]
        evicted = bool(evict) and _unlink_if_same(path, stamp)
        if evicted:
            self.refills_evicted += 1
            evict[0].refills_evicted += 1
            self._tell(self._owner(evict[0], head), 1)
            for window in evict:
                window.evicted_once.add(head.key)
            log.info(
                "nginx_stale_refill_evicted",
                cache=self.name,
                key=head.key,
                validator=head.validator,
            )
        for window, verdict in verdicts:
            if verdict == "recheck" and not evicted:
                window.recheck[path] = stamp
                if window.members and (owner := self._owner(window, head)) is not None:
                    window.recheck_owners[path] = owner
            else:
                window.recheck.pop(path, None)
                window.recheck_owners.pop(path, None)

    def _tell(self, purge: Purge | None, count: int) -> None:
        if self.on_evicted is not None and purge is not None:
            try:
                self.on_evicted(purge, count)
            except Exception:  # a listener's bug must not stop the guard
                log.exception("nginx_refill_listener_failed", cache=self.name)

    async def _close_windows(self) -> None:
        while True:
            if not self._windows:
                self._opened = anyio.Event()  # an anyio event is set once: a new one to wait on
                await self._opened.wait()
                continue
            # Windows open in deadline order (one length, one clock): the first ends first.
            delay = self._windows[0].deadline - anyio.current_time()
            if delay > 0:
                await anyio.sleep(delay)  # a timer: the window's end is the event
                continue
            window = self._windows.popleft()
            with contextlib.suppress(Exception):  # logged by _close; the closer must go on
                await self._close(window)

    async def _close(self, window: RefillWindow) -> None:
        if window.evicted is None:  # the purge never got to arm it (cancelled, failed)
            self._arm_now(window, {})
        if not window.recheck:  # nothing landed to check: most windows; no thread trip
            self._report(window)
            return
        try:
            paths = await anyio.to_thread.run_sync(_unlink_unchanged, window.recheck)
        except Exception:
            log.exception("nginx_refill_window_close_failed", cache=self.name)
            raise
        self.refills_evicted += len(paths)
        window.refills_evicted += len(paths)
        if window.members:
            owners: dict[Purge, int] = {}
            for path in paths:
                if (owner := window.recheck_owners.get(path)) is not None:
                    owners[owner] = owners.get(owner, 0) + 1
            for owner, count in owners.items():
                self._tell(owner, count)
        elif paths:
            self._tell(window.purge, len(paths))
        self._report(window)

    def _report(self, window: RefillWindow) -> None:
        if window.refills_evicted or window.recheck:
            log.info(
                "nginx_refill_window_closed",
                cache=self.name,
                refills_seen=len(window.recheck),
                refills_evicted=window.refills_evicted,
            )
