"""Does the configured key template read the keys nginx really wrote?

A template that cannot read the cache's keys makes host, prefix and tag-by-host purges
match nothing, silently. So the nginx target checks a sample of the cache's ``KEY:`` lines
at start (and ``drainbus check-config`` does too) and refuses a template that cannot read
most of them, in one line that shows a key it could not read and a setting that reads them.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Generator, Sequence
from pathlib import Path

from drainbus.drain.cache_file import iter_cache_files, read_cache_head
from drainbus.drain.key_template import KeyTemplate
from drainbus.errors import ConfigError

__all__ = ["SAMPLE_SIZE", "check_keys", "sample_keys", "suggest_setting"]

#: How many cache keys the check reads.
SAMPLE_SIZE = 200

# Common proxy_cache_key settings, tried in order after nginx's default key.
_CANDIDATES = ("$scheme://$host$request_uri", "$scheme$host$request_uri", "$host$request_uri")
_UPSTREAM = re.compile(r"(https?)://([^/\s]+)/")


def sample_keys(root: Path, limit: int = SAMPLE_SIZE) -> list[str]:
    """The keys of up to ``limit`` cache files under ``root``, in walk order.

    Files that cannot be read or hold no complete head are passed over; a folder that cannot
    be listed ends the sample there.
    """
    with contextlib.closing(_keys(root)) as keys:
        return list(itertools.islice(keys, limit))


def _keys(root: Path) -> Generator[str, None, None]:
    files = iter_cache_files(root)
    while True:
        try:
            path = next(files)
        except (StopIteration, OSError):
            return
        try:
            head = read_cache_head(path)
        except OSError:
            continue
        if head is not None:
            yield head.key


def check_keys(template: KeyTemplate, keys: Sequence[str], *, cache: str) -> None:
    """Raise :class:`ConfigError` when ``template`` cannot read most of ``keys``.

    An empty sample passes. The message is one line: the template, one key it could not
    read (as its ``KEY:`` line) and a setting that reads the sample, when one is found.
    """
    unread = [key for key in keys if not template.readings(key)]
    if len(unread) * 2 <= len(keys):
        return
    example = unread[0]
    raise ConfigError(
        f"nginx cache {cache!r}: {template.description} cannot read {len(unread)} of "
        f"{len(keys)} sampled cache keys, e.g. 'KEY: {_printable(example)}'; "
        f"{suggest_setting(example, keys)}"
    )


def suggest_setting(example: str, keys: Sequence[str]) -> str:
    """What to configure so that ``example`` and as many of ``keys`` as possible are read.

    Tries nginx's default key (with the upstream seen in ``example``), then common
    ``proxy_cache_key`` templates; the first that reads the most of ``keys`` wins.
    """
    candidates: list[tuple[KeyTemplate, str]] = []
    upstream = _UPSTREAM.match(example)
    if upstream is not None:
        proxy_pass = f"{upstream[1]}://{upstream[2]}"
        with contextlib.suppress(ValueError):  # not a host[:port] nginx would write
            candidates.append(
                (
                    KeyTemplate.nginx_default(proxy_pass),
                    f'leave key unset (nginx\'s default key) and set proxy_pass = "{proxy_pass}"',
                )
            )
    for text in _CANDIDATES:
        candidates.append((KeyTemplate(text), f'set key = "{text}"'))
    best, best_read = None, 0
    for template, setting in candidates:
        if not template.readings(example):
            continue
        read = sum(1 for key in keys if template.readings(key))
        if read > best_read:
            best, best_read = setting, read
    if best is None:
        return "set key to the proxy_cache_key in nginx's config (and proxy_pass to its URL)"
    return f"{best}, which reads {best_read} of {len(keys)}"


def _printable(key: str) -> str:
    # A key is one line, but it is the cache's text: keep terminals and log parsers safe.
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode() for char in key
    )
