"""nginx cache files: where nginx puts one, and what its head says.

nginx stores each cached response in a file named by the MD5 of its cache key, in folders
taken from the end of the hash (``levels=1:2`` -> ``c/29/b7f5…029c``). A file starts with a
binary header whose size depends on the nginx version, then ``\\nKEY: <key>\\n``, then the
upstream status line and response headers up to a blank line, then the body.

The binary header is nginx's ``ngx_http_file_cache_header_t``. Its first fields, on 64-bit
Linux and for header version 5 (``NGX_HTTP_CACHE_VERSION`` from nginx 1.11.10 through at
least 1.31), are::

    offset  0  ngx_uint_t version       8 bytes
    offset  8  time_t     valid_sec     fresh until (Unix seconds)
    offset 16  time_t     updating_sec  stale-while-revalidate window
    offset 24  time_t     error_sec     stale-if-error window
    offset 32  time_t     last_modified
    offset 40  time_t     date
    offset 48  uint32_t   crc32         of the key; then etag, vary, ...

nginx reads ``valid_sec`` from the file each time it opens it, so :func:`expire_cache_file`
rewriting it to the past makes the next request see the object as stale (a soft purge).
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "NGINX_CACHE_VERSION",
    "CacheHead",
    "CacheHeader",
    "UnknownCacheVersion",
    "cache_file_name",
    "cache_file_path",
    "cache_files",
    "expire_cache_file",
    "is_cache_file_name",
    "iter_cache_files",
    "open_cache_file",
    "parse_cache_head",
    "parse_cache_header",
    "parse_levels",
    "read_cache_head",
    "read_cache_header",
    "read_head",
]

_HEX = frozenset("0123456789abcdef")
HEAD_FIRST_READ = 4096
"""Bytes read first from a cache file: its head, in all but unusual cases."""
_HEAD_MAX = 16384
_TAG_HEADERS = frozenset({b"cache-tag", b"surrogate-key", b"xkey"})


def parse_levels(levels: str) -> tuple[int, ...]:
    """``"1:2"`` -> ``(1, 2)``; raises ``ValueError`` unless 1-3 levels of 1 or 2 characters."""
    parts = levels.split(":")
    if not 1 <= len(parts) <= 3 or any(part not in {"1", "2"} for part in parts):
        raise ValueError(
            f"levels {levels!r} is invalid: use 1 to 3 colon-separated numbers, each 1 or 2, "
            "as in nginx's proxy_cache_path (e.g. '1:2')"
        )
    return tuple(int(part) for part in parts)


def cache_file_path(root: Path, levels: Iterable[int], key: str) -> Path:
    """Where nginx stores the object for ``key``: folders from the end of its MD5."""
    return Path(cache_file_name(str(root), levels, key))


def cache_file_name(root: str, levels: Iterable[int], key: str) -> str:
    """:func:`cache_file_path` as a string, for the drain's hot path (no Path objects)."""
    # Codec names match in any case. usedforsecurity matters only where FIPS forbids MD5
    # (here it names files and secures nothing): no test machine can show it.
    digest = hashlib.md5(key.encode("utf-8", "surrogateescape"), usedforsecurity=False)
    name = digest.hexdigest()
    parts, end = [root], len(name)
    for width in levels:
        parts.append(name[end - width : end])
        end -= width
    parts.append(name)
    return "/".join(parts)


def is_cache_file_name(name: str) -> bool:
    """True for nginx cache file names (32 hex digits); temp files carry a ``.N`` suffix."""
    return len(name) == 32 and _HEX.issuperset(name)


def cache_files(root: Path) -> list[str]:
    """The path of every cache file under ``root`` (none if it is missing)."""
    return list(iter_cache_files(root))


def iter_cache_files(root: Path) -> Iterator[str]:
    """:func:`cache_files` one at a time, so a caller that needs a few stops the walk early."""
    stack = [str(root)]
    while stack:
        try:
            listing = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with listing:
            for item in listing:
                if item.is_dir(follow_symlinks=False):  # (None is as false)
                    stack.append(item.path)
                elif is_cache_file_name(item.name):
                    yield item.path


class CacheHead(NamedTuple):
    """The parts of a cache file's head drainbus needs: its key, its tags, its validator.

    ``validator`` tells two copies of one object apart: ``"ETag: <value>"`` when the
    response carried an ``ETag``, else ``"Last-Modified: <value>"``, else None. The header
    name is kept so an ETag never equals a date.
    """

    key: str
    tags: tuple[str, ...]
    validator: str | None = None


