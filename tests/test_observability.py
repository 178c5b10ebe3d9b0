"""Metrics over HTTP, `ssh bus stats`, and `drainbus check-config`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from drainbus.node import Node
from tests.conftest import User, run_ssh
from tests.nginx_env import CACHE_KEY, NginxEnv, run_nginx_env

StartNode = Callable[..., Awaitable[Node]]


def drain_settings(env: NginxEnv) -> dict[str, object]:
    return {
        "node": "web1",
        "key_host": "{key}.pages.example",
        "retry_after": 0.5,
        "nginx": [{"cache_path": str(env.cache_path), "key": "$scheme$host$request_uri"}],
    }


async def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Fetch /metrics and parse it with the Prometheus client's own parser."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


async def test_metrics_endpoint_reports_sessions_messages_purges_and_index(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv
) -> None:
    """Scraped over HTTP: sessions by command, messages, purge latency, nginx index, lag."""
    root = add_user("root")
    node = await start_bus(drain=drain_settings(nginx_env), metrics_listen="127.0.0.1:0")
    assert node.metrics_port
    nginx_env.prime("/", "acme-blog.pages.example")
    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"acme-blog\n")
    assert result.code == 0
    async with asyncio.timeout(10):
        while node.drain is not None and node.drain.stats.purges_done < 1:
            await asyncio.sleep(0.01)
    metrics = await scrape(node.metrics_port)
    sessions = metrics["drainbus_sessions_total"]
    assert sessions[(("command", "pub"), ("exit_code", "0"))] >= 1
    assert metrics["drainbus_messages_published_total"][(("topic", "cache-drain"),)] >= 1
    assert metrics["drainbus_purge_seconds_count"][(("role", "local"),)] >= 1
    assert metrics["drainbus_purges_total"][(("kind", "keys"), ("node", "web1"))] >= 1
    evicted = metrics["drainbus_objects_evicted_total"]
    assert evicted[(("node", "web1"), ("target", "nginx-1"))] >= 1
    assert (("node", "web1"), ("target", "nginx-1")) in metrics["drainbus_nginx_index_objects"]
    assert metrics["drainbus_nginx_unmatched_keys"][(("node", "web1"), ("target", "nginx-1"))] == 0
    assert (("node", "web1"), ("target", "nginx-1")) in metrics[
        "drainbus_nginx_refills_evicted_total"
    ]
    assert metrics["drainbus_connections"]
    for name in metrics:  # bounded cardinality: no label carries a URL or message
        for labels in metrics[name]:
            assert all("://" not in value for _, value in labels), (name, labels)


async def test_stats_shows_drain_health_to_admins_only(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv
) -> None:
    """`ssh bus stats --json`: groups with lag and pending, per-node status; 77 for others."""
    root = add_user("root")
    alice = add_user("alice")
    node = await start_bus(drain=drain_settings(nginx_env))
    assert (await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"x-y\n")).code == 0
    async with asyncio.timeout(10):
        while True:
            result = await run_ssh(node.port, root.key_file, "stats", "--json")
            health = json.loads(result.stdout)
            if health["nodes"] and health["nodes"][0]["purges_done"] >= 1:
                break
            await asyncio.sleep(0.1)
    assert health["topic"] == "cache-drain"
    assert {g["group"] for g in health["groups"]} == {"node-web1"}
    assert health["nodes"][0]["node"] == "web1"
    assert "nginx-1" in health["nodes"][0]["targets"]
    table = await run_ssh(node.port, root.key_file, "stats")
    assert "node-web1" in table.stdout.decode()
    refused = await run_ssh(node.port, alice.key_file, "stats")
    assert refused.code == 77


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "drainbus", *args], capture_output=True, text=True,
        timeout=30, env={**os.environ, **(env or {})}, check=False,
    )  # fmt: skip


def test_check_config_accepts_a_good_config(tmp_path: Path) -> None:
    """check-config prints a one-line summary and exits 0 for a valid config."""
    config = tmp_path / "ok.toml"
    config.write_text(f'[server]\nusers_dir = "{tmp_path}"\nadmins = ["ops"]\n')
    result = run_cli("check-config", str(config))
    assert result.returncode == 0
    assert result.stdout.startswith(f"ok: {config}")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("[drain]\nmax_deliveries = 0\n", "drain.max_deliveries", id="bad-value"),
        pytest.param('[drain.cloudflare]\nzone_id = "z"\n', "token", id="missing-token"),
        pytest.param('metrics_listen = "nowhere"\n', "metrics_listen", id="bad-metrics"),
    ],
)
def test_check_config_rejects_a_bad_config(tmp_path: Path, text: str, fragment: str) -> None:
    """check-config names the bad setting in one line and exits 78, starting nothing."""
    config = tmp_path / "bad.toml"
    config.write_text(f'{text}[server]\nusers_dir = "{tmp_path}"\n')
    result = run_cli("check-config", str(config), env={"CLOUDFLARE_API_TOKEN": ""})
    assert result.returncode == 78
    assert fragment in result.stderr
    assert result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("settings", "code", "fragments"),
    [
        pytest.param(
            'key = "$scheme$host$request_uri"',
            78,
            [
                "key template '$scheme$host$request_uri'",
                "'KEY: {proxy_pass}/docs/a?x=1'",
                'set proxy_pass = "{proxy_pass}"',
            ],
            id="wrong-template",
        ),
        pytest.param('proxy_pass = "{proxy_pass}"', 0, ["ok: "], id="default-key"),
    ],
)
def test_check_config_reads_the_nginx_cache_keys(
    tmp_path: Path, settings: str, code: int, fragments: list[str]
) -> None:
    """check-config refuses a key template that cannot read the keys nginx wrote, in one line."""
    with run_nginx_env(tmp_path / "nginx", cache_key=None) as env:
        env.prime("/docs/a?x=1", "acme-blog.pages.example")
        config = tmp_path / "drainbus.toml"
        config.write_text(
            f'[server]\nusers_dir = "{tmp_path}"\n[[drain.nginx]]\n'
            f'cache_path = "{env.cache_path}"\n{settings.format(proxy_pass=env.proxy_pass)}\n'
        )
        result = run_cli("check-config", str(config))
    assert result.returncode == code, result.stderr
    output = result.stderr if code else result.stdout
    assert output.strip().count("\n") == 0
    for fragment in fragments:
        assert fragment.format(proxy_pass=env.proxy_pass) in output


def test_check_config_passes_an_empty_or_missing_cache_folder(tmp_path: Path) -> None:
    """With nothing to read yet, any key template passes check-config."""
    (tmp_path / "empty").mkdir()
    config = tmp_path / "drainbus.toml"
    caches = "".join(
        f'[[drain.nginx]]\ncache_path = "{tmp_path / name}"\nkey = "{CACHE_KEY}"\n'
        for name in ("empty", "missing")
    )
    config.write_text(f'[server]\nusers_dir = "{tmp_path}"\n{caches}')
    result = run_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
