"""Purge receipts: `pub --wait` learns what every drain node did, through real SSH and nginx.

Two drain nodes, each with its own real nginx and cache folder, share the cache-drain topic
and the Cloudflare stand-in; purges are published with the real OpenSSH client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from drainbus.drain.receipts import receipts_of, receipts_topic
from drainbus.node import Node
from tests.conftest import Subscriber, User, run_ssh
from tests.fakes.cloudflare_api import FakeCloudflare
from tests.nginx_env import NginxEnv, run_nginx_env, write_cache_file
from tests.test_drain import cloudflare, drain_config, prime

__all__ = ["cloudflare"]  # the fixture, imported for pytest

StartNode = Callable[..., Awaitable[Node]]

BLOG_PAGES = 5  # what prime() caches for acme-blog.pages.example


def named(config: dict[str, Any], name: str = "pages") -> dict[str, Any]:
    """``config`` with its nginx target named, so receipt lines are stable."""
    return {**config, "nginx": [{**n, "name": name} for n in config["nginx"]]}


def json_lines(stdout: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.decode().splitlines()]


async def test_pub_wait_returns_once_every_node_evicted_and_says_what_each_did(
    start_bus: StartNode, add_user: Callable[[str], User], cloudflare: FakeCloudflare,
    tmp_path: Path,
) -> None:  # fmt: skip
    """When `pub --wait` exits 0 every node's nginx has already dropped the pages."""
    root = add_user("root")
    with run_nginx_env(tmp_path / "n1") as env1, run_nginx_env(tmp_path / "n2") as env2:
        one = await start_bus(drain=named(drain_config(env1, cloudflare=cloudflare, node="web1")))
        await start_bus(drain=named(drain_config(env2, cloudflare=cloudflare, node="web2")))
        for env in (env1, env2):
            prime(env)
        result = await run_ssh(
            one.port, root.key_file, "pub", "cache-drain", "--wait", stdin=b"acme-blog\n"
        )
        assert (result.code, result.stderr) == (0, "")
        # No wait for the drain here: the receipt is the proof that the purge was carried out.
        for env in (env1, env2):
            assert env.get("/", "acme-blog.pages.example").cache == "MISS"
            assert env.get("/", "acme-blog2.pages.example").cache == "HIT"
        lines = sorted(result.stdout.decode().splitlines())
        assert len(lines) == 3, lines
        assert lines[0].startswith("cdn cloudflare: accepted, purge id ")
        assert lines[1].startswith(f"web1 pages: {BLOG_PAGES} objects evicted in ")
        assert lines[2].startswith(f"web2 pages: {BLOG_PAGES} objects evicted in ")
        # A bare key is its tag and its host (key_host), one call each.
        assert sorted((c.kind, c.items) for c in cloudflare.accepted) == [
            ("hosts", ["acme-blog.pages.example"]),
            ("tags", ["acme-blog"]),
        ]


async def test_pub_wait_json_says_none_cached_when_nothing_matched(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv
) -> None:
    """A purge that matched no cached object says none-cached, not evicted."""
    root = add_user("root")
    node = await start_bus(drain=named(drain_config(nginx_env)))
    prime(nginx_env)
    result = await run_ssh(
        node.port, root.key_file, "pub", "cache-drain", "--wait=5s", "--json",
        stdin=b"url:http://acme-blog.pages.example/never-cached\nacme-blog2\n",
    )  # fmt: skip
    assert (result.code, result.stderr) == (0, "")
    records = json_lines(result.stdout)
    by_purge = {r["purge"]: r for r in records}
    assert set(by_purge) == {"url:http://acme-blog.pages.example/never-cached", "acme-blog2"}
    never = by_purge["url:http://acme-blog.pages.example/never-cached"]
    assert (never["node"], never["target"], never["result"], never["count"]) == (
        "web1", "pages", "none-cached", 0
    )  # fmt: skip
    blog2 = by_purge["acme-blog2"]
    assert (blog2["result"], blog2["count"], blog2["error"]) == ("evicted", 1, None)
    assert set(blog2) == {"id", "purge", "node", "target", "result", "count", "ms", "error"}
    assert nginx_env.get("/", "acme-blog2.pages.example").cache == "MISS"


