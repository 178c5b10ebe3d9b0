"""Purge path: from `echo url:… | ssh bus pub cache-drain` returning to the nginx cache file
being gone, and to the Cloudflare call arriving (at a local stand-in for its API); then a
burst of URL purges against the Enterprise plan's limits.

A real `drainbus serve` (bus + drain) runs against a real nginx whose cache is primed page by
page; each purge is a fresh OpenSSH `pub`, as a deploy hook would send it, on an otherwise
idle bus. Then one `pub` sends `--burst` URL purges at once, and the stand-in's record of the
calls gives the URL rate Cloudflare saw, the 429s and the largest call. `bench.run` runs it
as workload 6.

    .venv/bin/python -m bench.purge_path [N] [--burst M] [--batch-window S] [--redis-url URL]

Prints the figures as JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.server import forget_namespace  # noqa: E402
from tests.fakes.cloudflare_api import FakeCloudflare, Received  # noqa: E402
from tests.nginx_env import run_nginx_env  # noqa: E402

HOST = "acme-blog.pages.example"
BURST_HOST = "burst.pages.example"  # not cached by nginx: the burst is about Cloudflare
# The stand-in's Enterprise figures, which drainbus must stay under.
ENTERPRISE_URLS_PER_S = 3000
ENTERPRISE_FILES_PER_CALL = 500


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cache_file(cache: Path, key: str) -> Path:
    digest = hashlib.md5(key.encode()).hexdigest()
    return cache / digest[-1] / digest[-3:-1] / digest


def measure(
    count: int = 100, burst: int = 50_000, batch_window: float = 0.0, redis_url: str | None = None
) -> dict[str, Any]:
    """Run ``count`` purges one at a time, then a burst of ``burst`` URL purges (0: none).

    Returns p50/p99 of both delays in milliseconds (a Cloudflare call that arrived before
    ``pub`` returned counts as 0 and is counted in ``before_pub_returned``) and the burst's
    figures. The server uses its embedded Redis, or ``redis_url`` with a namespace of its
    own that is deleted afterwards.
    """
    work = Path(tempfile.mkdtemp(prefix="dbp-"))
    try:
        to_file, to_cloudflare, burst_figures = _purges(work, count, burst, batch_window, redis_url)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "purges": count,
        "batch_window_ms": batch_window * 1000,
        "nginx_file_gone_ms": {
            "p50": _quantile(to_file, 0.5),
            "p99": _quantile(to_file, 0.99),
            "mean": statistics.fmean(to_file),
        },
        "cloudflare_call_ms": {
            "p50": _quantile([max(0.0, d) for d in to_cloudflare], 0.5),
            "p99": _quantile([max(0.0, d) for d in to_cloudflare], 0.99),
            "max": max(to_cloudflare),
            "before_pub_returned": sum(d < 0 for d in to_cloudflare),
        },
        "burst": burst_figures,
    }


def _burst_figures(calls: list[Received], count: int, started: float) -> dict[str, Any]:
    """What Cloudflare saw of a burst of ``count`` URL purges sent from ``started`` on.

    ``urls_per_s`` is the rate Cloudflare received over the burst: the URLs of every call
    after the first, over the time from the first call to the last. ``end_to_end_urls_per_s``
    also counts the time before the first call (the ``pub`` connecting and sending): every
    URL over the time from the ``pub`` starting to the last call. ``steady_urls_per_s``
    leaves out the first second, when a full bucket allows a second's worth at once: URLs of
    the calls after the first call past that second, over the time from that call to the
    last.
    """
    accepted = [c for c in calls if c.status == 200]
    first, last = accepted[0].at, accepted[-1].at
    mark = next((i for i, c in enumerate(accepted) if c.at >= first + 1.0), len(accepted) - 1)
    after = sum(len(c.items) for c in accepted[mark + 1 :])
    span = last - accepted[mark].at
    after_first = sum(len(c.items) for c in accepted[1:])
    return {
        "urls": count,
        "urls_accepted": len({u for c in accepted for u in c.items}),
        "calls": len(calls),
        "max_urls_per_call": max(len(c.items) for c in calls),
        "responses_429": sum(c.status == 429 for c in calls),
        "other_errors": sum(c.status not in (200, 429) for c in calls),
        "seconds": last - started,
        "first_call_s": first - started,
        "urls_per_s": after_first / (last - first) if last > first else None,
        "end_to_end_urls_per_s": count / (last - started),
        "steady_urls_per_s": after / span if span > 0 else None,
        "plan_urls_per_s": ENTERPRISE_URLS_PER_S,
        "plan_files_per_call": ENTERPRISE_FILES_PER_CALL,
    }


def _purges(
    work: Path, count: int, burst: int, batch_window: float, redis_url: str | None
) -> tuple[list[float], list[float], dict[str, Any] | None]:
    """Milliseconds from each ``pub`` returning to the file gone, and to the Cloudflare call;
    then the burst's figures."""
    namespace = f"bench-{secrets.token_hex(3)}"
    key = work / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    users = work / "users"
    users.mkdir()
    (users / "root.pub").write_text(key.with_suffix(".pub").read_text())
    with run_nginx_env(work / "nginx") as env, FakeCloudflare(plan="enterprise") as cloudflare:
        config = work / "drainbus.toml"
        config.write_text(
            f'namespace = "{namespace}"\n'
            f'[server]\nlisten = "127.0.0.1:0"\nadmins = ["root"]\nusers_dir = "{users}"\n'
            f'host_keys_dir = "{work / "host"}"\n'
            f'[drain]\nnode = "bench"\nkey_host = "{{key}}.pages.example"\n'
            f'[[drain.nginx]]\ncache_path = "{env.cache_path}"\nkey = "$scheme$host$request_uri"\n'
            f'[drain.cloudflare]\nzone_id = "zone"\napi_token = "test-token"\n'
            f'api_base = "{cloudflare.api_base}"\nplan = "enterprise"\n'
            f"batch_window = {batch_window}\n"
        )
        serve = subprocess.Popen(
            [sys.executable, "-m", "drainbus", "--log-json", "serve", "--config", str(config),
             "--data-dir", str(work / "data"), "--workers", "1"],
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env={**os.environ, "DRAINBUS_REDIS_URL": redis_url or ""},
        )  # fmt: skip
        try:
            assert serve.stderr is not None
            port = 0
            for raw in serve.stderr:
                event = json.loads(raw)
                if event.get("event") == "serving":
                    port = int(event["port"])
                    break
            if not port:
                raise RuntimeError(f"drainbus serve exited {serve.wait(20)} before serving")
            # Keep reading its log so serve never blocks on a full stderr pipe.
            threading.Thread(target=serve.stderr.read, daemon=True).start()
            ssh = ["ssh", "-F", "/dev/null", "-T", "-p", str(port), "-i", str(key),
                   "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                   "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                   "root@127.0.0.1", "pub", "cache-drain"]  # fmt: skip
            to_file: list[float] = []
            to_cloudflare: list[float] = []
            for n in range(count):
                path = f"/page/{n}"
                env.prime(path, HOST)
                cache_file = _cache_file(env.cache_path, f"http{HOST}{path}")
                assert cache_file.exists(), cache_file
                url = f"http://{HOST}{path}"
                subprocess.run(ssh, input=f"url:{url}\n".encode(), check=True)
                returned = time.monotonic()
                while cache_file.exists():
                    time.sleep(0.0002)
                to_file.append((time.monotonic() - returned) * 1000)
                calls = cloudflare.wait_for(n + 1, timeout=10)
                arrived = next(c.at for c in calls if url in c.items)
                to_cloudflare.append((arrived - returned) * 1000)
            burst_figures = None
            if burst:
                before = len(cloudflare.received)
                lines = "".join(f"url:https://{BURST_HOST}/b/{n}\n" for n in range(burst))

                def all_accepted(received: list[Received]) -> bool:
                    urls = sum(len(c.items) for c in received[before:] if c.status == 200)
                    return urls >= burst

                started = time.monotonic()
                subprocess.run(ssh, input=lines.encode(), check=True)
                calls = cloudflare.wait_until(
                    all_accepted, timeout=60 + 3 * burst / ENTERPRISE_URLS_PER_S
                )
                burst_figures = _burst_figures(calls[before:], burst, started)
        finally:
            serve.terminate()
            serve.wait(20)
            if redis_url:
                asyncio.run(forget_namespace(redis_url, namespace))
    return to_file, to_cloudflare, burst_figures


def main(argv: list[str] | None = None) -> int:
    """Measure; print the figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.purge_path", description=__doc__)
    parser.add_argument("count", nargs="?", type=int, default=100, help="purges to time")
    parser.add_argument(
        "--burst", type=int, default=50_000, help="URL purges in the burst (0: no burst)"
    )
    parser.add_argument(
        "--batch-window", type=float, default=0.0, help="drain.cloudflare.batch_window, seconds"
    )
    parser.add_argument("--redis-url", help="use this Redis (default: the embedded server)")
    args = parser.parse_args(argv)
    figures = measure(args.count, args.burst, args.batch_window, args.redis_url)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
