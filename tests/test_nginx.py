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
import structlog.testing

import drainbus.drain.nginx as nginx_module
from drainbus.drain.cache_file import (
    NGINX_CACHE_VERSION,
    expire_cache_file,
    parse_cache_head,
    read_cache_header,
)
from drainbus.drain.key_template import KeyParts, KeyTemplate
from drainbus.drain.nginx import (
    CacheEvictionFailed,
    CacheIndex,
    NginxCache,
    NginxCacheConfig,
    cache_file_path,
    render_key,
)
from drainbus.drain.purges import Purge, parse_purge
from drainbus.drain.scope import ScopeRule
from drainbus.drain.targets import NginxTarget
from drainbus.errors import ConfigError, DataError, ExitCode
from tests.nginx_env import (
    CACHE_KEY,
    CACHE_LEVELS,
    SOFT_PURGE_DIRECTIVES,
    NginxEnv,
    Origin,
    OriginRequest,
    cache_file_written,
    nginx_directives,
    nginx_env,
    origin,
    run_nginx_env,
    write_cache_file,
)

__all__ = ["nginx_directives", "nginx_env", "origin"]  # fixtures, imported for pytest

HOST_KEY = "$scheme$host$request_uri"


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("levels", ["3", "1:2:2:1", "a", "", "1:"], ids=repr)
def test_config_rejects_levels_nginx_would_reject(levels: str) -> None:
    """levels must be 1-3 colon-separated numbers, each 1 or 2."""
    with pytest.raises(pydantic.ValidationError, match="levels"):
        NginxCacheConfig(cache_path=Path("/c"), levels=levels, key=CACHE_KEY)


def test_config_names_every_unsupported_variable() -> None:
    """An unknown key variable is rejected with its name in the message."""
    with pytest.raises(pydantic.ValidationError, match=r"\$remote_addr, \$server_name"):
        NginxCacheConfig(cache_path=Path("/c"), key="$scheme$server_name${remote_addr}$uri")


@pytest.mark.parametrize(
    "key",
    [
        "$scheme$http_host${cookie_x}$uri",
        "$scheme://$host$request_uri|$http_accept_encoding|$cookie_lang",
        "$host$uri$arg_v",
    ],
    ids=["header-and-cookie", "separated", "argument"],
)
def test_config_accepts_request_headers_cookies_and_arguments(key: str) -> None:
    """$http_*, $cookie_* and $arg_* are accepted; such a key is read back, never rendered."""
    template = NginxCacheConfig(cache_path=Path("/c"), key=key).key_template()
    assert not template.renders
    with pytest.raises(ValueError, match="request variables"):
        template.render("https://a.example/p")


def test_config_requires_proxy_host_for_proxy_host_keys() -> None:
    """A key that uses $proxy_host needs proxy_host (or proxy_pass) to render it."""
    key = "$scheme$proxy_host$request_uri"
    with pytest.raises(pydantic.ValidationError, match="proxy_host"):
        NginxCacheConfig(cache_path=Path("/c"), key=key)
    config = NginxCacheConfig(cache_path=Path("/c"), key=key, proxy_host="origin:8080")
    assert config.key_template().render("https://a.example/p") == "httpsorigin:8080/p"
    passed = NginxCacheConfig(cache_path=Path("/c"), key=key, proxy_pass="http://origin:8080")
    assert passed.key_template().render("https://a.example/p") == "httpsorigin:8080/p"


def test_default_key_is_the_key_nginx_writes_without_proxy_cache_key() -> None:
    """No key means nginx's real default key: read back for any upstream, exact with proxy_pass."""
    config = NginxCacheConfig(cache_path=Path("/c"))
    assert config.key is None
    template = config.key_template()
    assert not template.renders
    with pytest.raises(ValueError, match="proxy_pass"):
        template.render("http://acme.example/")
    assert template.invert("http://127.0.0.1:8080/docs/a%20b?q=1") == (
        KeyParts(None, "/docs/a b", "q=1"),
    )
    assert template.invert("https://backend/p") == (KeyParts(None, "/p", None),)
    assert template.invert("httpacme.example/p") == ()
    exact = NginxCacheConfig(cache_path=Path("/c"), proxy_pass="http://127.0.0.1:8080")
    assert exact.key_template().render("https://Acme.example/docs/x?q=1") == (
        "http://127.0.0.1:8080/docs/x?q=1"
    )
    assert exact.key_template().invert("http://10.0.0.1:8080/docs/x") == ()


