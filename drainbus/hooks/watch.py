"""``drainbus hook watch``: publish a site's key when files under it change.

The watched folder holds sites (``/srv/sites/acme/blog/…``); a :class:`KeyTemplate` turns a
changed path into its site key (``acme-blog``). A deploy that writes 5,000 files sends one
purge: each key waits until its site has been quiet for ``debounce`` seconds (but no longer
than ``max_wait`` after its first change, so a site that never stops changing is still
purged), then every key that is due goes to the bus in one ``pub``.

Nothing is lost when the bus is away: a key enters the :class:`Spool` file as soon as its
first change is seen and leaves it only when the bus has stored it. Failed sends are retried
with exponential back-off and jitter (each retry logged); a restart sends what the spool
holds. Only a refusal that cannot change (exit 64, 65 or 77) drops keys, loudly.

Changes are followed with inotify, one watch per folder: a new folder is watched and then
listed, so files written into it before its watch existed still count; a folder moved or
deleted counts as a change of every site under it; a kernel queue overflow counts as a change
of every site (a needless purge beats a missed one). If the watched folder itself is missing
or goes away, the watcher waits for it and, when it is back, counts every site in it as
changed. Symbolic links to folders are not followed: replacing the link is the change.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus
from asyncinotify import Event, Inotify, Mask, Watch

from drainbus.backoff import Backoff
from drainbus.errors import ExitCode, StartupError
from drainbus.hooks.client import PERMANENT_EXIT_CODES, BusClient, BusUnreachable
from drainbus.hooks.keys import KeyTemplate
from drainbus.hooks.settings import HooksSettings
from drainbus.hooks.spool import Spool

__all__ = ["Attempt", "Debouncer", "Watcher"]

log = structlog.get_logger("drainbus.hooks.watch")

_MASK = (
    Mask.CREATE
    | Mask.CLOSE_WRITE
    | Mask.ATTRIB
    | Mask.MOVED_FROM
    | Mask.MOVED_TO
    | Mask.DELETE
    | Mask.ONLYDIR
    | Mask.DONT_FOLLOW
    | Mask.EXCL_UNLINK
)
# The watched folder itself may be a symlink (followed); its own removal ends the watch.
_ROOT_MASK = (_MASK & ~Mask.DONT_FOLLOW) | Mask.DELETE_SELF | Mask.MOVE_SELF
_EVENT_BATCH = 1024  # events read per read(2)
_OUT_OF_WATCHES = (errno.ENOSPC, errno.EMFILE, errno.ENOMEM)
_SKIPPED_REMEMBERED = 1000  # distinct unusable names logged once each


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at publishing a batch of due keys: the keys, the exit code (0 stored, the
    server's ``pub`` code, or 69 when the bus could not be reached) and the server's stderr or
    the reason it was unreachable."""

    keys: tuple[str, ...]
    exit_code: int
    message: str = ""
    stored: int = 0  # over a bus limit (75): the first keys the bus stored before refusing

    @property
    def delivered(self) -> bool:
        """True when the bus stored every key."""
        return self.exit_code == 0

    @property
    def final(self) -> bool:
        """True when the keys leave the spool: stored, or refused for good (64, 65, 77)."""
        return self.delivered or self.exit_code in PERMANENT_EXIT_CODES


class Debouncer:
    """Per-key trailing debounce: a key is due ``quiet`` seconds after its last change, or
    ``max_wait`` seconds after its first, whichever comes first. Times are in seconds on any
    monotonic clock the caller uses consistently."""

    def __init__(self, quiet: float, max_wait: float) -> None:
        self.quiet = quiet
        self.max_wait = max_wait
        self._first: dict[str, float] = {}
        self._deadline: dict[str, float] = {}

    def mark(self, key: str, now: float) -> bool:
        """Record a change of ``key``; True if it was not already waiting."""
        first = self._first.setdefault(key, now)
        new = key not in self._deadline
        self._deadline[key] = min(now + self.quiet, first + self.max_wait)
        return new

    def due(self, now: float) -> list[str]:
        """Remove and return the keys whose time has come."""
        keys = [key for key, deadline in self._deadline.items() if deadline <= now]
        for key in keys:
            del self._deadline[key], self._first[key]
        return keys

    def next_due(self) -> float | None:
        """When the next key falls due, or None when none is waiting."""
        return min(self._deadline.values(), default=None)

    @property
    def keys(self) -> frozenset[str]:
        """The keys waiting."""
        return frozenset(self._deadline)


