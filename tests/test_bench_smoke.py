"""The benchmark suite still runs: ``python -m bench.run --quick`` measures every workload.

Only behaviour is checked (it runs, every workload reports numeric drainbus figures), never
timing: benchmarks print figures, they do not fail on them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEASURED = (
    "latency",
    "throughput",
    "fanout",
    "oneshot",
    "capacity",
    "purge",
    "nginx_index",
    "drain",
    "durability",
    "sessions",
)
# Workloads without a floor program, and figures each must report (the start of their names).
FLOORLESS = {
    "purge": ("pub returns -> nginx file gone", "pub returns -> Cloudflare call"),
    "nginx_index": ("index build, cold", "index build, warm", "tag lookup", "tag purge"),
    "receipts": ("pub --wait, 2 nginx nodes", "Redis CPU while"),
    "fairness": ("another user's purge behind", "the burst's purges carried out"),
    "durability": ("publish p50, os", "publish p50, fsync", "publish p50, replica"),
    "sessions": ("serve RSS growth, sessions", "short sessions per second"),
}


# Every workload starts real servers (and two nginx for the receipts one): about a minute
# on a busy 2-core machine, so this one test gets longer than the suite's 30 s default.
@pytest.mark.timeout(240)
def test_quick_bench_reports_every_workload(tmp_path: Path) -> None:
    """Every workload runs against a real drainbus and reports numeric figures."""
    report = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "bench.run", "--quick", "--json", str(report)]
    if os.environ.get("DRAINBUS_TEST_REDIS_URL"):
        argv += ["--redis-url", os.environ["DRAINBUS_TEST_REDIS_URL"]]
    # A session of its own: if it hangs, the whole tree (bench.run, the servers and helper
    # processes it started) is killed, not just bench.run, leaving orphans serving on.
    bench = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = bench.communicate(timeout=200)
    finally:
        if bench.returncode is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.communicate()

    assert bench.returncode == 0, out + err
    workloads = json.loads(report.read_text())["workloads"]
    for name in MEASURED:
        assert workloads[name]["status"] == "measured", workloads[name]
        figures = {row["figure"]: row["drainbus"] for row in workloads[name]["rows"]}
        assert figures, name
        for figure, value in figures.items():
            assert isinstance(value, int | float), (name, figure, value)
            assert math.isfinite(value), (name, figure, value)
            assert value >= 0, (name, figure, value)
    for name, expected in FLOORLESS.items():
        workload = workloads[name]
        assert workload["has_floor"] is False, workload
        assert all(row["floor"] is None for row in workload["rows"]), workload
        for start in expected:
            assert any(row["figure"].startswith(start) for row in workload["rows"]), (name, start)
