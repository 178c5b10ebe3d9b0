"""The refill guard: no stale copy written back after a purge survives its refill window."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from drainbus.drain.cache_file import parse_cache_head
from drainbus.drain.nginx import NginxCache, NginxCacheConfig, cache_file_path
from drainbus.drain.purges import Purge
from drainbus.drain.scope import ScopeRule
from drainbus.drain.target_stats import NginxStats
from drainbus.drain.targets import NginxTarget
from tests.nginx_env import (
    CACHE_KEY,
    CACHE_LEVELS,
    STALE_WHILE_UPDATING,
    NginxEnv,
    Origin,
    Response,
    nginx_env,
    origin,
    write_cache_file,
)

__all__ = ["nginx_env", "origin"]  # fixtures, imported for pytest

HOST = "acme-blog.pages.example"
SLOW = 2.0  # seconds the slow origin takes to answer
WINDOW = 3.0  # the refill window of the tests that wait for it to close


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Return once ``condition()`` holds, polled on the event loop; fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)  # polling an observable state: nginx sends no event


# --- validators ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "validator"),
    [
        (['ETag: "v1"', "Last-Modified: Tue, 01 Dec 2026 10:00:00 GMT"], 'ETag: "v1"'),
        (['etag:  W/"v2" '], 'ETag: W/"v2"'),
        (
            ["Last-Modified: Tue, 01 Dec 2026 10:00:00 GMT"],
            "Last-Modified: Tue, 01 Dec 2026 10:00:00 GMT",
        ),
        ([], None),
    ],
    ids=["etag-first", "weak-etag-any-case", "last-modified", "none"],
)
def test_validator_is_the_etag_else_last_modified(
    tmp_path: Path, headers: list[str], validator: str | None
) -> None:
    """A head's validator is its ETag, else its Last-Modified, named so they never collide."""
    path = write_cache_file(tmp_path, "httpa.example/", headers=headers)
    head = parse_cache_head(path.read_bytes())
    assert head is not None
    assert head.validator == validator


# --- the guard on files written as nginx writes them --------------------------------------


def _config(cache_dir: Path) -> NginxCacheConfig:
    return NginxCacheConfig(cache_path=cache_dir, levels=CACHE_LEVELS, key=CACHE_KEY)


def _url(path: str) -> str:
    return f"http://{HOST}{path}"


def _key(path: str) -> str:
    return f"http{HOST}{path}"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


async def test_old_validator_is_evicted_at_once_and_only_once(cache_dir: Path) -> None:
    """A refill with the evicted ETag is removed at once; a second one stays (no refill loop)."""
    write_cache_file(cache_dir, _key("/p"), headers=['ETag: "v1"'])
    async with NginxCache(_config(cache_dir), refill_window=60) as cache:
        assert await cache.purge(Purge(urls=frozenset({_url("/p")}))) == 1
        stale = write_cache_file(cache_dir, _key("/p"), headers=['ETag: "v1"'])
        await cache.index.sync()
        assert not stale.exists()
        assert cache.refills_evicted == 1
        again = write_cache_file(cache_dir, _key("/p"), headers=['ETag: "v1"'])
        await cache.index.sync()
        assert again.exists()
        assert cache.refills_evicted == 1


async def test_target_reports_refills_evicted(cache_dir: Path) -> None:
    """The nginx target's counters include the refills its guard evicted."""
    write_cache_file(cache_dir, _key("/p"), headers=['ETag: "v1"'])
    async with NginxCache(_config(cache_dir), refill_window=60) as cache:
        target = NginxTarget(cache, ScopeRule(), "pages")
        await target.apply([Purge(urls=frozenset({_url("/p")}))])
        write_cache_file(cache_dir, _key("/p"), headers=['ETag: "v1"'])
        await cache.index.sync()
        stats = target.stats()
        assert stats == NginxStats(evicted=1, refills_evicted=1, indexed=0, unmatched_keys=0)
        assert target.snapshot() == {
            "evicted": 1, "refills_evicted": 1, "indexed": 0, "unmatched_keys": 0
        }  # fmt: skip


