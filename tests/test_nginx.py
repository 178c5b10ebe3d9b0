"""The nginx target: key templates, cache-file heads, the inotify index, purges on real nginx."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pydantic
import pytest

from drainbus.drain.cache_file import parse_cache_head
from drainbus.drain.key_template import KeyParts, KeyTemplate
from drainbus.drain.nginx import (
    CacheIndex,
    NginxCache,
    NginxCacheConfig,
    cache_file_path,
    render_key,
)
from drainbus.drain.purges import Purge
from tests.nginx_env import (
    CACHE_KEY,
    CACHE_LEVELS,
    NginxEnv,
    Origin,
    nginx_env,
    origin,
    write_cache_file,
)

__all__ = ["nginx_env", "origin"]  # fixtures, imported for pytest

HOST_TEMPLATE = KeyTemplate("$scheme$host$request_uri")


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("levels", ["3", "1:2:2:1", "a", "", "1:"], ids=repr)
def test_config_rejects_levels_nginx_would_reject(levels: str) -> None:
    """levels must be 1-3 colon-separated numbers, each 1 or 2."""
    with pytest.raises(pydantic.ValidationError, match="levels"):
        NginxCacheConfig(cache_path=Path("/c"), levels=levels, key=CACHE_KEY)


def test_config_names_every_unsupported_variable() -> None:
    """An unknown key variable is rejected with its name in the message."""
    with pytest.raises(pydantic.ValidationError, match=r"\$cookie_x, \$http_host"):
        NginxCacheConfig(cache_path=Path("/c"), key="$scheme$http_host${cookie_x}$uri")


def test_config_requires_proxy_host_for_proxy_host_keys() -> None:
    """The default key uses $proxy_host, so proxy_host must be set."""
    with pytest.raises(pydantic.ValidationError, match="proxy_host"):
        NginxCacheConfig(cache_path=Path("/c"))
    config = NginxCacheConfig(cache_path=Path("/c"), proxy_host="origin:8080")
    assert config.key == "$scheme$proxy_host$request_uri"


def test_config_is_frozen_and_strict() -> None:
    """Unknown settings are errors and a loaded config cannot change."""
    with pytest.raises(pydantic.ValidationError, match="extra"):
        NginxCacheConfig(cache_path=Path("/c"), key=CACHE_KEY, keys_zone="z")  # type: ignore[call-arg]
    config = NginxCacheConfig(cache_path=Path("/c"), key=CACHE_KEY)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.levels = "2"  # type: ignore[misc]


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "url", "key"),
    [
        (CACHE_KEY, "https://Acme.Example:8443/a%20b?x=1", "httpsacme.example/a%20b?x=1"),
        (CACHE_KEY, "http://acme.example", "httpacme.example/"),
        ("$scheme$proxy_host$request_uri", "https://acme.example/p?q", "httpsorigin:8080/p?q"),
        ("${scheme}://${host}${uri}$is_args$args", "http://h/a%20b", "http://h/a b"),
        ("${scheme}://${host}${uri}$is_args$args", "http://h/a?x=1", "http://h/a?x=1"),
        ("$host$request_uri", "http://h/a?", "h/a?"),
    ],
    ids=["host", "root", "proxy-host", "uri-no-args", "uri-args", "empty-query"],
)
def test_render_key(template: str, url: str, key: str) -> None:
    """Keys render as nginx renders them for a request of the URL."""
    assert render_key(template, url, proxy_host="origin:8080") == key


@pytest.mark.parametrize(
    ("levels", "relative"),
    [
        ("1:2", "8/73/283ff0b6e8885ca7ff256185082e1738"),
        ("2", "38/283ff0b6e8885ca7ff256185082e1738"),
        ("2:2:1", "38/17/e/283ff0b6e8885ca7ff256185082e1738"),
    ],
    ids=["1:2", "2", "2:2:1"],
)
def test_cache_file_path_takes_levels_from_the_end_of_the_md5(levels: str, relative: str) -> None:
    """The file is the key's MD5 in folders cut from the hash's end (1:2 -> c/29/…029c)."""
    # md5("httpacme-blog.pages.example/") = 283ff0b6e8885ca7ff256185082e1738
    key = "httpacme-blog.pages.example/"
    assert cache_file_path(Path("/c"), levels, key) == Path("/c") / relative


@pytest.mark.parametrize(
    ("template", "key", "readings"),
    [
        (CACHE_KEY, "httpacme.example/a%20b?x=1", [("acme.example", "/a b", "x=1")]),
        (
            CACHE_KEY,
            "httpshop.example/x",
            [("hop.example", "/x", None), ("shop.example", "/x", None)],
        ),
        ("${scheme}://$host$uri$is_args$args", "http://h/a?x", [("h", "/a", "x")]),
        ("$scheme$proxy_host$request_uri", "httporigin:8080/p", [(None, "/p", None)]),
        (CACHE_KEY, "not a key", []),
    ],
    ids=["host", "scheme-ambiguity", "uri-args", "no-host", "no-match"],
)
def test_keys_are_read_back_through_the_template(
    template: str, key: str, readings: list[tuple[str | None, str, str | None]]
) -> None:
    """A key yields every host/path/query reading its template allows, or none."""
    found = KeyTemplate(template, "origin:8080").invert(key)
    assert sorted(found, key=str) == sorted((KeyParts(*r) for r in readings), key=str)


# --- cache file heads ---------------------------------------------------------------------


def test_tags_come_from_every_tag_header_in_any_case() -> None:
    """Cache-Tag, Surrogate-Key and xkey lines all add tags, split on commas and spaces."""
    data = (
        b"\x05\x00binary\n\x00\nKEY: httph/p\nHTTP/1.1 200 OK\r\n"
        b"Cache-Tag: a, b\r\nsurrogate-key: c d\r\nXKey: e,f  g\r\ncache-tag: h\r\n"
        b"X-Other: nope\r\n\r\nbody"
    )
    head = parse_cache_head(data)
    assert head is not None
    assert head.key == "httph/p"
    assert head.tags == ("a", "b", "c", "d", "e", "f", "g", "h")


@pytest.mark.parametrize(
    "data",
    [b"", b"\x05\x00" * 100, b"\x00\nKEY: httph/p", b"\x00\nKEY: httph/p\nHTTP/1.1 200 OK\r\nA: b"],
    ids=["empty", "binary-only", "key-cut", "headers-cut"],
)
def test_incomplete_heads_are_rejected(data: bytes) -> None:
    """A head without a complete KEY line and header block gives no entry."""
    assert parse_cache_head(data) is None


# --- the index ------------------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


@contextlib.asynccontextmanager
async def open_index(
    cache_dir: Path, template: KeyTemplate = HOST_TEMPLATE
) -> AsyncIterator[CacheIndex]:
    async with CacheIndex(cache_dir, template) as index:
        yield index


async def test_start_scan_indexes_existing_files(cache_dir: Path) -> None:
    """Files present at start are indexed with key, hosts, path and tags."""
    path = write_cache_file(cache_dir, "httpacme.example/docs?x=1", headers=["Cache-Tag: t1 t2"])
    async with open_index(cache_dir) as index:
        entry = index.get(path)
        assert entry is not None
        assert entry.key == "httpacme.example/docs?x=1"
        assert entry.tags == ("t1", "t2")
        assert entry.hosts == {"acme.example"}
        assert index.paths_for_tag("t1") == {str(path)}
        assert index.paths_for_host("ACME.example") == {str(path)}


@pytest.mark.parametrize("folders_exist", [True, False], ids=["old-folders", "new-folders"])
async def test_file_written_after_start_is_indexed(cache_dir: Path, folders_exist: bool) -> None:
    """A file renamed into place after start is indexed, also in folders made after start."""
    key = "httpacme.example/new"
    if folders_exist:
        cache_file_path(cache_dir, CACHE_LEVELS, key).parent.mkdir(parents=True)
    async with open_index(cache_dir) as index:
        assert len(index) == 0
        path = write_cache_file(cache_dir, key, headers=["xkey: fresh"])
        await index.sync()
        assert index.paths_for_tag("fresh") == {str(path)}


@pytest.mark.parametrize("folders_exist", [True, False], ids=["old-folders", "new-folders"])
async def test_listener_hears_of_files_put_in_place_not_of_rewrites(
    cache_dir: Path, folders_exist: bool
) -> None:
    """on_file_added gets each renamed-in file with its head; an in-place rewrite is silent."""
    key = "httpacme.example/heard"
    if folders_exist:
        cache_file_path(cache_dir, CACHE_LEVELS, key).parent.mkdir(parents=True)
    heard: list[tuple[str, str, str | None]] = []
    async with open_index(cache_dir) as index:
        index.on_file_added = lambda path, head: heard.append((path, head.key, head.validator))
        path = write_cache_file(cache_dir, key, headers=['ETag: "e1"'])
        await index.sync()
        assert heard == [(str(path), key, 'ETag: "e1"')]
        path.write_bytes(path.read_bytes())
        await index.sync()
        assert len(heard) == 1


async def test_rewritten_file_is_reindexed(cache_dir: Path) -> None:
    """A file rewritten in place (IN_CLOSE_WRITE) is indexed with its new tags."""
    path = write_cache_file(cache_dir, "httpacme.example/p", headers=["Cache-Tag: old"])
    async with open_index(cache_dir) as index:
        data = path.read_bytes().replace(b"Cache-Tag: old", b"Cache-Tag: new")
        path.write_bytes(data)
        await index.sync()
        assert index.paths_for_tag("old") == set()
        assert index.paths_for_tag("new") == {str(path)}


async def test_deleted_file_drops_out(cache_dir: Path) -> None:
    """A deleted cache file leaves the index and every inverted map."""
    path = write_cache_file(cache_dir, "httpacme.example/gone", headers=["Cache-Tag: t"])
    async with open_index(cache_dir) as index:
        path.unlink()
        await index.sync()
        assert path not in index
        assert index.paths_for_tag("t") == set()
        assert index.paths_for_host("acme.example") == set()


@pytest.mark.parametrize("after_start", [False, True], ids=["at-scan", "via-inotify"])
async def test_truncated_and_garbage_files_are_skipped(cache_dir: Path, after_start: bool) -> None:
    """Files without a complete head are neither indexed nor fatal, and are counted."""

    def write_bad() -> list[Path]:
        good = write_cache_file(cache_dir, "httpacme.example/a", headers=["Cache-Tag: t"])
        cut = cache_file_path(cache_dir, CACHE_LEVELS, "httpacme.example/cut")
        cut.parent.mkdir(parents=True, exist_ok=True)
        cut.write_bytes(good.read_bytes()[: good.read_bytes().index(b"\r\n\r\n")])
        garbage = cache_file_path(cache_dir, CACHE_LEVELS, "garbage")
        garbage.parent.mkdir(parents=True, exist_ok=True)
        garbage.write_bytes(bytes(range(256)) * 20)
        return [cut, garbage]

    bad = [] if after_start else write_bad()
    async with open_index(cache_dir) as index:
        if after_start:
            bad = write_bad()
            await index.sync()
        assert len(index) == 1
        assert not any(path in index for path in bad)
        assert index.skipped_invalid == 2


async def test_temp_files_are_ignored(cache_dir: Path) -> None:
    """nginx temp files (<md5>.<digits>) are not indexed, at start or later."""
    early = write_cache_file(cache_dir, "httph/early", temp_suffix=".0000000001")
    async with open_index(cache_dir) as index:
        late = write_cache_file(cache_dir, "httph/late", temp_suffix=".0000000002")
        await index.sync()
        assert len(index) == 0
        assert early not in index
        assert late not in index
        assert index.skipped_invalid == 0


@contextlib.contextmanager
def reading_as_nobody() -> Iterator[None]:
    """Make file permission checks of this thread apply, also when tests run as root."""
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    # setfsuid is per thread: only this thread's file access loses root's override.
    previous = libc.setfsuid(65534)
    try:
        yield
    finally:
        libc.setfsuid(previous)


@pytest.fixture
def shared_cache_dir() -> Iterator[Path]:
    """A cache folder any user may traverse (pytest's tmp folders are private to root)."""
    root = Path(tempfile.mkdtemp(prefix="drainbus-nginx-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


async def test_unreadable_file_is_skipped_and_counted(shared_cache_dir: Path) -> None:
    """A file the daemon may not read is skipped and counted; its readable peers are indexed."""
    async with open_index(shared_cache_dir) as index:
        readable = write_cache_file(shared_cache_dir, "httph/ok", headers=["Cache-Tag: t"])
        secret = write_cache_file(shared_cache_dir, "httph/secret", headers=["Cache-Tag: t"])
        for folder in {*readable.parents[:2], *secret.parents[:2]}:
            folder.chmod(0o755)  # whatever the umask: only the file itself is private
        readable.chmod(0o644)
        secret.chmod(0o000)
        with reading_as_nobody():
            await index.sync()
        assert index.paths_for_tag("t") == {str(readable)}
        assert index.skipped_unreadable == 1


async def test_host_agnostic_keys_match_every_host(cache_dir: Path) -> None:
    """With $proxy_host keys one object serves all hosts, so any host's purge covers it."""
    template = KeyTemplate("$scheme$proxy_host$request_uri", "origin:8080")
    docs = write_cache_file(cache_dir, "httporigin:8080/docs/a")
    other = write_cache_file(cache_dir, "httporigin:8080/docs2")
    async with open_index(cache_dir, template) as index:
        assert index.paths_for_host("any.example") == {str(docs), str(other)}
        assert index.paths_for_prefix("https://any.example/docs") == {str(docs)}
        assert index.paths_for_url("https://any.example/docs2") == {str(other)}


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_large_scan_indexes_every_file_and_closes_every_descriptor(cache_dir: Path) -> None:
    """A scan of many files (read ahead of parsing) indexes them all and skips the bad ones."""
    good = [
        write_cache_file(cache_dir, f"httpsacme.example/p/{n}", headers=[f"Cache-Tag: t{n % 7}"])
        for n in range(300)
    ]
    garbage = cache_file_path(cache_dir, CACHE_LEVELS, "garbage")
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(b"\x00" * 100)
    link = cache_file_path(cache_dir, CACHE_LEVELS, "link")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(good[0])
    before = open_descriptors()
    async with open_index(cache_dir) as index:
        assert len(index) == len(good)
        assert index.skipped_invalid == 2
        assert index.paths_for_tag("t3") == {str(p) for n, p in enumerate(good) if n % 7 == 3}
        entry = index.get(good[5])
        assert entry is not None
        assert entry.readings == (
            KeyParts("acme.example", "/p/5", None),
            KeyParts("sacme.example", "/p/5", None),
        )
    assert open_descriptors() == before


async def test_index_is_invisible_to_the_garbage_collector(cache_dir: Path) -> None:
    """Indexed files add no objects the garbage collector tracks, so collections stay quick."""
    files = 2000
    for n in range(files):
        # levels=1: 16 folders, so what the folders' watches take stays small.
        headers = [f"Cache-Tag: a, t{n}"]
        write_cache_file(cache_dir, f"httpacme.example/{n}", headers=headers, levels="1")
    gc.collect()
    before = len(gc.get_objects())
    async with open_index(cache_dir) as index:
        for _ in range(3):  # each collection stops tracking one more level of nested tuples
            gc.collect()
        tracked = len(gc.get_objects()) - before
        assert len(index) == files
    assert tracked < files / 10, tracked


# --- purges on real nginx -------------------------------------------------------------------

BLOG = "acme-blog.pages.example"
BLOG2 = "acme-blog2.pages.example"
OTHER = "other.pages.example"
PAGES = [
    (BLOG, "/"),
    (BLOG, "/posts/1"),
    (BLOG, "/acme-blog"),
    (BLOG, "/acme-blog/x"),
    (BLOG, "/acme-blog?page=2"),
    (BLOG, "/acme-blog2"),
    (BLOG2, "/"),
    (BLOG2, "/posts/1"),
    (OTHER, "/posts/1"),
]
ALL_BLOG = {page for page in PAGES if page[0] == BLOG}
ALL_BLOG2 = {page for page in PAGES if page[0] == BLOG2}


@pytest.fixture
def tagged_origin(origin: Origin) -> Origin:
    origin.path_tags["/posts/"] = ["posts"]
    return origin


def nginx_config(env: NginxEnv) -> NginxCacheConfig:
    return NginxCacheConfig(
        cache_path=env.cache_path, levels=CACHE_LEVELS, key=CACHE_KEY, name="test"
    )


@pytest.mark.parametrize(
    ("purge", "key_hosts", "purged"),
    [
        (Purge(urls=frozenset({f"http://{BLOG}/posts/1"})), (), {(BLOG, "/posts/1")}),
        (
            Purge(urls=frozenset({f"https://{BLOG}/acme-blog?page=2"})),
            (),
            {(BLOG, "/acme-blog?page=2")},
        ),
        (Purge(tags=frozenset({"acme-blog"})), (), ALL_BLOG),
        (Purge(tags=frozenset({"posts"}), soft=True), (), {p for p in PAGES if "posts" in p[1]}),
        (Purge(tags=frozenset({"acme"})), (), set()),
        (Purge(keys=frozenset({"acme-blog2"})), (), ALL_BLOG2),
        (Purge(keys=frozenset({"acme-blog"})), (BLOG,), ALL_BLOG),
        (Purge(), (BLOG2,), ALL_BLOG2),
        (Purge(hosts=frozenset({"ACME-BLOG2.pages.example"})), (), ALL_BLOG2),
        (
            Purge(prefixes=frozenset({f"https://{BLOG}/acme-blog"})),
            (),
            {(BLOG, "/acme-blog"), (BLOG, "/acme-blog/x"), (BLOG, "/acme-blog?page=2")},
        ),
        (Purge(prefixes=frozenset({f"http://{BLOG2}/"})), (), ALL_BLOG2),
        (Purge(everything=True), (), set(PAGES)),
    ],
    ids=[
        "url",
        "url-other-scheme-keeps-query",
        "tag-not-neighbour",
        "tag-across-hosts-soft",
        "tag-no-partial-match",
        "bare-key",
        "bare-key-and-host",
        "key-hosts-only",
        "host-any-case",
        "prefix-boundary",
        "prefix-root",
        "everything",
    ],
)
async def test_purge_evicts_exactly_the_named_objects(
    tagged_origin: Origin,
    nginx_env: NginxEnv,
    purge: Purge,
    key_hosts: tuple[str, ...],
    purged: set[tuple[str, str]],
) -> None:
    """After a purge nginx misses exactly the purged pages and still hits every other one."""
    async with NginxCache(nginx_config(nginx_env)) as cache:
        for host, path in PAGES:
            assert nginx_env.get(path, host).cache == "MISS"
            assert nginx_env.prime(path, host).cache == "HIT"
        # No await since priming: the purge itself must pick up nginx's fresh files.
        assert await cache.purge(purge, key_hosts=key_hosts) == len(purged)
    statuses = {(host, path): nginx_env.get(path, host).cache for host, path in PAGES}
    assert {page for page, status in statuses.items() if status == "MISS"} == purged
    assert {page for page, status in statuses.items() if status == "HIT"} == set(PAGES) - purged


async def test_key_and_path_match_what_nginx_wrote(nginx_env: NginxEnv) -> None:
    """The rendered key and its md5 path are exactly the file nginx wrote for the URL."""
    nginx_env.prime("/docs/a%20b?x=1&y=2", BLOG)
    config = nginx_config(nginx_env)
    key = render_key(config.key, f"http://{BLOG}/docs/a%20b?x=1&y=2")
    path = cache_file_path(config.cache_path, config.levels, key)
    assert [p for p in config.cache_path.rglob("*") if p.is_file()] == [path]
    async with NginxCache(config) as cache:
        entry = cache.index.get(path)
        assert entry is not None
        assert entry.key == key == f"http{BLOG}/docs/a%20b?x=1&y=2"
        assert entry.tags == ("acme-blog",)


async def test_purge_is_idempotent(nginx_env: NginxEnv) -> None:
    """Purging again, or purging what is not cached, succeeds and removes nothing."""
    nginx_env.prime("/", BLOG)
    purge = Purge(urls=frozenset({f"http://{BLOG}/", f"http://{BLOG}/never-cached"}))
    async with NginxCache(nginx_config(nginx_env)) as cache:
        assert await cache.purge(purge) == 1
        assert await cache.purge(purge) == 0
    assert nginx_env.get("/", BLOG).cache == "MISS"


async def test_flush_all_walks_the_tree_not_the_index(nginx_env: NginxEnv) -> None:
    """flush_all deletes unindexed cache files too, but leaves nginx temp files alone."""
    nginx_env.prime("/", BLOG)
    async with NginxCache(nginx_config(nginx_env)) as cache:
        garbage = cache_file_path(nginx_env.cache_path, CACHE_LEVELS, "garbage")
        garbage.parent.mkdir(parents=True, exist_ok=True)
        garbage.write_bytes(b"not a cache file")
        temp = write_cache_file(nginx_env.cache_path, "httph/t", temp_suffix=".0000000009")
        assert await cache.flush_all() == 2
        assert not garbage.exists()
        assert temp.exists()
        await cache.index.sync()
        assert len(cache.index) == 0
    assert nginx_env.get("/", BLOG).cache == "MISS"


async def test_missing_cache_folder_is_a_config_error(tmp_path: Path) -> None:
    """Starting on a folder that does not exist fails with a message naming it."""
    from drainbus.errors import ConfigError

    config = NginxCacheConfig(cache_path=tmp_path / "nope", key=CACHE_KEY)
    with pytest.raises(ConfigError, match="nope"):
        async with NginxCache(config):
            pass