def parse_cache_head(data: bytes) -> CacheHead | None:
    """Key, tags and validator from a cache file's first bytes, or None if not all there.

    Tags come from every ``Cache-Tag``, ``Surrogate-Key`` and ``xkey`` header line (names
    case-insensitive), split on commas and white space; the validator from ``ETag`` or
    ``Last-Modified`` (see :class:`CacheHead`). ``data`` shorter than 16 KiB must
    hold the whole header block; at 16 KiB the complete lines read so far are used.
    """
    # The boundary mutants below cannot matter: the binary header comes first, so the KEY
    # line never starts at 0, and key_end and head_end lie past it. A cut 1 off at the line
    # after the key falls in the status line, never a header; codec names match in any case.
    start = data.find(b"\nKEY: ")
    if start < 0:
        return None
    key_end = data.find(b"\n", start + 6)
    if key_end < 0:
        return None
    key = data[start + 6 : key_end].decode("utf-8", "surrogateescape")
    head_end = data.find(b"\r\n\r\n", key_end)
    if head_end >= 0:
        lines = data[key_end + 1 : head_end].split(b"\r\n")
    elif len(data) >= _HEAD_MAX:
        lines = data[key_end + 1 :].split(b"\r\n")[:-1]
    else:
        return None  # truncated or still being written
    tags: set[str] = set()
    etag: bytes | None = None  # (only their truth is read: "" would do)
    last_modified: bytes | None = None
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.strip().lower()
        if name in _TAG_HEADERS:
            tags.update(value.decode("utf-8", "replace").replace(",", " ").split())
        elif name == b"etag":
            etag = value.strip()
        elif name == b"last-modified":
            last_modified = value.strip()
    validator = None
    if etag:
        validator = "ETag: " + etag.decode("utf-8", "replace")
    elif last_modified:
        validator = "Last-Modified: " + last_modified.decode("utf-8", "replace")
    # Interned: thousands of files carry the same few tags, and the index keeps them all.
    return CacheHead(key, tuple(sorted(map(sys.intern, tags))), validator)


def open_cache_file(path: str) -> int:
    """Open a cache file for reading, never following a symlink; raises ``OSError``."""
    # O_CLOEXEC says what Python does anyway (PEP 446): without it the fd is the same.
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)


def read_head(fd: int) -> bytes:
    """Enough of the open file at ``fd`` for its head; closes ``fd``."""
    try:
        data = os.read(fd, HEAD_FIRST_READ)
        # Reading more than needed changes nothing parsed (only bytes after the head, or
        # none at the end of the file): 'or', or a test that always passes, read the same.
        if len(data) == HEAD_FIRST_READ and b"\r\n\r\n" not in data:
            data += os.read(fd, _HEAD_MAX - HEAD_FIRST_READ)
    finally:
        os.close(fd)
    return data


def read_cache_head(path: str) -> CacheHead | None:
    """Read and parse the head of the cache file at ``path``; raises ``OSError`` as open does."""
    return parse_cache_head(read_head(open_cache_file(path)))


NGINX_CACHE_VERSION = 5
"""The only cache-file header version drainbus reads or writes (nginx's
``NGX_HTTP_CACHE_VERSION``; 5 from nginx 1.11.10 through at least 1.31)."""

# version (ngx_uint_t), then valid_sec, updating_sec, error_sec, last_modified, date
# (time_t), in the byte order of the machine nginx runs on: this one.
_HEADER = struct.Struct("=Q5q")
_VERSION = struct.Struct("=Q")
_VALID_SEC = struct.Struct("=q")
_VALID_SEC_OFFSET = _VERSION.size


class CacheHeader(NamedTuple):
    """The leading fields of a cache file's binary header; times are Unix seconds."""

    version: int
    valid_sec: int
    updating_sec: int
    error_sec: int
    last_modified: int
    date: int


class UnknownCacheVersion(ValueError):
    """A cache file's header has a version drainbus does not know; it was left untouched."""

    def __init__(self, path: str, version: int) -> None:
        super().__init__(
            f"cache file {path!r} has header version {version}; drainbus knows only version "
            f"{NGINX_CACHE_VERSION} (nginx 1.11.10 and later, 64-bit), so it left the file alone"
        )
        self.path = path
        self.version = version


def parse_cache_header(data: bytes) -> CacheHeader | None:
    """The header fields at the start of ``data``, or None if it is too short to hold them.

    Any version is returned as read: check ``version`` before trusting the other fields.
    """
    if len(data) < _HEADER.size:
        return None
    return CacheHeader(*_HEADER.unpack_from(data))


def read_cache_header(path: str) -> CacheHeader | None:
    """Read the header fields of the cache file at ``path``; raises ``OSError`` as open does."""
    fd = open_cache_file(path)
    try:
        return parse_cache_header(os.pread(fd, _HEADER.size, 0))
    finally:
        os.close(fd)


def expire_cache_file(path: str, *, now: float | None = None) -> bool:
    """Mark the cache file at ``path`` stale in place: ``valid_sec`` becomes at most ``now - 1``.

    The file keeps its inode, size and everything else, so nginx serves it as STALE (or
    revalidates it) on the next request. Returns True if this call expired the object, False
    if it was already stale or the file is gone or too short to be a cache file (nothing to
    expire). ``now`` is Unix seconds (default: the clock). Raises :class:`UnknownCacheVersion`
    without writing when the header version is not :data:`NGINX_CACHE_VERSION`, and
    ``OSError`` when the file cannot be opened or written. Never follows a symlink.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        data = os.pread(fd, _VALID_SEC_OFFSET + _VALID_SEC.size, 0)
        if len(data) < _VALID_SEC_OFFSET + _VALID_SEC.size:
            return False  # nginx is not done writing it, or it is not a cache file
        (version,) = _VERSION.unpack_from(data)
        if version != NGINX_CACHE_VERSION:
            raise UnknownCacheVersion(path, version)
        (valid_sec,) = _VALID_SEC.unpack_from(data, _VALID_SEC_OFFSET)
        stale = int(time.time() if now is None else now) - 1
        if valid_sec <= stale:
            return False
        os.pwrite(fd, _VALID_SEC.pack(stale), _VALID_SEC_OFFSET)
    finally:
        os.close(fd)
    return True