@pytest.mark.parametrize(
    ("proxy_pass", "key"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/p?q"),
        ("http://127.0.0.1:80", "http://127.0.0.1/p?q"),
        ("https://localhost:443", "https://localhost/p?q"),
        ("https://localhost:80", "https://localhost:80/p?q"),
        ("HTTP://named_upstream", "http://named_upstream/p?q"),
        ("http://[::1]:8080", "http://[::1]:8080/p?q"),
    ],
    ids=["port", "http-default-port", "https-default-port", "other-port", "upstream", "ipv6"],
)
def test_proxy_pass_gives_the_key_nginx_writes(proxy_pass: str, key: str) -> None:
    """$proxy_host is the host as written, with its port unless the scheme's default (1.22)."""
    config = NginxCacheConfig(cache_path=Path("/c"), proxy_pass=proxy_pass)
    assert config.key_template().render("https://www.example/p?q") == key


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"proxy_pass": "http://127.0.0.1:8080/"}, "URI part"),
        ({"proxy_pass": "http://127.0.0.1:8080/app"}, "URI part"),
        ({"proxy_pass": "127.0.0.1:8080"}, "not an http"),
        ({"proxy_pass": "http://$upstream"}, "not an http"),
        ({"proxy_pass": "http://u@h"}, "host"),
        ({"proxy_pass": "http://a b"}, "host"),
        ({"proxy_pass": "http://a", "proxy_host": "b"}, "disagrees"),
        ({"proxy_host": "b"}, "set proxy_pass"),
    ],
    ids=[
        "slash",
        "path",
        "no-scheme",
        "variable",
        "userinfo",
        "space",
        "disagree",
        "host-without-key",
    ],
)
def test_config_rejects_a_proxy_pass_it_cannot_key(settings: dict[str, str], fragment: str) -> None:
    """A proxy_pass whose keys no template describes, or that contradicts proxy_host, fails."""
    with pytest.raises(pydantic.ValidationError, match=fragment):
        NginxCacheConfig(cache_path=Path("/c"), **settings)


def test_config_mode_is_hard_or_soft() -> None:
    """mode defaults to hard; soft is accepted and anything else is rejected."""
    assert NginxCacheConfig(cache_path=Path("/c"), key=CACHE_KEY).mode == "hard"
    assert NginxCacheConfig(cache_path=Path("/c"), key=CACHE_KEY, mode="soft").mode == "soft"
    with pytest.raises(pydantic.ValidationError, match="mode"):
        NginxCacheConfig(cache_path=Path("/c"), key=CACHE_KEY, mode="stale")


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
        (CACHE_KEY, "http://origin:8080/p", []),
        ("$scheme://$host$request_uri", "http://[::1]/p", [("[::1]", "/p", None)]),
    ],
    ids=["host", "scheme-ambiguity", "uri-args", "no-host", "no-match", "port-not-host", "ipv6"],
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
    cache_dir: Path, template: KeyTemplate | None = None
) -> AsyncIterator[CacheIndex]:
    # A template made per test: one made at import would keep its memos of read-back keys
    # across tests, and scripts/mutate's mutants would read what the original computed.
    async with CacheIndex(cache_dir, template or KeyTemplate(HOST_KEY)) as index:
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


