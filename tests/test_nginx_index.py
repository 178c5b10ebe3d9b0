"""The nginx cache index in-process: lookups at their edges, what it logs, how it recovers.

tests/test_nginx.py covers the index's main paths; these pin what the mutation run of
drain/nginx_index.py (drain/cache_scan.py was split from it since) found unguarded: log
events and their fields, counts past one, keys without a path, files sharing a path, a root
or folder that goes away, inotify limits (a stand-in Inotify that fails as the kernel does,
since real limits would starve the machine) and descriptors running out during the read-ahead.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from asyncinotify import Inotify
from structlog.testing import capture_logs

from drainbus.drain import cache_file, cache_scan, nginx_index
from drainbus.drain.cache_file import cache_file_path
from drainbus.drain.key_template import KeyTemplate
from drainbus.drain.nginx_index import CacheIndex
from drainbus.errors import BackendError, StartupError
from tests.nginx_env import CACHE_LEVELS, write_cache_file
from tests.test_cache_file import vanish_first_folder
from tests.test_nginx import cache_dir, reading_as_nobody, shared_cache_dir

__all__ = ["cache_dir", "shared_cache_dir"]  # fixtures, imported for pytest


def host_template() -> KeyTemplate:
    """A ``$scheme$host$request_uri`` template made per test: one made at import would keep
    its memos of read-back keys across tests (and scripts/mutate's mutants would read them)."""
    return KeyTemplate("$scheme$host$request_uri")


@pytest.fixture(autouse=True)
def fresh_index_log(fresh_logging: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index's loggers made anew, as fresh_logging does for the core's (see there)."""
    for module in (nginx_index, cache_scan):
        monkeypatch.setattr(module, "log", structlog.get_logger("drainbus.drain.nginx"))


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def test_the_scan_is_logged_with_its_counts(cache_dir: Path) -> None:
    """Each scan logs the cache's name, its files and what it could not use, and its time."""
    write_cache_file(cache_dir, "httpa.example/x")
    write_cache_file(cache_dir, "http://127.0.0.1/unreadable-key")
    bad = cache_file_path(cache_dir, [1, 2], "garbage")
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not a cache file")
    began = time.monotonic()
    with capture_logs() as logs:
        async with CacheIndex(cache_dir, host_template()) as index:
            pass
    took = time.monotonic() - began
    [scan] = events(logs, "nginx_cache_indexed")
    assert scan["log_level"] == "info"
    assert {k: scan[k] for k in ("cache", "files", "unmatched_keys", "unreadable", "invalid")} == {
        "cache": str(cache_dir), "files": 2, "unmatched_keys": 1, "unreadable": 0, "invalid": 1,
    }  # fmt: skip
    assert isinstance(scan["seconds"], float)
    assert 0 <= scan["seconds"] <= took
    assert scan["seconds"] == round(scan["seconds"], 3)
    assert index.name == str(cache_dir)
    async with CacheIndex(cache_dir, host_template(), name="edge") as named:
        assert named.name == "edge"


async def test_unreadable_files_are_counted_and_logged_once(shared_cache_dir: Path) -> None:
    """Each unreadable file counts; the first is a warning with the fix, the rest debug."""
    keys = ["httph/one", "httph/two"]
    for key in keys:  # the folders exist before start: the files arrive as file events
        folder = cache_file_path(shared_cache_dir, [1, 2], key).parent
        folder.mkdir(parents=True, exist_ok=True)
        for level in (folder, folder.parent):
            level.chmod(0o755)
    async with CacheIndex(shared_cache_dir, host_template()) as index:
        paths = [write_cache_file(shared_cache_dir, key, levels=CACHE_LEVELS) for key in keys]
        for path in paths:
            path.chmod(0o000)
        with capture_logs() as logs, reading_as_nobody():
            await index.sync()
        assert index.skipped_unreadable == 2
        assert len(index) == 0
    logged = events(logs, "nginx_cache_file_unreadable")
    assert [(e["log_level"], e["hint"]) for e in logged] == [
        ("warning", "run as nginx's worker user"),
        ("debug", "run as nginx's worker user"),
    ]
    assert {e["path"] for e in logged} == {str(p) for p in paths}


async def test_unreadable_folders_are_counted_and_the_walk_goes_on(shared_cache_dir: Path) -> None:
    """A folder the daemon may not list is counted and named; its siblings are indexed."""
    async with CacheIndex(shared_cache_dir, host_template()) as index:
        staging = shared_cache_dir.parent / f"{shared_cache_dir.name}-staging"
        shutil.rmtree(staging, ignore_errors=True)
        good = write_cache_file(staging / "d", "httph/good")
        for name in ("a", "b"):
            (staging / "d" / name).mkdir()
            (staging / "d" / name).chmod(0o000)
        for folder in (staging / "d", *(p for p in (staging / "d").rglob("*") if p.is_dir())):
            if folder.name not in ("a", "b"):
                folder.chmod(0o755)
        good.chmod(0o644)
        (staging / "d").rename(shared_cache_dir / "d")  # one folder appears, holding the rest
        with capture_logs() as logs, reading_as_nobody():
            await index.sync()
        shutil.rmtree(staging, ignore_errors=True)
        assert index.skipped_unreadable == 2
        assert index.paths_for_key("httph/good") == {
            str(shared_cache_dir / "d" / good.relative_to(staging / "d"))
        }
    logged = events(logs, "nginx_cache_folder_unreadable")
    assert sorted(e["path"] for e in logged) == [
        str(shared_cache_dir / "d" / "a"),
        str(shared_cache_dir / "d" / "b"),
    ]
    assert {e["log_level"] for e in logged} == {"warning"}


async def test_files_that_are_not_nginx_files_are_counted_and_logged(cache_dir: Path) -> None:
    """A symlink where a cache file should be, or a file rewritten as garbage, is invalid."""
    target = write_cache_file(cache_dir.parent / "elsewhere", "httph/target")
    rewritten = write_cache_file(cache_dir, "httph/rewritten", headers=["Cache-Tag: t"])
    async with CacheIndex(cache_dir, host_template()) as index:
        links = [cache_file_path(cache_dir, [1, 2], f"link{n}") for n in range(2)]
        with capture_logs() as logs:
            for link in links:  # renamed into place, as nginx puts its files
                link.parent.mkdir(parents=True, exist_ok=True)
                temp = link.with_name(link.name + ".0000000001")
                temp.symlink_to(target)
                temp.rename(link)
            rewritten.write_bytes(b"garbage")
            await index.sync()
        assert index.skipped_invalid == 3
        assert rewritten not in index
        assert index.paths_for_tag("t") == set()
    logged = events(logs, "nginx_cache_file_unusable")
    assert sorted(e["path"] for e in logged) == sorted(str(link) for link in links)
    assert all("Too many levels of symbolic links" in e["error"] for e in logged)


async def test_a_key_without_a_path_is_found_by_key(cache_dir: Path) -> None:
    """Keys a template reads no path from are looked up by the whole key."""
    template = KeyTemplate("$scheme://$host")
    path = write_cache_file(cache_dir, "http://a.example")
    async with CacheIndex(cache_dir, template) as index:
        assert index.paths_for_key("http://a.example") == {str(path)}
        assert index.paths_for_key("http://b.example") == set()


async def test_files_sharing_a_path_are_told_apart_and_dropped_one_at_a_time(
    cache_dir: Path,
) -> None:
    """Two hosts' files on one path: each key finds its own, and deleting one keeps the other."""
    a = write_cache_file(cache_dir, "httpa.example/x")
    b = write_cache_file(cache_dir, "httpb.example/x")
    async with CacheIndex(cache_dir, host_template()) as index:
        assert a in index
        assert index.paths_for_key("httpa.example/x") == {str(a)}
        assert index.paths_for_key("httpa.example/missing") == set()
        assert index.paths_for_url("http://a.example/nowhere") == set()
        assert sorted(index.sample_keys(1)) in (["httpa.example/x"], ["httpb.example/x"])
        a.unlink()
        await index.sync()
        assert index.paths_for_url("http://b.example/x") == {str(b)}
        assert index.paths_for_key("httpb.example/x") == {str(b)}


async def test_an_ambiguous_key_leaves_cleanly(cache_dir: Path) -> None:
    """A file whose key reads two ways is linked twice under its path; removing it unlinks
    both, and a neighbour on that path stays."""
    ambiguous = write_cache_file(cache_dir, "httpshop.example/x")
    neighbour = write_cache_file(cache_dir, "httpa.example/x")
    async with CacheIndex(cache_dir, host_template()) as index:
        ambiguous.unlink()
        await index.sync()
        assert index.paths_for_url("http://a.example/x") == {str(neighbour)}
        assert index.paths_for_host("hop.example") == set()


async def test_a_host_agnostic_file_leaves_every_host(cache_dir: Path) -> None:
    """A file serving every host, once deleted, is found for none."""
    template = KeyTemplate("$scheme$proxy_host$request_uri", "origin:8080")
    path = write_cache_file(cache_dir, "httporigin:8080/x")
    async with CacheIndex(cache_dir, template) as index:
        assert index.paths_for_host("any.example") == {str(path)}
        path.unlink()
        await index.sync()
        assert index.paths_for_host("any.example") == set()


async def test_a_removed_root_is_rescanned_once_nginx_makes_it_again(cache_dir: Path) -> None:
    """Losing the root's watch marks the index stale (logged); sync rescans, and keeps
    rescanning until the folder is back."""
    write_cache_file(cache_dir, "httph/old")
    async with CacheIndex(cache_dir, host_template(), name="edge") as index:
        shutil.rmtree(cache_dir)
        with capture_logs() as logs:
            await index.sync()  # the watch is gone: stale
            await index.sync()  # rescans a missing root: still stale
        assert len(index) == 0
        cache_dir.mkdir()
        new = write_cache_file(cache_dir, "httph/new")
        await index.sync()
        assert index.paths_for_key("httph/new") == {str(new)}
    [stale] = events(logs, "nginx_cache_index_stale")
    assert stale["cache"] == "edge"
    assert "IGNORED" in stale["reason"]
    assert stale["log_level"] == "warning"


async def test_a_folder_moved_away_is_forgotten_by_a_rescan(cache_dir: Path) -> None:
    """A folder renamed out of the cache takes its files with it: the index rescans."""
    gone = write_cache_file(cache_dir, "httph/moved")
    kept = write_cache_file(cache_dir, "httph/kept")
    top = gone.relative_to(cache_dir).parts[0]
    assert kept.relative_to(cache_dir).parts[0] != top
    async with CacheIndex(cache_dir, host_template()) as index:
        (cache_dir / top).rename(cache_dir.parent / "moved-away")
        await index.sync()
        await index.sync()
        assert gone not in index
        assert kept in index


class LimitedInotify(Inotify):
    """inotify with the kernel's watch limit reached for folders named ``full``."""

    def add_watch(self, path: Any, mask: Any) -> Any:
        if Path(path).name == "full":
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().add_watch(path, mask)


async def test_running_out_of_watches_is_logged_then_reported_with_the_fix(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that cannot be watched marks the index stale; the rescan that cannot watch
    it either fails sync with the sysctls to raise."""
    monkeypatch.setattr(nginx_index, "Inotify", LimitedInotify)
    async with CacheIndex(cache_dir, host_template()) as index:
        with capture_logs() as logs:
            (cache_dir / "full").mkdir()
            await index.sync()
        [unwatched] = events(logs, "nginx_cache_folder_unwatched")
        assert unwatched["path"] == str(cache_dir / "full")
        assert unwatched["log_level"] == "error"
        with pytest.raises(BackendError) as caught:
            await index.sync()
    assert str(caught.value) == (
        f"cannot index nginx cache folder {str(cache_dir)!r}: [Errno 28] No space left on "
        "device; raise the sysctls fs.inotify.max_user_watches / max_user_instances"
    )


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (errno.EMFILE, "; raise the sysctls fs.inotify.max_user_watches / max_user_instances"),
        (errno.EPERM, ""),
    ],
    ids=["limit", "other"],
)
async def test_an_index_that_cannot_watch_at_start_is_a_startup_error(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, code: int, hint: str
) -> None:
    """No inotify instance at start: StartupError naming the folder, the error and, for the
    limits, the fix."""

    def no_inotify(**_: object) -> None:
        raise OSError(code, "refused")

    monkeypatch.setattr(nginx_index, "Inotify", no_inotify)
    with pytest.raises(StartupError) as caught:
        async with CacheIndex(cache_dir, host_template()):
            pass
    assert str(caught.value) == (
        f"cannot index nginx cache folder {str(cache_dir)!r}: [Errno {code}] refused{hint}"
    )


async def test_files_read_ahead_without_descriptors_are_read_at_their_turn(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of descriptors while reading ahead, a file is opened again when its turn comes."""
    paths = {write_cache_file(cache_dir, f"httph/{n}") for n in range(3)}
    refused: set[str] = set()
    real_open = cache_file.open_cache_file

    def open_cache_file(path: str) -> int:
        if path not in refused:  # the first open of each file, from the read-ahead
            refused.add(path)
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path)

    monkeypatch.setattr(cache_scan, "open_cache_file", open_cache_file)
    async with CacheIndex(cache_dir, host_template()) as index:
        assert len(index) == len(paths)
        assert all(path in index for path in paths)
        assert index.skipped_invalid == 0


async def test_a_failing_listener_is_logged_and_the_file_still_indexed(cache_dir: Path) -> None:
    """on_file_added (given at construction) raising is logged with the cache and path; the
    index goes on following nginx."""

    def listener(path: str, head: object) -> None:
        raise RuntimeError(f"listener broke on {path}")

    async with CacheIndex(cache_dir, host_template(), name="edge", on_file_added=listener) as index:
        with capture_logs() as logs:
            path = write_cache_file(cache_dir, "httph/new")
            await index.sync()
        assert path in index
    [failed] = events(logs, "nginx_cache_file_listener_failed")
    assert (failed["cache"], failed["path"], failed["log_level"]) == ("edge", str(path), "error")


async def test_symlinked_folders_are_not_walked(cache_dir: Path, tmp_path: Path) -> None:
    """A symlink to a folder is not nginx's: the files behind it are not indexed."""
    outside = write_cache_file(tmp_path / "outside", "httph/outside")
    (cache_dir / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    inside = write_cache_file(cache_dir, "httph/inside")
    async with CacheIndex(cache_dir, host_template()) as index:
        assert inside in index
        assert len(index) == 1
    assert outside.exists()


async def test_a_folder_removed_during_the_scan_is_passed_by(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx's cache manager may remove a folder the scan listed: the scan goes on."""
    files = [write_cache_file(cache_dir, f"httph/{n}") for n in range(8)]
    removed = vanish_first_folder(monkeypatch, cache_dir)
    async with CacheIndex(cache_dir, host_template()) as index:
        lost = {f for f in files if str(f).startswith(removed[0] + os.sep)}
        assert {f for f in files if f in index} == set(files) - lost
        assert len(index) == len(files) - len(lost)
    assert len(files) - len(lost) > 0


async def test_a_file_that_becomes_unreadable_leaves_the_index(shared_cache_dir: Path) -> None:
    """A file rewritten where the daemon may no longer read it is dropped, not kept stale."""
    path = write_cache_file(shared_cache_dir, "httph/x", headers=["Cache-Tag: t"])
    for folder in path.parents[:2]:
        folder.chmod(0o755)
    path.chmod(0o644)
    async with CacheIndex(shared_cache_dir, host_template()) as index:
        assert index.paths_for_tag("t") == {str(path)}
        path.chmod(0o000)
        path.write_bytes(path.read_bytes())  # an in-place rewrite: IN_CLOSE_WRITE
        with reading_as_nobody():
            await index.sync()
        assert path not in index
        assert index.paths_for_tag("t") == set()
        assert index.skipped_unreadable == 1


# --- the inotify lifecycle around a scan ------------------------------------------------------


class RecordingInotify(Inotify):
    """inotify that tells the test when the index has read an event, and runs ``on_watch``
    inside the scan's worker thread as each folder is about to be watched: the seam that
    lets the test change the tree, as nginx would, while a scan is under way."""

    def __init__(self, on_watch: Callable[[Path], None] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.read_one = threading.Event()
        self.on_watch = on_watch

    def add_watch(self, path: Any, mask: Any) -> Any:
        if self.on_watch is not None:
            self.on_watch(Path(path))
        return super().add_watch(path, mask)

    def sync_get(self) -> Any:
        event = super().sync_get()
        if event is not None:
            self.read_one.set()
        return event


@dataclass
class Inotifies:
    """Every inotify the index made in this test, in order; ``on_watch`` for the next ones."""

    made: list[RecordingInotify] = field(default_factory=list)
    on_watch: Callable[[Path], None] | None = None

    def __call__(self, **kwargs: Any) -> RecordingInotify:
        self.made.append(RecordingInotify(self.on_watch, **kwargs))
        return self.made[-1]


@pytest.fixture
def inotifies(monkeypatch: pytest.MonkeyPatch) -> Inotifies:
    """The index's inotify instances made RecordingInotify, and listed."""
    made = Inotifies()
    monkeypatch.setattr(nginx_index, "Inotify", made)
    return made


def key_in(cache_dir: Path, folder: Path, name: str) -> str:
    """A key ``httph/NAME-N`` whose cache file lies in ``folder``, or, for a folder that does
    not exist, in a top-level folder not made yet."""
    for n in itertools.count():  # pragma: no branch
        key = f"httph/{name}-{n}"
        parent = cache_file_path(cache_dir, [1, 2], key).parent
        if parent == folder or (not folder.exists() and not parent.parent.exists()):
            return key
    raise AssertionError


async def test_files_changed_while_the_scan_runs_are_applied_to_its_tables(
    cache_dir: Path, inotifies: Inotifies
) -> None:
    """nginx at work while the start-up scan runs in its worker thread: the event loop reads
    the events meanwhile and applies them once the scan's tables are in place. A file the
    scan had opened and that was then deleted is gone; a file renamed into a folder already
    listed, and a folder made in the root, are found; the listener hears of those two only."""
    # Two top-level folders: once the first leaf is listed, another folder is still to come.
    a = write_cache_file(cache_dir, "httph/a")
    b = write_cache_file(cache_dir, key_in(cache_dir, cache_dir / "none", "b"))
    walked: list[Path] = []
    changed: dict[str, Path] = {}
    read_during_scan: list[bool] = []

    def change_the_tree(folder: Path) -> None:  # in the scan's thread
        leaves = [f for f in walked if len(f.relative_to(cache_dir).parts) == 2]
        walked.append(folder)
        if not leaves or changed:
            return
        # The first leaf is listed and its file opened by the read-ahead, not read yet.
        [changed["deleted"]] = [f for f in (a, b) if f.parent == leaves[0]]
        changed["deleted"].unlink()
        changed["renamed"] = write_cache_file(cache_dir, key_in(cache_dir, leaves[0], "new"))
        fresh = key_in(cache_dir, cache_dir / "none", "fresh")
        changed["in_new_folder"] = write_cache_file(cache_dir, fresh)
        # The scan goes on once the event loop has read an event, not before.
        read_during_scan.append(inotifies.made[0].read_one.wait(timeout=5))

    inotifies.on_watch = change_the_tree
    heard: list[str] = []
    index = CacheIndex(cache_dir, host_template(), on_file_added=lambda p, _: heard.append(p))
    async with index:
        assert read_during_scan == [True]
        found = {changed["renamed"], changed["in_new_folder"], *({a, b} - {changed["deleted"]})}
        assert all(path in index for path in found)
        assert len(index) == len(found) == 3
        assert changed["deleted"] not in index
    assert sorted(heard) == sorted(str(changed[k]) for k in ("renamed", "in_new_folder"))


async def test_the_loop_applies_new_files_between_syncs(cache_dir: Path) -> None:
    """Between syncs the event loop applies each file nginx puts in place as it sees it; so
    does an index entered after another one left on the same loop (whose inotify descriptor
    the new one reuses)."""
    for name in ("first", "second"):
        arrived = asyncio.Event()
        async with CacheIndex(
            cache_dir, host_template(), on_file_added=lambda *_, done=arrived: done.set()
        ) as index:
            path = write_cache_file(cache_dir, f"httph/{name}")
            async with asyncio.timeout(5):
                await arrived.wait()  # no sync(): the loop's reader applied it
            assert path in index


async def test_a_stale_index_stops_listening_until_it_rescans(
    cache_dir: Path, inotifies: Inotifies
) -> None:
    """A folder moved away makes the index stale: it stops listening to inotify (whose events
    the rescan supersedes; listening, the loop would wake for them over and over) until sync
    rescans, and listens again after."""
    moved = write_cache_file(cache_dir, "httph/moved")
    arrived = asyncio.Event()
    async with CacheIndex(
        cache_dir, host_template(), on_file_added=lambda *_: arrived.set()
    ) as index:
        (cache_dir / moved.relative_to(cache_dir).parts[0]).rename(cache_dir.parent / "away")
        stale = inotifies.made[0]
        assert await anyio.to_thread.run_sync(stale.read_one.wait, 5)
        # Nothing listens on the stale descriptor: removing a reader finds none.
        assert asyncio.get_running_loop().remove_reader(stale.fd) is False
        await index.sync()
        assert moved not in index
        path = write_cache_file(cache_dir, "httph/after")
        async with asyncio.timeout(5):
            await arrived.wait()
        assert path in index
    assert len(inotifies.made) == 2


async def test_a_folder_deleted_is_no_reason_to_rescan(cache_dir: Path) -> None:
    """A folder deleted with its files (by hand, or a tool tidying the cache): the files leave
    the index, and the folder's lost watch does not make the index stale; only the root's
    does."""
    gone = write_cache_file(cache_dir, "httph/gone")
    kept = write_cache_file(cache_dir, key_in(cache_dir, cache_dir / "none", "kept"))
    async with CacheIndex(cache_dir, host_template()) as index:
        with capture_logs() as logs:
            shutil.rmtree(cache_dir / gone.relative_to(cache_dir).parts[0])
            await index.sync()
            await index.sync()
        assert gone not in index
        assert kept in index
    assert events(logs, "nginx_cache_index_stale") == events(logs, "nginx_cache_indexed") == []


async def test_a_file_written_in_place_is_read_once_finished(cache_dir: Path) -> None:
    """A cache file created under its final name (not renamed in) is read when it is closed,
    not at its creation, when it is still empty: it is never counted invalid."""
    source = write_cache_file(cache_dir.parent / "source", "httph/in-place")
    async with CacheIndex(cache_dir, host_template()) as index:
        path = cache_dir / source.relative_to(cache_dir.parent / "source")
        path.parent.mkdir(parents=True)
        await index.sync()  # the folders are watched now
        with path.open("wb") as file:
            await index.sync()  # the file exists, empty
            assert (path not in index, index.skipped_invalid) == (True, 0)
            file.write(source.read_bytes())
        await index.sync()
        assert (path in index, index.skipped_invalid) == (True, 0)


async def test_running_out_of_watches_mid_scan_closes_the_files_read_ahead(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of watches at start, after the scan opened files ahead: StartupError with the fix,
    and every file the read-ahead had opened is closed."""
    paths = [write_cache_file(cache_dir, f"httph/{n}") for n in range(3)]
    leaf = paths[0].parent
    (leaf / "full").mkdir()  # listed with the files: watched after they are opened
    monkeypatch.setattr(nginx_index, "Inotify", LimitedInotify)
    open_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(StartupError, match="No space left on device; raise the sysctls"):
        async with CacheIndex(cache_dir, host_template()):
            pass
    assert set(os.listdir("/proc/self/fd")) == open_before
