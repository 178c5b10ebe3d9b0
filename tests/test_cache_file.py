"""nginx cache files in-process: names, the tree walk, the head and the binary header.

tests/test_nginx.py reads files a real nginx wrote; these build files byte by byte, so each
rule (which header lines give tags, when a head is complete, how far the header is trusted)
is checked at its edge, fast enough for scripts/mutate.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from drainbus.drain.cache_file import (
    HEAD_FIRST_READ,
    NGINX_CACHE_VERSION,
    CacheHead,
    CacheHeader,
    UnknownCacheVersion,
    cache_file_path,
    cache_files,
    expire_cache_file,
    is_cache_file_name,
    parse_cache_head,
    parse_cache_header,
    parse_levels,
    read_cache_head,
    read_cache_header,
)

NAME = "0123456789abcdef0123456789abcdef"
HEADER = struct.Struct("=Q5q")  # version, valid_sec, updating_sec, error_sec, ...


def head(key: str, *lines: str, end: bytes = b"\r\n", binary_tail: bytes = b"") -> bytes:
    """A cache file's start: a version-5 binary header (its fields, then ``binary_tail``),
    the key line, the response head; text is UTF-8 with lone surrogates as raw bytes."""
    text = "".join(f"{line}\r\n" for line in ("HTTP/1.1 200 OK", *lines))
    binary = HEADER.pack(NGINX_CACHE_VERSION, 2_000, 1, 2, 3, 1_000) + binary_tail
    return binary + f"\nKEY: {key}\n{text}".encode("utf-8", "surrogateescape") + end


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(("levels", "parsed"), [("1", (1,)), ("2:1", (2, 1)), ("1:2:2", (1, 2, 2))])
def test_levels_parse(levels: str, parsed: tuple[int, ...]) -> None:
    """One to three levels of one or two characters, as nginx takes them."""
    assert parse_levels(levels) == parsed


@pytest.mark.parametrize("levels", ["", "3", "1:2:2:1", "1:", "01"])
def test_other_levels_are_refused_with_the_rule(levels: str) -> None:
    """Anything else is refused whole, naming the rule and an example."""
    message = (
        f"levels {levels!r} is invalid: use 1 to 3 colon-separated numbers, each 1 or 2, "
        "as in nginx's proxy_cache_path (e.g. '1:2')"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_levels(levels)


@pytest.mark.parametrize(
    ("name", "is_cache_file"),
    [
        (NAME, True),
        (NAME[:-1], False),
        (NAME + "0", False),
        (NAME.upper(), False),
        (NAME[:-1] + "g", False),
        (NAME + ".0000000001", False),
    ],
    ids=["md5", "short", "long", "upper-case", "not-hex", "temp-file"],
)
def test_cache_file_names_are_32_lower_case_hex_digits(name: str, is_cache_file: bool) -> None:
    """nginx names a finished file by the key's MD5; temp files carry a suffix."""
    assert is_cache_file_name(name) is is_cache_file


