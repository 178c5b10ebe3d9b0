"""Benchmark drainbus against its floors, in one run, and print the figures.

    .venv/bin/python -m bench.run [--quick] [--json PATH] [--redis-url URL] [--only NAME,...]
                                  [--workers N]

Each workload starts a real ``drainbus serve`` (on the embedded Redis-compatible server
unless ``--redis-url`` is given), measures it, then runs the matching floor program from
``../shared/bench-floor/`` against the same Redis, and reports drainbus, floor, their ratio
and the target. Figures are printed, never judged: the exit status is non-zero only when a
workload could not run at all (a bug), never because a figure missed its target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import floors as floor_programs
from bench.report import WorkloadResult, print_table, write_json
from bench.server import make_key
from bench.workloads import FULL, QUICK, WORKLOADS, Bench

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark drainbus against the floor programs, in one run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny counts: every workload path in well under 30 s (CI smoke mode)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the table as JSON")
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="use this Redis for drainbus and the floors (default: drainbus's embedded server)",
    )
    parser.add_argument(
        "--only",
        metavar="NAME,...",
        help=f"run only these workloads: {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run each drainbus serve under cProfile, writing DIR/WORKLOAD.prof",
    )
    parser.add_argument(
        "--no-floor", action="store_true", help="measure drainbus only (empty floor column)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run drainbus serve --workers N (default 1, a single process like each floor; "
        "0: one per CPU)",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in (args.only or "").split(",") if n.strip()] or list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {', '.join(unknown)}: choose from {', '.join(WORKLOADS)}")
    args.names = names
    return args


def _raise_file_limit() -> None:
    # Thousands of subscribers need thousands of sockets, in this process's children too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def _run(bench: Bench, names: list[str]) -> list[WorkloadResult]:
    results = []
    for name in names:
        title, workload = WORKLOADS[name]
        result = WorkloadResult(name, title)
        print(f"-- {title} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            await workload(bench, result)
        except Exception as exc:
            result.status = "failed"
            result.error = f"{type(exc).__name__}: {exc}"
            result.rows.clear()
        result.seconds = round(time.perf_counter() - started, 1)
        print(f"   {result.status} in {result.seconds:.1f} s", file=sys.stderr, flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the selected workloads; print the table; return the exit status."""
    args = _parse(argv)
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            print(
                f"bench: OpenSSH's {tool} is not on PATH; install openssh-client", file=sys.stderr
            )
            return 69
    _raise_file_limit()
    floors = not args.no_floor and floor_programs.floor_dir() is not None
    if not args.no_floor and not floors:
        print(f"bench: floor column unavailable: no floor programs in {floor_programs.FLOOR_DIR}")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    # Short: the embedded server's unix socket path must stay under 108 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="dbb-"))
    try:
        bench = Bench(
            sizes=QUICK if args.quick else FULL,
            workdir=workdir,
            key=make_key(workdir / "id_bench"),
            redis_url=args.redis_url,
            profile_dir=args.profile,
            floors=floors,
            workers=args.workers,
        )
        started = datetime.now(UTC)
        results = asyncio.run(_run(bench, args.names))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(results)
    if args.json:
        write_json(args.json, _meta(args, started, floors), results)
    return 1 if any(r.status == "failed" for r in results) else 0


def _meta(args: argparse.Namespace, started: datetime, floors: bool) -> dict[str, Any]:
    return {
        "started": started.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "redis": "external" if args.redis_url else "embedded",
        "workers": args.workers,
        "floors": str(floor_programs.FLOOR_DIR) if floors else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    sys.exit(main())