async def test_keys_the_template_cannot_read_are_counted_as_files_come_and_go(
    cache_dir: Path,
) -> None:
    """unmatched_keys counts indexed files whose key the template cannot read, kept current."""
    write_cache_file(cache_dir, "httpacme.example/a")
    odd = write_cache_file(cache_dir, "http://127.0.0.1:8080/a", headers=["Cache-Tag: t"])
    async with open_index(cache_dir) as index:
        assert index.unmatched_keys == 1
        later = write_cache_file(cache_dir, "http://127.0.0.1:8080/b")
        write_cache_file(cache_dir, "httpacme.example/b")
        await index.sync()
        assert index.unmatched_keys == 2
        later.write_bytes(later.read_bytes())  # rewritten in place: still one file
        odd.unlink()
        await index.sync()
        assert index.unmatched_keys == 1
        later.unlink()
        await index.sync()
        assert (index.unmatched_keys, len(index)) == (0, 2)


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
        (Purge(urls=frozenset({f"http://{BLOG}/posts/1"}), soft=True), (), {(BLOG, "/posts/1")}),
        (Purge(hosts=frozenset({BLOG2}), soft=True), (), ALL_BLOG2),
        (Purge(everything=True, soft=True), (), set(PAGES)),
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
        "url-soft",
        "host-soft",
        "everything-soft",
    ],
)
async def test_purge_evicts_exactly_the_named_objects(
    tagged_origin: Origin,
    nginx_env: NginxEnv,
    purge: Purge,
    key_hosts: tuple[str, ...],
    purged: set[tuple[str, str]],
) -> None:
    """After a purge nginx misses exactly the purged pages and still hits every other one.

    A soft purge expires instead: without stale directives nginx refetches them (EXPIRED).
    """
    async with NginxCache(nginx_config(nginx_env)) as cache:
        for host, path in PAGES:
            assert nginx_env.get(path, host).cache == "MISS"
            assert nginx_env.prime(path, host).cache == "HIT"
        # No await since priming: the purge itself must pick up nginx's fresh files.
        assert await cache.purge(purge, key_hosts=key_hosts) == len(purged)
    statuses = {(host, path): nginx_env.get(path, host).cache for host, path in PAGES}
    gone = "EXPIRED" if purge.soft else "MISS"
    assert {page for page, status in statuses.items() if status == gone} == purged
    assert {page for page, status in statuses.items() if status == "HIT"} == set(PAGES) - purged


async def test_key_and_path_match_what_nginx_wrote(nginx_env: NginxEnv) -> None:
    """The rendered key and its md5 path are exactly the file nginx wrote for the URL."""
    nginx_env.prime("/docs/a%20b?x=1&y=2", BLOG)
    config = nginx_config(nginx_env)
    assert config.key is not None
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
    config = NginxCacheConfig(cache_path=tmp_path / "nope", key=CACHE_KEY)
    with pytest.raises(ConfigError, match="nope"):
        async with NginxCache(config):
            pass


# --- soft purges --------------------------------------------------------------------------

SOFT = pytest.mark.parametrize("nginx_directives", [SOFT_PURGE_DIRECTIVES], ids=["stale"])


@pytest.fixture
def etag_origin(origin: Origin) -> Origin:
    origin.etag = '"v1"'
    return origin


@SOFT
@pytest.mark.parametrize(
    ("soft", "mode", "changed"),
    [(True, "hard", False), (True, "hard", True), (False, "soft", False), (False, "soft", True)],
    ids=["purge-soft-304", "purge-soft-200", "mode-soft-304", "mode-soft-200"],
)
async def test_soft_purge_serves_stale_and_revalidates(
    etag_origin: Origin, nginx_env: NginxEnv, soft: bool, mode: str, changed: bool
) -> None:
    """After a soft purge nginx answers at once from cache and asks the origin conditionally.

    The origin holds its answer until the stale copy has been served (STALE, then UPDATING
    while the update waits); then the next request is a HIT with the old body (origin
    answered 304) or with the new one (origin changed).
    """
    old = nginx_env.prime("/posts/1", BLOG)
    path = cache_file_path(nginx_env.cache_path, CACHE_LEVELS, f"http{BLOG}/posts/1")
    config = nginx_config(nginx_env).model_copy(update={"mode": mode})
    async with NginxCache(config) as cache:
        purge = Purge(urls=frozenset({f"http://{BLOG}/posts/1"}), soft=soft)
        assert await cache.purge(purge) == 1
    assert path.exists()
    if changed:
        etag_origin.etag = '"v2"'
    etag_origin.gate.clear()
    with cache_file_written(path) as nginx_wrote:
        served = nginx_env.get("/posts/1", BLOG)
        meanwhile = nginx_env.get("/posts/1", BLOG, new_connection=True)
        etag_origin.gate.set()
        assert (served.cache, served.body) == ("STALE", old.body)
        assert (meanwhile.cache, meanwhile.body) == ("UPDATING", old.body)
        requests = etag_origin.wait_for_requests(2)
        nginx_wrote()
    status = 200 if changed else 304
    assert requests == [
        OriginRequest("/posts/1", None, 200),
        OriginRequest("/posts/1", '"v1"', status),
    ]
    after = nginx_env.get("/posts/1", BLOG)
    assert after.cache == "HIT"
    if changed:
        assert after.body == f'{BLOG}/posts/1 "v2" #2\n'
    else:
        assert after.body == old.body


