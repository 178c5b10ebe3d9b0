"""Noticing that some files of a folder changed, cheaply: one ``stat`` per file.

The users folder is polled this way (every ``server.users_reload_interval`` and on SIGHUP),
for key files (:mod:`drainbus.identity`) and API token files (:mod:`drainbus.http.tokens`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FolderWatch"]


class FolderWatch:
    """The names, modification times and sizes of the files ending in ``suffix`` in
    ``directory``, compared with those seen last."""

    def __init__(self, directory: Path, suffix: str) -> None:
        self.directory = directory
        self.suffix = suffix
        self._seen: tuple[tuple[str, int, int], ...] | None = None  # None: never looked

    def changed(self) -> bool:
        """True if a file was added, removed or changed since the last call (and on the
        first); the files as they are now become what the next call compares with."""
        current = self._scan()
        if current == self._seen:
            return False
        self._seen = current
        return True

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except FileNotFoundError:
            return ()
        signature = []
        for entry in entries:
            if entry.name.endswith(self.suffix) and entry.is_file():
                stat = entry.stat()
                signature.append((entry.name, stat.st_mtime_ns, stat.st_size))
        return tuple(signature)
