"""The example Prometheus rules and Grafana dashboard: valid, tested, and only about metrics
drainbus really exports.

``promtool`` (Debian's ``prometheus`` package; ``scripts/check`` installs it as root) checks
the rules, runs their unit tests, and parses every dashboard query through a rules file. The
names they use are compared with a live node's ``/metrics`` after real purges went through
nginx and (the local fake of) Cloudflare.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from drainbus.bus.persistence import state_from_info
from drainbus.node import Node
from tests.conftest import User, run_ssh
from tests.fakes.cloudflare_api import FakeCloudflare
from tests.nginx_env import NginxEnv
from tests.test_drain import drain_config, prime, wait_drained
from tests.test_http_api import ZONE, http_config, make_token

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RULES = EXAMPLES / "prometheus" / "drainbus.rules.yml"
RULES_TEST = EXAMPLES / "prometheus" / "drainbus.rules.test.yml"
DASHBOARD = EXAMPLES / "grafana" / "drainbus.json"
_METRIC = re.compile(r"\bdrainbus_[a-z0-9_]+")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: sudo apt-get install prometheus")
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def rule_expressions() -> list[str]:
    return re.findall(r"^\s*expr:\s*(.+)$", RULES.read_text(), flags=re.MULTILINE)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


def as_rules_file(path: Path, queries: list[str]) -> Path:
    """``queries`` as recording rules, so ``promtool check rules`` parses each (JSON is YAML).
    Grafana's ``$__rate_interval`` becomes the range Grafana would put there."""
    rules = [
        {"record": f"dashboard:query_{n}", "expr": query.replace("$__rate_interval", "5m")}
        for n, query in enumerate(queries)
    ]
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    return path


def test_rules_pass_promtool_check() -> None:
    """The rules file is valid: every expression parses, every alert is well-formed."""
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_pass_their_unit_tests() -> None:
    """promtool test rules: each alert fires (and only) where drainbus.rules.test.yml says."""
    result = promtool("test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests are real: a wrong expectation makes promtool fail."""
    shutil.copy(RULES, tmp_path / RULES.name)
    wrong = RULES_TEST.read_text().replace("is behind (70 entries)", "is behind (71 entries)")
    (tmp_path / RULES_TEST.name).write_text(wrong)
    result = promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "71 entries" in result.stdout + result.stderr


def test_dashboard_has_the_panels_operators_need() -> None:
    """Purges by kind and result, both latencies, lag, dead letters, subscribers, connections."""
    titles = {title for title, _ in dashboard_queries()}
    assert {
        "Purges per second by kind",
        "Purge results per second",
        "pub → nginx gone (local caches)",
        "pub → Cloudflare",
        "Lag per drain node",
        "Dead letters",
        "Subscribers per node",
        "Connections per node",
    } <= titles


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool parses each panel's PromQL."""
    queries = [query for _, query in dashboard_queries()]
    result = promtool("check", "rules", str(as_rules_file(tmp_path / "d.yml", queries)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_a_query_that_does_not_parse_is_caught(tmp_path: Path) -> None:
    """The parse check can fail: an unclosed call is refused."""
    query = "sum(rate(drainbus_purges_total[$__rate_interval])"
    result = promtool("check", "rules", str(as_rules_file(tmp_path / "d.yml", [query])))
    assert result.returncode != 0


def test_persistence_state_reads_info_persistence() -> None:
    """A failed AOF write fails the state; on Cluster, one primary failing is enough."""
    ok = {"aof_enabled": 1, "aof_last_write_status": "ok", "rdb_last_bgsave_status": "ok"}
    assert state_from_info(ok).ok
    failing = state_from_info({**ok, "aof_last_write_status": "err"})
    assert failing.failures == ("aof_last_write_status=err",)
    cluster = {"10.0.0.1:6379": ok, "10.0.0.2:6379": {**ok, "rdb_last_bgsave_status": "err"}}
    assert state_from_info(cluster).failures == ("rdb_last_bgsave_status=err",)


async def test_rules_and_dashboard_name_only_exported_metrics(
    start_bus: Callable[..., Awaitable[Node]],
    add_user: Callable[[str], User],
    users_dir: Path,
    nginx_env: NginxEnv,
) -> None:
    """Every drainbus_* series a rule or panel reads is on a live node's /metrics."""
    root = add_user("root")
    token = make_token(users_dir, "acme")
    async with FakeCloudflare(plan="enterprise") as cloudflare:
        node = await start_bus(
            drain=drain_config(nginx_env, cloudflare=cloudflare),
            http=http_config(),
            metrics_listen="127.0.0.1:0",
        )
        prime(nginx_env)
        result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"acme-blog\n")
        assert result.code == 0, result.stderr
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{node.http_port}/client/v4/zones/{ZONE}/purge_cache",
                json={"tags": ["acme-blog2"]},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert response.status_code == 200
            await wait_drained(node)
            text = (await client.get(f"http://127.0.0.1:{node.metrics_port}/metrics")).text
    exported = {
        name
        for family in text_string_to_metric_families(text)
        for name in (family.name, *(sample.name for sample in family.samples))
    }
    used = {name for expr in rule_expressions() for name in _METRIC.findall(expr)}
    used |= {name for _, query in dashboard_queries() for name in _METRIC.findall(query)}
    assert len(used) > 15  # the pattern finds them
    assert sorted(used - exported) == []