async def test_pub_wait_with_no_drain_node_says_so_and_exits_69(
    start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """Nobody drains the topic: `--wait` says so at once (69); the purge is still stored."""
    root = add_user("root")
    node = await start_bus()
    started = time.monotonic()
    result = await run_ssh(
        node.port, root.key_file, "pub", "cache-drain", "--wait=30s", stdin=b"root-site\n"
    )
    assert result.code == 69
    assert "no drain node is live" in result.stderr
    assert time.monotonic() - started < 30  # it did not wait out the 30 s
    replay = await run_ssh(
        node.port, root.key_file, "sub", "cache-drain", "--since", "all", "--count", "1"
    )
    assert replay.stdout == b"root-site\n"


async def test_pub_wait_names_a_silent_node_and_exits_75(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv
) -> None:
    """A node whose heartbeat is fresh but that never answers is named, with exit 75."""
    root = add_user("root")
    node = await start_bus(drain=named(drain_config(nginx_env)))
    # What a node that crashed a moment ago leaves behind: a fresh status, and no drain.
    keys, redis = node.bus.keys, node.bus.redis
    status = {"node": "web9", "roles": ["local"], "local_targets": ["pages"], "cdn_targets": []}
    await redis.set(keys.drain_status("web9"), json.dumps(status), px=30_000)
    await redis.zadd(keys.drain_nodes, {"web9": int(time.time() * 1000)})
    result = await run_ssh(
        node.port, root.key_file, "pub", "cache-drain", "--wait=1s", stdin=b"acme-blog\n"
    )
    assert result.code == 75
    lines = sorted(result.stdout.decode().splitlines())
    assert lines[0].startswith("web1 pages: ")
    assert lines[1] == (
        "web9 pages: not confirmed: no answer within 1 s; the purge stays stored and will be "
        "retried"
    )


async def test_pub_wait_reports_a_dead_lettered_purge_with_75(
    start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """Cloudflare refuses the purge for good: the line says dead-lettered and why; exit 75."""
    root = add_user("root")
    async with FakeCloudflare(plan="enterprise", bad_tags={"doomed"}) as fake:
        node = await start_bus(drain=drain_config(cloudflare=fake))
        result = await run_ssh(
            node.port, root.key_file, "pub", "cache-drain", "--wait", "--json",
            stdin=b"tag:doomed\n",
        )  # fmt: skip
    assert result.code == 75
    [record] = json_lines(result.stdout)
    assert (record["node"], record["target"], record["result"]) == (
        "cdn", "cloudflare", "dead-lettered"
    )  # fmt: skip
    assert "1014" in record["error"]


async def test_wait_is_refused_on_topics_without_receipts(
    start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """Only the drain topic has receipts; elsewhere --wait is a usage error (64)."""
    root = add_user("root")
    node = await start_bus()
    result = await run_ssh(node.port, root.key_file, "pub", "shared/x", "--wait", stdin=b"hi\n")
    assert result.code == 64
    assert "only 'cache-drain'" in result.stderr
    bad = await run_ssh(node.port, root.key_file, "pub", "cache-drain", "--wait=soon", stdin=b"")
    assert bad.code == 64
    assert "not a duration" in bad.stderr


async def test_sub_receipts_shows_who_purged_what_and_what_each_node_did(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv,
    subscribe: Callable[..., Awaitable[Subscriber]],
) -> None:  # fmt: skip
    """`sub cache-drain --receipts --json` follows the receipts other publishers cause."""
    root, acme = add_user("root"), add_user("acme")
    node = await start_bus(drain=named(drain_config(nginx_env)))
    prime(nginx_env)
    watcher = await subscribe(node.port, root.key_file, "cache-drain", "--receipts", "--json",
                              "--since", "1m")  # fmt: skip
    result = await run_ssh(
        node.port, acme.key_file, "pub", "cache-drain", "--wait", stdin=b"acme-blog\n"
    )
    assert result.code == 0
    record = json.loads(await watcher.line())
    assert {k: record[k] for k in ("purge", "user", "node", "target", "result", "count")} == {
        "purge": "acme-blog", "user": "acme", "node": "web1", "target": "pages",
        "result": "evicted", "count": BLOG_PAGES,
    }  # fmt: skip
    plain = await run_ssh(
        node.port, root.key_file, "sub", "cache-drain", "--receipts", "--since", "all",
        "--count", "1",
    )  # fmt: skip
    assert plain.stdout.decode().endswith(
        f" acme-blog by acme: web1 pages: {BLOG_PAGES} objects evicted in {record['ms']:g} ms\n"
    )
    refused = await run_ssh(node.port, root.key_file, "sub", "shared/x", "--receipts")
    assert refused.code == 64


async def test_every_acknowledged_purge_has_its_receipt_stored(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv
) -> None:
    """The receipt stream holds one receipt per purge entry the node acknowledged."""
    root = add_user("root")
    node = await start_bus(drain=named(drain_config(nginx_env)))
    lines = "".join(f"tag:t{n}\n" for n in range(20)).encode()
    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", "--wait", stdin=lines)
    assert result.code == 0
    keys, redis = node.bus.keys, node.bus.redis
    purges: Any = await redis.xrange(keys.stream("cache-drain"))
    receipts: Any = await redis.xrange(keys.stream(receipts_topic("cache-drain")))
    receipted = {r["id"] for entry_id, fields in receipts for r in receipts_of(entry_id, fields)}
    assert receipted == {entry_id.decode() for entry_id, _ in purges}
    groups = await redis.xinfo_groups(keys.stream("cache-drain"))
    assert [(g["name"], g["pending"]) for g in groups] == [(b"node-web1", 0)]


async def test_a_stale_refill_evicted_later_gets_a_receipt_of_its_own(
    start_bus: StartNode, add_user: Callable[[str], User], tmp_path: Path
) -> None:
    """The old page written back after the purge is evicted again, and the receipts say so."""
    root = add_user("root")
    cache = tmp_path / "cache"
    cache.mkdir()
    key = "httpacme-blog.pages.example/post/1"
    write_cache_file(cache, key, headers=['ETag: "v1"'])
    nginx = {"name": "pages", "cache_path": str(cache), "key": "$scheme$host$request_uri"}
    node = await start_bus(drain={"node": "web1", "key_host": "{key}.pages.example",
                                  "refill_window": 60, "nginx": [nginx]})  # fmt: skip
    result = await run_ssh(
        node.port, root.key_file, "pub", "cache-drain", "--wait",
        stdin=b"url:http://acme-blog.pages.example/post/1\n",
    )  # fmt: skip
    assert result.code == 0
    assert result.stdout.startswith(b"web1 pages: 1 object evicted in ")
    # A request that was in flight during the purge writes the old page back.
    refill = write_cache_file(cache, key, headers=['ETag: "v1"'])
    followed = await run_ssh(
        node.port, root.key_file, "sub", "cache-drain", "--receipts", "--since", "all",
        "--count", "2", "--json",
    )  # fmt: skip
    first, second = json_lines(followed.stdout)
    assert (first["result"], first["count"], first["refill"]) == ("evicted", 1, False)
    assert (second["id"], second["refill"]) == (first["id"], True)
    assert (second["node"], second["target"], second["result"], second["count"]) == (
        "web1", "pages", "evicted", 1
    )  # fmt: skip
    assert not refill.exists()
    plain = await run_ssh(
        node.port, root.key_file, "sub", "cache-drain", "--receipts", "--since", "all",
        "--count", "2",
    )  # fmt: skip
    assert (
        plain.stdout.decode()
        .splitlines()[1]
        .endswith("web1 pages: 1 object written back by a request in flight, evicted again")
    )


async def test_receipts_older_than_the_retention_are_trimmed(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv
) -> None:
    """The receipt stream keeps topics.retention of history, like the topic's stream."""
    root = add_user("root")
    node = await start_bus(drain=named(drain_config(nginx_env)), topics={"retention": "1h"})
    receipts = node.bus.keys.stream(receipts_topic("cache-drain"))
    ancient_ms = int(time.time() * 1000) - 2 * 3600 * 1000
    await node.bus.redis.xadd(receipts, {"d": "{}"}, id=f"{ancient_ms}-0")
    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", "--wait",
                           stdin=b"acme-blog\n")  # fmt: skip
    assert result.code == 0
    rows: Any = await node.bus.redis.xrange(receipts)
    ids = [entry_id for entry_id, _ in rows]
    assert f"{ancient_ms}-0".encode() not in ids
    assert len(ids) == 1


async def test_receipts_show_control_characters_as_escapes(
    start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """A receipt quotes a target's error text: its control characters cannot act on a terminal."""
    root = add_user("root")
    node = await start_bus()
    part = {"target": "pages", "result": "dead-lettered", "count": None, "ms": None,
            "error": "\x1b]0;pwned\x07 refused\u2028", "reference": None}  # fmt: skip
    record = {"id": "1-0", "purge": "tag:x", "user": "root", "node": "web1", "role": "local",
              "targets": [part]}  # fmt: skip
    await node.bus.redis.xadd(
        node.bus.keys.stream(receipts_topic("cache-drain")), {"d": json.dumps(record), "u": "root"}
    )
    plain = await run_ssh(node.port, root.key_file, "sub", "cache-drain", "--receipts",
                          "--since", "all", "--count", "1")  # fmt: skip
    assert plain.stdout.endswith(
        b"web1 pages: dead-lettered: \\e]0;pwned\\x07 refused\xe2\x80\xa8\n"
    )
    assert b"\x1b" not in plain.stdout
    as_json = await run_ssh(node.port, root.key_file, "sub", "cache-drain", "--receipts",
                            "--since", "all", "--count", "1", "--json")  # fmt: skip
    assert b"\\u2028" in as_json.stdout
    assert json.loads(as_json.stdout)["error"] == "\x1b]0;pwned\x07 refused\u2028"