@SOFT
async def test_hard_purge_still_deletes(etag_origin: Origin, nginx_env: NginxEnv) -> None:
    """With the stale directives in place a hard purge still evicts: a MISS, no If-None-Match."""
    nginx_env.prime("/posts/1", BLOG)
    async with NginxCache(nginx_config(nginx_env)) as cache:
        assert await cache.purge(Purge(urls=frozenset({f"http://{BLOG}/posts/1"}))) == 1
    assert nginx_env.get("/posts/1", BLOG).cache == "MISS"
    assert etag_origin.wait_for_requests(2)[1] == OriginRequest("/posts/1", None, 200)


async def test_soft_purge_is_idempotent(nginx_env: NginxEnv) -> None:
    """Expiring again, or expiring what is not cached, succeeds and counts nothing."""
    nginx_env.prime("/", BLOG)
    path = cache_file_path(nginx_env.cache_path, CACHE_LEVELS, f"http{BLOG}/")
    purge = Purge(urls=frozenset({f"http://{BLOG}/", f"http://{BLOG}/never-cached"}), soft=True)
    async with NginxCache(nginx_config(nginx_env)) as cache:
        assert await cache.purge(purge) == 1
        expired = read_cache_header(str(path))
        assert await cache.purge(purge) == 0
        assert read_cache_header(str(path)) == expired
    assert nginx_env.get("/", BLOG).cache == "EXPIRED"


async def test_expire_moves_only_valid_sec_into_the_past(nginx_env: NginxEnv) -> None:
    """Of a real nginx file only valid_sec changes, to a second before now (or stays earlier)."""
    nginx_env.prime("/", BLOG)
    path = str(cache_file_path(nginx_env.cache_path, CACHE_LEVELS, f"http{BLOG}/"))
    before = Path(path).read_bytes()
    header = read_cache_header(path)
    assert header is not None
    assert header.version == NGINX_CACHE_VERSION
    assert header.date <= header.valid_sec - 3600 + 1  # proxy_cache_valid / max-age: 1 h
    assert expire_cache_file(path, now=header.date + 10)
    after = read_cache_header(path)
    assert after == header._replace(valid_sec=header.date + 9)
    assert not expire_cache_file(path, now=header.date + 20)
    assert read_cache_header(path) == after
    data = Path(path).read_bytes()
    assert data[:8] + data[16:] == before[:8] + before[16:]


async def test_unknown_header_version_is_refused_untouched(nginx_env: NginxEnv) -> None:
    """A soft purge leaves a file of an unknown header version byte for byte as it was."""
    nginx_env.prime("/", BLOG)
    path = cache_file_path(nginx_env.cache_path, CACHE_LEVELS, f"http{BLOG}/")
    data = bytearray(path.read_bytes())
    data[0] = NGINX_CACHE_VERSION + 1
    path.write_bytes(data)
    async with NginxCache(nginx_config(nginx_env)) as cache:
        with pytest.raises(CacheEvictionFailed, match="header version 6") as failed:
            await cache.purge(Purge(urls=frozenset({f"http://{BLOG}/"}), soft=True))
    assert failed.value.paths == (str(path),)
    assert path.read_bytes() == data