def test_the_walk_finds_cache_files_at_every_depth_and_nothing_else(tmp_path: Path) -> None:
    """Every cache file below the root, however deep; temp files, other names and symlinked
    folders are passed by."""
    files = {write(tmp_path / NAME, b"x"), write(tmp_path / "f" / "0e" / NAME, b"x")}
    write(tmp_path / "f" / (NAME + ".0000000001"), b"x")
    write(tmp_path / "f" / "notes.txt", b"x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    write(outside / NAME, b"x")
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    assert set(cache_files(tmp_path)) == files


def vanish_first_folder(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[str]:
    """Make the first folder below ``root`` listed vanish, as when nginx's cache manager
    removes it between its parent's listing and its own; returns [that folder] once gone."""
    scandir, removed = os.scandir, list[str]()

    def racing_scandir(path: str) -> Iterator[os.DirEntry[str]]:
        if path != str(root) and not removed:
            removed.append(path)
            raise FileNotFoundError(path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", racing_scandir)
    return removed


def test_a_folder_removed_during_the_walk_is_passed_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx's cache manager may remove a folder between its listing and its walk: the walk
    goes on with the other folders."""
    kept = {write(tmp_path / "a" / NAME, b"x"), write(tmp_path / "b" / NAME, b"x")}
    removed = vanish_first_folder(monkeypatch, tmp_path)
    found = set(cache_files(tmp_path))
    assert len(removed) == 1
    assert found == kept - {str(Path(removed[0]) / NAME)}
    assert len(found) == 1


def test_the_walk_of_a_missing_root_or_a_file_finds_nothing(tmp_path: Path) -> None:
    """A cache folder nginx has not made yet (or a file in its place) holds no files."""
    assert cache_files(tmp_path / "missing") == []
    assert cache_files(Path(write(tmp_path / "file", b"x"))) == []


def test_the_head_gives_key_tags_and_etag() -> None:
    """Tags come from every tag header in any case, split on commas and spaces; ETag wins."""
    data = head(
        "httpsh.example/x",
        "Cache-Tag: a,b  c",
        "surrogate-key: d",
        "XKEY: e , f",
        "Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT",
        'ETag: "v1"',
        "X-Other: g",
    )
    assert parse_cache_head(data) == CacheHead(
        "httpsh.example/x", ("a", "b", "c", "d", "e", "f"), 'ETag: "v1"'
    )


@pytest.mark.parametrize(
    ("lines", "validator"),
    [
        (("Last-Modified:  Mon, 01 Jan 2024 ",), "Last-Modified: Mon, 01 Jan 2024"),
        (("ETag:", "Last-Modified: x"), "Last-Modified: x"),
        ((), None),
        (("no colon here",), None),
    ],
    ids=["last-modified", "empty-etag", "none", "line-without-colon"],
)  # fmt: skip
def test_the_validator_is_last_modified_without_an_etag(
    lines: tuple[str, ...], validator: str | None
) -> None:
    """Without an ETag the validator is Last-Modified, named so it never equals an ETag."""
    parsed = parse_cache_head(head("k", *lines))
    assert parsed is not None
    assert parsed.validator == validator
    assert parsed.tags == ()


def test_text_that_is_not_utf8_is_kept_in_keys_and_replaced_in_headers() -> None:
    """A key's raw bytes survive (as lone surrogates, hashed back to the same bytes); a tag
    or validator with bytes that are not UTF-8 is read with U+FFFD in their place."""
    lines = ("Cache-Tag: t\udcff", 'ETag: "\udcfe"')
    assert parse_cache_head(head("k\udcff", *lines)) == CacheHead(
        "k\udcff", ("t\ufffd",), 'ETag: "\ufffd"'
    )
    modified = parse_cache_head(head("k", "Last-Modified: \udcfd"))
    assert modified is not None
    assert modified.validator == "Last-Modified: \ufffd"
    digest = hashlib.md5(b"k\xff", usedforsecurity=False).hexdigest()
    assert cache_file_path(Path("/c"), (1, 2), "k\udcff") == Path(
        f"/c/{digest[-1]}/{digest[-3:-1]}/{digest}"
    )


def test_the_head_is_found_after_a_binary_header_of_any_bytes() -> None:
    """The binary header may hold CR LF CR LF, and the body a KEY line or what looks like
    headers: none of it counts, the head ends at its first blank line."""
    body = b"Cache-Tag: body\r\n\r\n\nKEY: body\n\r\n\r\n"
    data = head("k", "Cache-Tag: t", binary_tail=b"\r\n\r\n") + body
    assert parse_cache_head(data) == CacheHead("k", ("t",), None)


def test_an_empty_key_is_read_as_empty() -> None:
    """'KEY: ' followed at once by the newline is the empty key, not the status line."""
    assert parse_cache_head(head("", "Cache-Tag: t")) == CacheHead("", ("t",), None)


@pytest.mark.parametrize(
    "data",
    [
        head("k", "Cache-Tag: a", end=b""),  # the blank line is not written yet
        b"\x05" + b"\x00" * 47 + b"\nKEY: k",  # the key line is not finished
        b"\x05" + b"\x00" * 47 + b"KEY: k\n\r\n\r\n",  # no key line
    ],
    ids=["no-blank-line", "key-unfinished", "no-key"],
)
def test_an_unfinished_head_is_none(data: bytes) -> None:
    """A head nginx is still writing (or no head at all) is not read."""
    assert parse_cache_head(data) is None


def test_a_long_head_is_read_to_16_kib_and_cut_at_its_last_whole_line(tmp_path: Path) -> None:
    """Headers past the first read are read, up to 16 KiB; a line cut there is left out."""
    filler = [f"X-Filler-{n}: {'f' * 100}" for n in range(150)]  # ~17 KiB of header lines
    data = head("k", "Cache-Tag: first", *filler, "Cache-Tag: last", end=b"")
    assert len(data) > 16384
    path = write(tmp_path / NAME, data)
    parsed = read_cache_head(path)
    assert parsed is not None
    assert parsed.tags == ("first",)  # 'last' lies beyond 16 KiB
    # The last whole line before the cut at 16 KiB is kept, the cut one left out.
    edge = head("k", *filler[:130], end=b"")
    edge += b"Cache-Tag: edge\r\n"
    edge += b"X-Pad: " + b"p" * (16384 - len(edge)) + b"\r\n\r\n"
    edged = read_cache_head(write(tmp_path / "edge" / NAME, edge))
    assert edged is not None
    assert edged.tags == ("edge",)
    unfinished = head("k", *filler[:130], end=b"")  # past the first read, short of 16 KiB
    assert HEAD_FIRST_READ < len(unfinished) < 16384
    assert read_cache_head(write(tmp_path / "short" / NAME, unfinished)) is None


def test_a_head_within_the_first_read_is_read_whole(tmp_path: Path) -> None:
    """A file whose head ends in the first read is parsed from it, body and all ignored."""
    path = write(tmp_path / NAME, head("k", "Cache-Tag: t") + b"body" * 5000)
    assert read_cache_head(path) == CacheHead("k", ("t",), None)


def test_the_binary_header_is_read_field_by_field(tmp_path: Path) -> None:
    """The header's leading fields come back as written; too short a file gives None."""
    data = head("k")
    assert parse_cache_header(data) == CacheHeader(NGINX_CACHE_VERSION, 2_000, 1, 2, 3, 1_000)
    assert parse_cache_header(data[: HEADER.size]) == parse_cache_header(data)
    assert parse_cache_header(data[: HEADER.size - 1]) is None
    assert read_cache_header(write(tmp_path / NAME, data)) == parse_cache_header(data)


def test_expiring_moves_valid_sec_to_just_before_now(tmp_path: Path) -> None:
    """A fresh object becomes stale as of one second ago; nothing else in the file changes."""
    path = write(tmp_path / NAME, head("k") + b"body")
    before = Path(path).read_bytes()
    assert expire_cache_file(path, now=1_500.9) is True
    after = Path(path).read_bytes()
    assert parse_cache_header(after) == CacheHeader(NGINX_CACHE_VERSION, 1_499, 1, 2, 3, 1_000)
    assert after[16:] == before[16:]
    assert after[:8] == before[:8]


def test_expiring_what_is_already_stale_is_no_change(tmp_path: Path) -> None:
    """valid_sec at or before now - 1 is stale already: False, and the file is untouched."""
    path = write(tmp_path / NAME, head("k"))
    before = Path(path).read_bytes()
    assert expire_cache_file(path, now=2_001) is False  # valid_sec 2000 == now - 1
    assert Path(path).read_bytes() == before
    assert expire_cache_file(path, now=2_000) is True  # 2000 > 1999: still fresh


def test_expiring_the_clock_default(tmp_path: Path) -> None:
    """Without ``now``, the clock decides: a header fresh until the far future is expired."""
    path = write(tmp_path / NAME, HEADER.pack(NGINX_CACHE_VERSION, 2**40, 0, 0, 0, 0))
    assert expire_cache_file(path) is True
    header = read_cache_header(path)
    assert header is not None
    assert 1_700_000_000 < header.valid_sec < 2**40


@pytest.mark.parametrize("size", [0, 15])
def test_a_file_too_short_to_expire_is_left_alone(tmp_path: Path, size: int) -> None:
    """Fewer than the 16 bytes of version and valid_sec: nothing to expire, nothing written."""
    data = HEADER.pack(NGINX_CACHE_VERSION, 2**40, 0, 0, 0, 0)[:size]
    path = write(tmp_path / NAME, data)
    assert expire_cache_file(path, now=1_000) is False
    assert Path(path).read_bytes() == data


def test_a_missing_file_is_not_expired(tmp_path: Path) -> None:
    """A file nginx removed meanwhile has nothing to expire."""
    assert expire_cache_file(str(tmp_path / NAME), now=1_000) is False


def test_an_unknown_header_version_is_named_and_left_untouched(tmp_path: Path) -> None:
    """Another version's fields may lie elsewhere: refuse, say which, write nothing."""
    data = HEADER.pack(4, 2**40, 0, 0, 0, 0)
    path = write(tmp_path / NAME, data)
    with pytest.raises(UnknownCacheVersion) as caught:
        expire_cache_file(path, now=1_000)
    assert str(caught.value) == (
        f"cache file {path!r} has header version 4; drainbus knows only version 5 (nginx "
        "1.11.10 and later, 64-bit), so it left the file alone"
    )
    assert (caught.value.path, caught.value.version) == (path, 4)
    assert Path(path).read_bytes() == data


def test_expiring_never_follows_a_symlink(tmp_path: Path) -> None:
    """A symlink in the cache is not nginx's: opening it fails rather than write elsewhere."""
    target = write(tmp_path / "elsewhere", HEADER.pack(NGINX_CACHE_VERSION, 2**40, 0, 0, 0, 0))
    link = tmp_path / NAME
    link.symlink_to(target)
    with pytest.raises(OSError, match="symbolic links") as caught:
        expire_cache_file(str(link), now=1_000)
    assert caught.value.errno == errno.ELOOP
    assert read_cache_header(target) == CacheHeader(NGINX_CACHE_VERSION, 2**40, 0, 0, 0, 0)
