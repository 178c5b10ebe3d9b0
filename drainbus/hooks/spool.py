"""The spool: purges ``hook watch`` owes the bus, in a file, so an outage or a crash loses none.

A key is written (and fsynced) the moment a change to its site is seen, before debouncing,
and leaves the file only once the bus has stored it. After a crash every key in the file is
sent again at start; purges are idempotent, so a repeat costs a cache miss, never a stale
page. The file is one key per line; rewriting it goes through a temporary file and a rename,
so it is always either the old or the new list.

One watcher owns a spool at a time (``flock`` on ``PATH.lock``); a second one is refused.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from drainbus.errors import StartupError

__all__ = ["Spool"]


class Spool:
    """The set of keys not yet confirmed by the bus, mirrored in a file.

    Entering creates the folder (mode 0700) if needed, takes the lock and reads the keys left
    by an earlier run; it raises :class:`StartupError` when the file cannot be used or another
    process holds it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: set[str] = set()
        self._lock: IO[bytes] | None = None
        self._append: IO[str] | None = None

    def __enter__(self) -> Self:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = self.path.with_name(self.path.name + ".lock").open("ab")
        except OSError as exc:
            raise StartupError(f"spool {self.path} cannot be used: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise StartupError(
                f"spool {self.path} is in use by another `drainbus hook watch`; "
                "give each watcher its own --spool"
            ) from None
        try:
            text = self.path.read_text() if self.path.exists() else ""
            self._keys = {line.strip() for line in text.splitlines() if line.strip()}
            # Rewritten at once: a line cut short by a crash must not be glued to the next.
            self.replace(self._keys)
        except OSError as exc:
            self.__exit__(None, None, None)
            raise StartupError(f"spool {self.path} cannot be used: {exc.strerror}") from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._append is not None:
            self._append.close()
            self._append = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    @property
    def keys(self) -> frozenset[str]:
        """The keys in the spool."""
        return frozenset(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, keys: Iterable[str]) -> None:
        """Append the keys not already in the spool, durably (fsync) before returning.

        Raises OSError if the disk refuses; the keys are then still held in memory.
        """
        new = [key for key in dict.fromkeys(keys) if key not in self._keys]
        if not new:
            return
        self._keys.update(new)
        handle = self._open_append()
        handle.write("".join(f"{key}\n" for key in new))
        handle.flush()
        os.fsync(handle.fileno())

    def replace(self, keys: Iterable[str]) -> None:
        """Make the spool hold exactly ``keys`` (atomically: rename over the old file)."""
        wanted = sorted(set(keys))
        temporary = self.path.with_name(self.path.name + ".tmp")
        with temporary.open("w") as handle:
            handle.write("".join(f"{key}\n" for key in wanted))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        _fsync_folder(self.path.parent)
        if self._append is not None:  # it points at the replaced file
            self._append.close()
            self._append = None
        self._keys = set(wanted)

    def _open_append(self) -> IO[str]:
        if self._append is None:
            self._append = self.path.open("a")
        return self._append


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