async def test_new_validator_is_kept_and_a_late_old_copy_is_not(cache_dir: Path) -> None:
    """New content stays; the old page landing after it is still evicted."""
    write_cache_file(cache_dir, _key("/p"), headers=["Cache-Tag: posts", 'ETag: "v1"'])
    async with NginxCache(_config(cache_dir), refill_window=60) as cache:
        assert await cache.purge(Purge(tags=frozenset({"posts"}))) == 1
        fresh = write_cache_file(cache_dir, _key("/p"), headers=["Cache-Tag: posts", 'ETag: "v2"'])
        await cache.index.sync()
        assert fresh.exists()
        stale = write_cache_file(cache_dir, _key("/p"), headers=["Cache-Tag: posts", 'ETag: "v1"'])
        await cache.index.sync()
        assert not stale.exists()
        assert cache.refills_evicted == 1


async def test_unmatched_refills_are_left_alone(cache_dir: Path) -> None:
    """Files the purge does not name are never touched, whatever their validator."""
    write_cache_file(cache_dir, _key("/docs/a"), headers=['ETag: "v1"'])
    async with NginxCache(_config(cache_dir), refill_window=0.2) as cache:
        purge = Purge(prefixes=frozenset({_url("/docs")}))
        assert await cache.purge(purge) == 1
        other = write_cache_file(cache_dir, _key("/docs2"), headers=['ETag: "v1"'])
        await cache.index.sync()
        await until(lambda: len(cache.refill_guard) == 0, 5.0, "the window closes")
        assert other.exists()
        assert cache.refills_evicted == 0


async def test_nothing_to_compare_is_purged_again_when_the_window_closes(cache_dir: Path) -> None:
    """No earlier copy, or no validator: the refill stays until the window ends, then goes."""
    async with NginxCache(_config(cache_dir), refill_window=0.3) as cache:
        assert await cache.purge(Purge(hosts=frozenset({HOST.upper()}))) == 0
        refill = write_cache_file(cache_dir, _key("/new"), headers=['ETag: "v1"'])
        bare = write_cache_file(cache_dir, _key("/bare"))
        await cache.index.sync()
        assert refill.exists()
        assert bare.exists()
        await until(lambda: len(cache.refill_guard) == 0, 5.0, "the window closes")
        assert not refill.exists()
        assert not bare.exists()
        assert cache.refills_evicted == 2
        later = write_cache_file(cache_dir, _key("/new"), headers=['ETag: "v1"'])
        await cache.index.sync()
    assert later.exists()


async def test_a_batch_has_one_window_that_tells_each_refill_as_its_own_purges(
    cache_dir: Path,
) -> None:
    """One window watches a whole batch; a refill evicted at once and one evicted when the
    window closes are each reported with the purge of the batch that matched it."""
    write_cache_file(cache_dir, _key("/p"), headers=['ETag: "v1"'])
    other = Purge(urls=frozenset({_url("/q")}))
    by_url = Purge(urls=frozenset({_url("/p")}))
    by_tag = Purge(tags=frozenset({"posts"}))
    told: list[tuple[Purge, int]] = []
    async with NginxCache(_config(cache_dir), refill_window=0.5) as cache:
        cache.refill_guard.on_evicted = lambda purge, count: told.append((purge, count))
        assert await cache.purge_batch([other, by_url, by_tag]) == [0, 1, 0]
        assert len(cache.refill_guard) == 1
        stale = write_cache_file(cache_dir, _key("/p"), headers=['ETag: "v1"'])
        tagged = write_cache_file(cache_dir, _key("/t"), headers=["Cache-Tag: posts"])
        await cache.index.sync()
        assert not stale.exists()
        assert tagged.exists()  # nothing to compare: it goes when the window closes
        await until(lambda: len(told) == 2, 5.0, "the window closes")
        assert not tagged.exists()
    assert told == [(by_url, 1), (by_tag, 1)]


async def test_open_windows_are_dropped_cleanly_on_shutdown(cache_dir: Path) -> None:
    """Leaving the cache with windows open cancels their timer and keeps no state."""
    async with NginxCache(_config(cache_dir), refill_window=3600) as cache:
        await cache.purge(Purge(urls=frozenset({_url("/p")})))
        write_cache_file(cache_dir, _key("/p"))
        await cache.index.sync()
        assert len(cache.refill_guard) == 1
    assert len(cache.refill_guard) == 0
    assert cache_file_path(cache_dir, CACHE_LEVELS, _key("/p")).exists()