async def test_a_batch_reports_each_purge_and_one_failure_fails_only_its_purge(
    nginx_env: NginxEnv,
) -> None:
    """purge_batch: per-purge counts (a file two purges match counts for the first), and a
    purge that cannot be carried out is reported in its place while the others are done."""
    for path in ("/", "/a", "/b"):
        nginx_env.prime(path, BLOG)
    refused = cache_file_path(nginx_env.cache_path, CACHE_LEVELS, f"http{BLOG}/b")
    data = bytearray(refused.read_bytes())
    data[0] = NGINX_CACHE_VERSION + 1
    refused.write_bytes(data)
    purges = [
        Purge(urls=frozenset({f"http://{BLOG}/"})),
        Purge(urls=frozenset({f"http://{BLOG}/b"}), soft=True),
        Purge(urls=frozenset({f"http://{BLOG}/", f"http://{BLOG}/a"})),
        Purge(urls=frozenset({"http://[bad/"})),
    ]
    async with NginxCache(nginx_config(nginx_env)) as cache:
        first, failed, third, malformed = await cache.purge_batch(purges)
    assert (first, third) == (1, 1)
    assert isinstance(failed, CacheEvictionFailed)
    assert failed.paths == (str(refused),)
    assert isinstance(malformed, DataError)
    assert nginx_env.get("/", BLOG).cache == "MISS"
    assert nginx_env.get("/a", BLOG).cache == "MISS"
    assert refused.read_bytes() == data


async def test_soft_purge_does_not_follow_symlinks(nginx_env: NginxEnv, tmp_path: Path) -> None:
    """A symlink where a cache file belongs is reported, and what it points at is untouched."""
    nginx_env.prime("/", BLOG)
    path = cache_file_path(nginx_env.cache_path, CACHE_LEVELS, f"http{BLOG}/")
    target = tmp_path / "elsewhere"
    path.rename(target)
    path.symlink_to(target)
    data = target.read_bytes()
    async with NginxCache(nginx_config(nginx_env)) as cache:
        with pytest.raises(CacheEvictionFailed, match="could not expire 1 file"):
            await cache.purge(Purge(urls=frozenset({f"http://{BLOG}/"}), soft=True))
    assert target.read_bytes() == data


# --- nginx's default key (no proxy_cache_key), on real nginx ---------------------------------


@pytest.fixture
def default_key_env(tmp_path: Path, origin: Origin) -> Iterator[NginxEnv]:
    """nginx with no proxy_cache_key: it keys objects with its default key."""
    with run_nginx_env(tmp_path / "nginx", origin, cache_key=None) as env:
        yield env


def nginx_keys(cache_path: Path) -> dict[Path, str]:
    """Every cache file nginx wrote and the key on its KEY: line."""
    keys = {}
    for path in cache_path.rglob("*"):
        if path.is_file():
            head = parse_cache_head(path.read_bytes())
            assert head is not None, path
            keys[path] = head.key
    return keys


async def test_nginx_default_key_is_the_proxy_pass_url_then_the_request_uri(
    default_key_env: NginxEnv,
) -> None:
    """nginx writes KEY: http://127.0.0.1:<port>/docs/x?q=1, whatever the client's Host."""
    env = default_key_env
    env.prime("/docs/x?q=1", BLOG)
    assert env.get("/docs/x?q=1", OTHER).cache == "HIT"  # the Host is not in the key
    key = f"{env.proxy_pass}/docs/x?q=1"
    config = NginxCacheConfig(cache_path=env.cache_path, proxy_pass=env.proxy_pass)
    rendered = config.key_template().render(f"https://{BLOG}/docs/x?q=1")
    assert rendered == key
    assert nginx_keys(env.cache_path) == {cache_file_path(env.cache_path, "1:2", key): key}


DEFAULT_KEY_PAGES = ["/docs/a", "/docs/a?x=1", "/docs/b", "/docs2", "/other"]