class Watcher:
    """Watches ``root`` and publishes the keys of changed sites to ``settings.topic``.

    ``client`` defaults to a :class:`BusClient` for ``settings`` (which reads the key file:
    ConfigError). ``on_attempt`` is called after every publish attempt. ``retry_initial`` and
    ``retry_max`` bound the back-off in seconds; ``root_poll_interval`` is how often a missing
    ``root`` is looked for. Raises :class:`drainbus.errors.UsageError` for a bad
    ``settings.key_from``.
    """

    def __init__(
        self,
        root: Path,
        settings: HooksSettings,
        *,
        client: BusClient | None = None,
        on_attempt: Callable[[Attempt], None] | None = None,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        root_poll_interval: float = 1.0,
    ) -> None:
        self.root = root.expanduser().absolute()
        self.settings = settings
        self.template = KeyTemplate(settings.key_from)
        self._client = client if client is not None else BusClient(settings)
        self._on_attempt = on_attempt
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._root_poll_interval = root_poll_interval
        self._debouncer = Debouncer(settings.debounce, settings.max_wait)
        self._ready: set[str] = set()  # due, or sent and not yet stored
        self._wakeup: anyio.Event | None = None  # set when a key starts waiting
        self._spool: Spool | None = None
        self._inotify: Inotify | None = None
        self._watches: dict[Path, Watch] = {}
        self._root_watch: Watch | None = None
        self._skipped: set[tuple[str, ...]] = set()

    @property
    def pending(self) -> frozenset[str]:
        """Keys seen changing and not yet stored by the bus."""
        return self._debouncer.keys | self._ready

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Watch and publish until cancelled; report started once the folder is watched (or
        known to be missing). Raises StartupError when the spool or inotify cannot be used."""
        with Spool(self.settings.spool_path) as spool:
            self._spool = spool
            self._wakeup = anyio.Event()
            self._ready.update(spool.keys)  # left by an earlier run: send them now
            async with anyio.create_task_group() as task_group:
                await task_group.start(self._watch_loop)
                log.info(
                    "hook_watching",
                    root=str(self.root),
                    key_from=self.settings.key_from,
                    topic=self.settings.topic,
                    bus=self.settings.address,
                    spool=str(spool.path),
                    resending=len(spool),
                )
                task_group.start_soon(self._send_loop)
                task_status.started()

    # --- following the folder ------------------------------------------------------------

    async def _watch_loop(self, *, task_status: TaskStatus[None]) -> None:
        started = False
        was_missing = False
        while True:
            if not self.root.is_dir():
                if not was_missing:
                    log.warning("hook_root_missing", root=str(self.root), action="waiting")
                was_missing = True
                if not started:
                    task_status.started()
                    started = True
                await anyio.sleep(self._root_poll_interval)
                continue
            try:
                inotify = Inotify(cache_size=_EVENT_BATCH)
            except OSError as exc:
                raise _watch_failure(self.root, exc) from None
            with inotify:
                self._inotify, self._watches, self._root_watch = inotify, {}, None
                # Back after being missing: whatever it holds now is new to the caches.
                self._add_tree(self.root, mark=was_missing, strict=not started)
                if self._root_watch is not None:
                    if was_missing:
                        log.info("hook_root_found", root=str(self.root))
                    if not started:
                        task_status.started()
                        started = True
                    async for event in inotify:
                        if self._handle(event):
                            break
                    # The folder went away: every site still known under it is gone with it.
                    self._forget_tree(self.root)
                    log.warning("hook_root_gone", root=str(self.root), action="waiting")
                self._inotify, self._watches, self._root_watch = None, {}, None
            if not started:  # it vanished between the check and the watch
                task_status.started()
                started = True
            was_missing = True
            await anyio.sleep(self._root_poll_interval)

    def _handle(self, event: Event) -> bool:
        """Apply one inotify event; True when the watched folder itself is gone."""
        mask = event.mask
        if Mask.Q_OVERFLOW in mask:
            log.warning("hook_watch_overflow", root=str(self.root), action="every site changed")
            self._add_tree(self.root, mark=True)
            return False
        watch = event.watch
        if watch is None:
            return False
        if Mask.IGNORED in mask:
            if self._watches.get(watch.path) is watch:
                del self._watches[watch.path]
            return watch is self._root_watch
        if mask & (Mask.DELETE_SELF | Mask.MOVE_SELF):  # only the root watch asks for these
            return True
        path = event.path
        if path is None:
            return False
        self._mark_keys(self._keys_of([path]))
        if Mask.ISDIR in mask:
            if mask & (Mask.CREATE | Mask.MOVED_TO):
                self._add_tree(path, mark=True)
            elif mask & Mask.MOVED_FROM:
                # Its watches would go on naming the old path: drop them (the new place, if
                # inside the root, arrives as MOVED_TO and is watched afresh).
                self._forget_tree(path)
        return False

    def _add_tree(self, top: Path, *, mark: bool, strict: bool = False) -> None:
        """Watch ``top`` and every folder below it; with ``mark``, count every site in it as
        changed. ``strict`` (at start) makes running out of inotify watches, or a root that
        cannot be watched, a StartupError; otherwise a folder that cannot be watched is
        logged and the rest still watched."""
        assert self._inotify is not None
        keys: set[str] = set()
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                watch = self._inotify.add_watch(
                    folder, _ROOT_MASK if folder == self.root else _MASK
                )
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone again already; its own event says so
            except OSError as exc:
                if strict and (folder == self.root or exc.errno in _OUT_OF_WATCHES):
                    raise _watch_failure(folder, exc) from None
                log.error(  # noqa: TRY400 - the reason is in the message; a traceback adds nothing
                    "hook_folder_unwatched", path=str(folder), error=_os_reason(exc)
                )
                keys.update(self._keys_of([folder]) if mark else ())
                continue
            self._watches[folder] = watch
            if folder == self.root:
                self._root_watch = watch
            depth = len(folder.relative_to(self.root).parts)
            if mark and depth >= self.template.depth:
                keys.update(self._keys_of([folder]))
            try:
                with os.scandir(folder) as entries:
                    listed = list(entries)
            except OSError:  # gone, or unreadable: its watch (if any) still reports changes
                continue
            for entry in listed:
                try:
                    is_folder = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_folder:
                    stack.append(Path(entry.path))
                elif mark and depth + 1 == self.template.depth:
                    keys.update(self._keys_of([Path(entry.path)]))
        self._mark_keys(keys)

    def _forget_tree(self, top: Path) -> None:
        """Stop watching ``top`` and the folders below it; count their sites as changed."""
        gone = [path for path in self._watches if path == top or top in path.parents]
        for path in gone:
            watch = self._watches.pop(path)
            if self._inotify is not None and watch is not self._root_watch:
                with contextlib.suppress(OSError):  # the kernel dropped it already (deleted)
                    self._inotify.rm_watch(watch)
        self._mark_keys(self._keys_of(gone))

    def _keys_of(self, paths: Iterable[Path]) -> set[str]:
        keys: set[str] = set()
        for path in paths:
            try:
                parts = path.relative_to(self.root).parts
            except ValueError:
                continue
            key = self.template.key_for(parts)
            if key is not None:
                keys.add(key)
            elif len(parts) >= self.template.depth:
                self._log_skipped(parts[: self.template.depth])
        return keys

    def _log_skipped(self, segments: tuple[str, ...]) -> None:
        if segments in self._skipped or len(self._skipped) >= _SKIPPED_REMEMBERED:
            return
        self._skipped.add(segments)
        log.info(
            "hook_path_skipped",
            path=str(self.root.joinpath(*segments)),
            reason="a name the key template uses is not a key (letters, digits, '.', '_', '-', "
            "starting with a letter or digit)",
        )

    def _mark_keys(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        assert self._spool is not None
        try:
            self._spool.add(keys)
        except OSError as exc:  # still held in memory; only a crash now would lose them
            log.error(  # noqa: TRY400 - the reason is in the message; a traceback adds nothing
                "hook_spool_write_failed", path=str(self._spool.path), error=str(exc)
            )
        now = anyio.current_time()
        new = False
        for key in keys:
            new |= self._debouncer.mark(key, now)
        if new and self._wakeup is not None:  # a key already waiting only moves its deadline
            self._wakeup.set()

    # --- publishing ----------------------------------------------------------------------

    async def _send_loop(self) -> None:
        retries = Backoff("hook_publish_retry", base=self._retry_initial, cap=self._retry_max)
        while True:
            self._wakeup = wakeup = anyio.Event()
            now = anyio.current_time()
            self._ready.update(self._debouncer.due(now))
            if not self._ready:
                next_due = self._debouncer.next_due()
                with anyio.move_on_after(None if next_due is None else next_due - now):
                    await wakeup.wait()
                continue
            attempt = await self._publish(tuple(sorted(self._ready)))
            if self._on_attempt is not None:
                self._on_attempt(attempt)
            if attempt.final:
                retries.succeeded()
                self._ready.difference_update(attempt.keys)
                self._rewrite_spool()
                continue
            if attempt.stored:  # sent again, they would spend the limit's budget again
                self._ready.difference_update(attempt.keys[: attempt.stored])
                self._rewrite_spool()
            await retries.failed(
                attempt.message, keys=len(attempt.keys), exit_code=attempt.exit_code
            )

    async def _publish(self, keys: tuple[str, ...]) -> Attempt:
        topic = self.settings.topic
        try:
            async with self._client.connect() as session:
                result = await session.publish(topic, keys)
        except BusUnreachable as exc:
            return Attempt(keys, ExitCode.UNAVAILABLE, exc.reason)
        attempt = Attempt(
            keys, result.exit_code, result.stderr.strip(), result.stored_before_refusal
        )
        if attempt.delivered:
            log.info("hook_published", topic=topic, keys=list(keys))
        elif attempt.final:
            log.error(
                "hook_publish_refused",
                topic=topic,
                keys=list(keys),
                exit_code=attempt.exit_code,
                error=attempt.message,
                action="dropped: sending them again would be refused again",
            )
        return attempt

    def _rewrite_spool(self) -> None:
        assert self._spool is not None
        try:
            self._spool.replace(self.pending)
        except OSError as exc:  # the delivered keys stay in the file and are sent again later
            log.error(  # noqa: TRY400 - the reason is in the message; a traceback adds nothing
                "hook_spool_write_failed", path=str(self._spool.path), error=str(exc)
            )


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _watch_failure(path: Path, exc: OSError) -> StartupError:
    hint = ""
    if exc.errno == errno.ENOSPC:
        hint = "; raise the sysctl fs.inotify.max_user_watches"
    elif exc.errno == errno.EMFILE:
        hint = "; raise the sysctl fs.inotify.max_user_instances"
    return StartupError(f"cannot watch {path}: {_os_reason(exc)}{hint}")