# --- real nginx, a slow origin ------------------------------------------------------------


def _nginx_config(env: NginxEnv) -> NginxCacheConfig:
    return _config(env.cache_path)


def _page_file(env: NginxEnv) -> Path:
    return cache_file_path(env.cache_path, CACHE_LEVELS, _key("/page"))


async def _get(env: NginxEnv) -> Response:
    return await asyncio.to_thread(env.get, "/page", HOST)


@pytest.mark.parametrize(
    ("refill_window", "served"),
    [(0.0, "v1"), (WINDOW, "v2")],
    ids=["without-guard-stale-survives", "with-guard"],
)
async def test_uncached_page_filled_by_a_request_in_flight_is_purged_again(
    origin: Origin, nginx_env: NginxEnv, refill_window: float, served: str
) -> None:
    """A miss in flight during the purge writes the old page; it is gone once the window ends."""
    origin.version, origin.delay = "v1", SLOW
    loop = asyncio.get_running_loop()
    async with (
        NginxCache(_nginx_config(nginx_env), refill_window=refill_window) as cache,
        asyncio.TaskGroup() as tasks,
    ):
        in_flight = tasks.create_task(_get(nginx_env))
        await asyncio.to_thread(origin.wait_for_hits, 1)  # the origin has read v1
        origin.version, origin.delay = "v2", 0.0
        purged_at = loop.time()
        assert await cache.purge(Purge(urls=frozenset({_url("/page")}))) == 0
        landed = await in_flight
        assert (landed.cache, "v1" in landed.body) == ("MISS", True)
        await until(lambda: _page_file(nginx_env) in cache.index, 5.0, "the index sees the fill")
        if refill_window:
            await until(lambda: cache.refills_evicted == 1, WINDOW + 5.0, "the window closes")
        else:  # the same wait, with nothing that could evict the stale page
            await asyncio.sleep(max(0.0, purged_at + WINDOW + 0.5 - loop.time()))
    response = await _get(nginx_env)
    assert served in response.body, response


@pytest.mark.parametrize("nginx_directives", [STALE_WHILE_UPDATING], ids=["stale-updating"])
@pytest.mark.parametrize(
    ("refill_window", "served"),
    [(0.0, "v1"), (10.0, "v2")],
    ids=["without-guard-stale-survives", "with-guard"],
)
async def test_background_refetch_with_the_old_etag_is_evicted_at_once(
    origin: Origin, nginx_env: NginxEnv, refill_window: float, served: str
) -> None:
    """A stale copy's refetch in flight during the purge lands with the old ETag: evicted."""
    origin.version, origin.max_age = "v1", 1
    loop = asyncio.get_running_loop()
    async with NginxCache(_nginx_config(nginx_env), refill_window=refill_window) as cache:
        await asyncio.to_thread(nginx_env.prime, "/page", HOST)
        origin.delay = SLOW
        expired_by = loop.time() + origin.max_age + 5.0
        response = await _get(nginx_env)
        while response.cache == "HIT" and loop.time() < expired_by:  # nginx sends no event
            await asyncio.sleep(0.1)
            response = await _get(nginx_env)
        assert response.cache == "STALE", response  # and nginx refetches in the background
        await asyncio.to_thread(origin.wait_for_hits, 2)  # the refetch has read v1
        origin.version, origin.delay = "v2", 0.0
        purged_at = loop.time()
        assert await cache.purge(Purge(urls=frozenset({_url("/page")}))) == 1
        if refill_window:
            await until(lambda: cache.refills_evicted == 1, SLOW + 5.0, "the refill is evicted")
            assert loop.time() - purged_at < refill_window  # at once, not when the window ended
        else:
            await until(lambda: _page_file(nginx_env).exists(), SLOW + 5.0, "the refetch lands")
    response = await _get(nginx_env)
    assert served in response.body, response


async def test_an_error_inside_the_cache_passes_through_unchanged(cache_dir: Path) -> None:
    """The guard's task group never wraps an exception raised while the cache is open."""
    with pytest.raises(LookupError, match="boom"):
        async with NginxCache(_config(cache_dir), refill_window=60):
            raise LookupError("boom")
