"""Evicting nginx cache files: deleting or expiring them in worker threads.

One job: carry out a batch of evictions the nginx target (:mod:`drainbus.drain.nginx`) has
looked up, reading each purge's validators first for its refill window
(:mod:`drainbus.drain.refill`), and say per purge how many files went and which failed.
Blocking file-system calls only run here, in threads, never on the event loop.

The threads are anyio's (``anyio.to_thread.run_sync``): at most 40 at once per process by its
default limiter, shared with the other worker-thread calls, of which this takes at most
four. A purge cancelled meanwhile waits for its threads to finish (anyio does not abandon
them), so no deletion is still running unseen once a cancelled purge has returned.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import anyio
import anyio.to_thread

from drainbus.drain.cache_file import cache_files, expire_cache_file
from drainbus.drain.refill import read_validators

__all__ = ["Job", "JobOutcome", "carry_out", "expire_tree", "unlink_tree"]


def _unlink_files(paths: Iterable[str]) -> tuple[int, list[tuple[str, OSError]]]:
    # A file nginx replaced since it was indexed is deleted all the same (its name is the
    # key's), and one already gone is evicted: neither is an error. The index learns of the
    # deletions from inotify, in order with any file nginx writes again meanwhile.
    removed, failed = 0, []
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed.append((path, exc))
        else:
            removed += 1
    return removed, failed


# A large batch is deleted by several threads at once: an unlink waits on the file system's
# journal, not on Python (about 70 us each on ext4), and files in different folders do not
# contend. 1,000 files took 73 ms in one thread, 49 ms in four.
_UNLINK_THREADS = 4
_UNLINK_PER_THREAD_MIN = 128


class Job(NamedTuple):
    """One purge of a batch: its files, and whether to expire them and read validators."""

    number: int
    paths: list[str]
    soft: bool
    read_validators: bool


#: Per job: files evicted, validators read before (for its refill window), failures.
JobOutcome = tuple[int, dict[str, set[str | None]], list[tuple[str, Exception]]]


def _evict_paths(paths: Iterable[str], soft: bool) -> tuple[int, list[tuple[str, Exception]]]:
    if soft:
        return _expire_files(paths)
    removed, failed = _unlink_files(paths)
    return removed, list[tuple[str, Exception]](failed)


def _read_validators(job: Job) -> tuple[dict[str, set[str | None]], list[str]]:
    """The validators of the job's files (if its window wants them), and the files to evict.

    A file found gone while reading validators is not deleted again: one syscall per absent
    file, not two. Should nginx put it in place meanwhile, that is a refill the job's window
    sees (it was opened before), so it is still evicted.
    """
    if not job.read_validators:
        return {}, job.paths
    present: list[str] = []
    return read_validators(job.paths, present=present), present


def _carry_out_here(jobs: Sequence[Job]) -> list[JobOutcome]:
    # Every validator is read before any file is deleted: two purges of a batch may match
    # one file, and each window must know what its purge evicted.
    read = [_read_validators(job) for job in jobs]
    outcomes: list[JobOutcome] = []
    for job, (found, paths) in zip(jobs, read, strict=True):
        count, failed = _evict_paths(paths, job.soft)
        outcomes.append((count, found, failed))
    return outcomes


def _carry_out_part(
    jobs: Sequence[Job], paths: Sequence[list[str]], part: int, parts: int
) -> list[tuple[int, list[tuple[str, Exception]]]]:
    return [
        _evict_paths(job_paths[part::parts], job.soft)
        for job, job_paths in zip(jobs, paths, strict=True)
    ]


async def carry_out(jobs: Sequence[Job]) -> list[JobOutcome]:
    """Evict every job's files: one worker thread for a small batch, a few for a large one."""
    total = sum(len(job.paths) for job in jobs)
    threads = max(1, min(_UNLINK_THREADS, total // _UNLINK_PER_THREAD_MIN))
    if threads == 1:
        return await anyio.to_thread.run_sync(_carry_out_here, jobs)
    read = await anyio.to_thread.run_sync(lambda: [_read_validators(job) for job in jobs])
    paths = [job_paths for _, job_paths in read]
    # Absent files are known now: only the ones present are worth more threads.
    total = sum(len(job_paths) for job_paths in paths)
    threads = max(1, min(_UNLINK_THREADS, total // _UNLINK_PER_THREAD_MIN))
    parts: list[list[tuple[int, list[tuple[str, Exception]]]]] = [[] for _ in range(threads)]

    async def carry_out_part(n: int) -> None:
        parts[n] = await anyio.to_thread.run_sync(_carry_out_part, jobs, paths, n, threads)

    async with anyio.create_task_group() as group:
        for n in range(threads):
            group.start_soon(carry_out_part, n)
    outcomes: list[JobOutcome] = []
    for number, (found, _) in enumerate(read):
        count, failed = 0, list[tuple[str, Exception]]()
        for part in parts:
            count += part[number][0]
            failed += part[number][1]
        outcomes.append((count, found, failed))
    return outcomes


def unlink_tree(root: Path) -> tuple[int, list[tuple[str, OSError]]]:
    return _unlink_files(cache_files(root))


def _expire_files(paths: Iterable[str]) -> tuple[int, list[tuple[str, Exception]]]:
    # Stale or gone already is done; a header of an unknown version is left alone and
    # reported, as is a file that cannot be written.
    expired, failed = 0, list[tuple[str, Exception]]()
    for path in paths:
        try:
            expired += expire_cache_file(path)
        except (OSError, ValueError) as exc:
            failed.append((path, exc))
    return expired, failed


def expire_tree(root: Path) -> tuple[int, list[tuple[str, Exception]]]:
    """Expire every cache file under ``root`` (walked, not taken from an index)."""
    return _expire_files(cache_files(root))