@pytest.mark.parametrize("with_proxy_pass", [False, True], ids=["defaults", "proxy-pass"])
@pytest.mark.parametrize(
    ("purge", "purged"),
    [
        (Purge(urls=frozenset({f"https://{BLOG}/docs/a"})), {"/docs/a"}),
        (Purge(urls=frozenset({f"http://{OTHER}/docs/a?x=1"})), {"/docs/a?x=1"}),
        (
            Purge(prefixes=frozenset({f"https://{BLOG}/docs"})),
            {"/docs/a", "/docs/a?x=1", "/docs/b"},
        ),
        (Purge(hosts=frozenset({BLOG})), set(DEFAULT_KEY_PAGES)),
    ],
    ids=["url", "url-query", "prefix", "host"],
)
async def test_purges_evict_with_nginx_default_key(
    default_key_env: NginxEnv, with_proxy_pass: bool, purge: Purge, purged: set[str]
) -> None:
    """With no proxy_cache_key and drainbus's defaults, purges evict what they name."""
    env = default_key_env
    proxy_pass = env.proxy_pass if with_proxy_pass else None
    config = NginxCacheConfig(cache_path=env.cache_path, proxy_pass=proxy_pass, name="test")
    for path in DEFAULT_KEY_PAGES:
        env.prime(path, BLOG)
    async with NginxCache(config) as cache:
        assert await cache.purge(purge) == len(purged)
    statuses = {path: env.get(path, BLOG).cache for path in DEFAULT_KEY_PAGES}
    assert {path for path, status in statuses.items() if status == "MISS"} == purged
    assert {path for path, status in statuses.items() if status == "HIT"} == (
        set(DEFAULT_KEY_PAGES) - purged
    )


@pytest.mark.parametrize(
    ("nginx_key", "settings", "shown", "suggested"),
    [
        (
            None,
            {"key": CACHE_KEY},
            "key template '$scheme$host$request_uri'",
            'leave key unset (nginx\'s default key) and set proxy_pass = "{proxy_pass}"',
        ),
        (
            CACHE_KEY,
            {},
            "nginx's default key (no proxy_cache_key; proxy_pass not set)",
            'set key = "$scheme$host$request_uri"',
        ),
        (
            "$scheme://$host$request_uri",
            {"proxy_pass": "http://127.0.0.1:1"},
            "nginx's default key (no proxy_cache_key) for proxy_pass 'http://127.0.0.1:1'",
            'set key = "$scheme://$host$request_uri"',
        ),
    ],
    ids=["host-template-on-default-keys", "defaults-on-host-keys", "proxy-pass-on-url-keys"],
)
async def test_start_refuses_a_key_template_that_cannot_read_the_cache(
    tmp_path: Path,
    nginx_key: str | None,
    settings: dict[str, str],
    shown: str,
    suggested: str,
) -> None:
    """One line: the template, a real KEY: line it cannot read, and a setting that reads it."""
    with run_nginx_env(tmp_path / "nginx", cache_key=nginx_key) as env:
        for host in (BLOG, BLOG2):
            env.prime("/docs/a?x=1", host)
        keys = set(nginx_keys(env.cache_path).values())
        config = NginxCacheConfig(cache_path=env.cache_path, name="web", **settings)
        with pytest.raises(ConfigError) as caught:
            async with NginxCache(config):
                pass
    message = str(caught.value)
    assert caught.value.exit_code == ExitCode.CONFIG
    assert "\n" not in message
    assert shown in message
    assert any(f"'KEY: {key}'" in message for key in keys), (message, keys)
    assert suggested.format(proxy_pass=env.proxy_pass) in message


async def test_start_accepts_a_cache_it_can_read_and_counts_the_keys_it_cannot(
    default_key_env: NginxEnv,
) -> None:
    """A readable cache starts; a later file with a foreign key shows in the target's stats."""
    env = default_key_env
    env.prime("/docs/a", BLOG)
    config = NginxCacheConfig(cache_path=env.cache_path, proxy_pass=env.proxy_pass)
    async with NginxCache(config) as cache:
        target = NginxTarget(cache, ScopeRule(), "nginx-1")
        assert target.snapshot() == {
            "evicted": 0,
            "refills_evicted": 0,
            "indexed": 1,
            "unmatched_keys": 0,
        }
        foreign = write_cache_file(env.cache_path, f"http{BLOG}/docs/a")
        await cache.index.sync()
        assert target.snapshot()["unmatched_keys"] == 1
        foreign.unlink()
        await cache.index.sync()
        assert target.snapshot()["unmatched_keys"] == 0


@pytest.mark.parametrize(
    ("prefix", "purged"),
    [
        ("/docs", {"/docs", "/docs?y=1", "/docs/a"}),
        ("/docs/", {"/docs/a"}),
        ("/%2F", set()),
        ("/", {"/docs", "/docs?y=1", "/docs/a", "/docs2", "/other"}),
    ],
    ids=["no-slash", "trailing-slash", "encoded-slash", "root"],
)
async def test_prefix_purge_keeps_its_boundary(
    nginx_env: NginxEnv, prefix: str, purged: set[str]
) -> None:
    """`/docs/` covers `/docs/` and below only; an encoded slash never means the whole host."""
    pages = ["/docs", "/docs?y=1", "/docs/a", "/docs2", "/other"]
    for page in pages:
        nginx_env.prime(page, BLOG)
    async with NginxCache(nginx_config(nginx_env)) as cache:
        await cache.purge(Purge(prefixes=frozenset({f"http://{BLOG}{prefix}"})))
    statuses = {page: nginx_env.get(page, BLOG).cache for page in pages}
    assert {page for page, status in statuses.items() if status == "MISS"} == purged


@pytest.mark.parametrize(
    "purge",
    [
        Purge(hosts=frozenset({"hop.example"})),
        Purge(prefixes=frozenset({"https://hop.example/x"})),
        Purge(urls=frozenset({"https://hop.example/x"})),
        Purge(hosts=frozenset({"hop.example"}), soft=True),
    ],
    ids=["host", "prefix", "url", "host-soft"],
)
async def test_ambiguous_key_is_evicted_only_when_every_reading_matches(
    nginx_env: NginxEnv, purge: Purge
) -> None:
    """`httpshop.example/x` is also `https://hop.example/x`: hop.example's owner cannot evict it."""
    nginx_env.prime("/x", "shop.example")
    nginx_env.prime("/x", "hop.example")
    async with NginxCache(nginx_config(nginx_env)) as cache:
        assert await cache.purge(purge) == 1
    gone = "EXPIRED" if purge.soft else "MISS"
    assert nginx_env.get("/x", "hop.example").cache == gone
    assert nginx_env.get("/x", "shop.example").cache == "HIT"


async def test_ambiguous_key_is_still_evicted_by_its_tag(nginx_env: NginxEnv) -> None:
    """A tag names the object, not a reading of its key: the tag purge evicts it."""
    nginx_env.prime("/x", "shop.example")
    async with NginxCache(nginx_config(nginx_env)) as cache:
        assert await cache.purge(Purge(tags=frozenset({"shop"}))) == 1
    assert nginx_env.get("/x", "shop.example").cache == "MISS"


@pytest.mark.parametrize(
    ("key", "warned"),
    [
        (CACHE_KEY, True),
        ("$scheme://$host$request_uri", False),
        ("$host$request_uri", False),
    ],
    ids=["scheme-host", "scheme-colon-host", "host-only"],
)
async def test_an_ambiguous_key_template_is_reported_once_at_start(
    nginx_env: NginxEnv, key: str, warned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One warning line with an example key and its readings, and the unambiguous fix."""
    config = NginxCacheConfig(cache_path=nginx_env.cache_path, levels=CACHE_LEVELS, key=key)
    # A fresh logger: one cached after an earlier test configured logging would bypass capture.
    monkeypatch.setattr(nginx_module, "log", structlog.get_logger(nginx_module.__name__))
    with structlog.testing.capture_logs() as events:
        async with NginxCache(config):
            pass
    ambiguous = [e for e in events if e["event"] == "nginx_cache_key_ambiguous"]
    assert len(ambiguous) == (1 if warned else 0)
    if warned:
        assert ambiguous[0]["log_level"] == "warning"
        assert "'shop.example'" in ambiguous[0]["example"]
        assert "'hop.example'" in ambiguous[0]["example"]
        assert "$scheme://$host$request_uri" in ambiguous[0]["fix"]


@pytest.mark.parametrize("tag", ["mixedcase", "MIXEDCASE", "MixedCase"])
async def test_tag_purge_ignores_ascii_case_as_cloudflare_does(
    origin: Origin, nginx_env: NginxEnv, tag: str
) -> None:
    """`tag:mixedcase` evicts what the origin tagged `MixedCase`, and nothing else."""
    origin.path_tags["/mixed/"] = ["MixedCase"]
    nginx_env.prime("/mixed/1", BLOG)
    nginx_env.prime("/other", BLOG)
    async with NginxCache(nginx_config(nginx_env)) as cache:
        assert await cache.purge(Purge(tags=frozenset({tag}))) == 1
    assert nginx_env.get("/mixed/1", BLOG).cache == "MISS"
    assert nginx_env.get("/other", BLOG).cache == "HIT"


async def test_non_ascii_tags_from_the_origin_are_purged(
    origin: Origin, nginx_env: NginxEnv
) -> None:
    """`Cache-Tag: seg-café` (UTF-8, as origins send it) is evicted by `tag:seg-café`."""
    origin.path_tags["/cafe/"] = ["seg-café"]
    nginx_env.prime("/cafe/1", BLOG)
    nginx_env.prime("/other", BLOG)
    async with NginxCache(nginx_config(nginx_env)) as cache:
        assert await cache.purge(parse_purge("tag:seg-café")) == 1
    assert nginx_env.get("/cafe/1", BLOG).cache == "MISS"
    assert nginx_env.get("/other", BLOG).cache == "HIT"


async def test_a_url_given_with_headers_is_purged_like_any_url(nginx_env: NginxEnv) -> None:
    """nginx's key has no request headers: the URL of a {"url", "headers"} entry is evicted."""
    nginx_env.prime("/x", BLOG)
    nginx_env.prime("/y", BLOG)
    line = f'{{"urls": [{{"url": "http://{BLOG}/x", "headers": {{"Accept-Language": "de"}}}}]}}'
    async with NginxCache(nginx_config(nginx_env)) as cache:
        assert await cache.purge(parse_purge(line)) == 1
    assert nginx_env.get("/x", BLOG).cache == "MISS"
    assert nginx_env.get("/y", BLOG).cache == "HIT"


VARIANT_KEY = "$scheme://$host$request_uri|$http_accept_encoding|$cookie_lang"


@pytest.mark.parametrize(
    ("purge", "evicted"),
    [
        (Purge(urls=frozenset({f"https://{BLOG}/x"})), {"/x"}),
        (Purge(prefixes=frozenset({f"http://{BLOG}/x"})), {"/x", "/x/a"}),
        (Purge(hosts=frozenset({BLOG})), {"/x", "/x/a", "/y"}),
        (Purge(tags=frozenset({"acme-blog"})), {"/x", "/x/a", "/y"}),
    ],
    ids=["url", "prefix", "host", "tag"],
)
async def test_keys_with_request_headers_and_cookies_purge_every_variant(
    tmp_path: Path, origin: Origin, purge: Purge, evicted: set[str]
) -> None:
    """With $http_accept_encoding and $cookie_lang in the key, one URL is several files; a
    purge evicts every variant of what it names, and nothing else."""
    variants = [
        {"Accept-Encoding": "gzip"},
        {"Accept-Encoding": "identity", "Cookie": "lang=de"},
        {"Accept-Encoding": "br, gzip", "Cookie": "lang=fr; theme=dark"},
    ]
    pages = [(BLOG, "/x"), (BLOG, "/x/a"), (BLOG, "/y"), (OTHER, "/x")]
    with run_nginx_env(tmp_path / "nginx", origin, cache_key=VARIANT_KEY) as env:

        def status(host: str, path: str, headers: dict[str, str]) -> str:
            url = f"http://127.0.0.1:{env.nginx.port}{path}"
            response = env.client.get(url, headers={"Host": host, **headers})
            return str(response.headers.get("X-Cache-Status", ""))

        for host, path in pages:
            for headers in variants:
                assert status(host, path, headers) == "MISS"
                assert status(host, path, headers) == "HIT"
        config = NginxCacheConfig(cache_path=env.cache_path, levels=CACHE_LEVELS, key=VARIANT_KEY)
        async with NginxCache(config) as cache:
            assert len(cache.index) == len(pages) * len(variants)
            assert cache.index.unmatched_keys == 0
            removed = await cache.purge(purge)
        assert removed == len(evicted) * len(variants)
        for host, path in pages:
            gone = host == BLOG and path in evicted
            for headers in variants:
                assert status(host, path, headers) == ("MISS" if gone else "HIT"), (host, path)
