"""The drain end to end: purges published over real SSH evict real nginx and reach Cloudflare.

Pages are primed through a real nginx (``X-Cache-Status: HIT``); purges are published with
the real OpenSSH client; the daemon runs inside the node exactly as under ``drainbus
serve``; Cloudflare is a local server that behaves like its API.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from drainbus.drain.dead_letters import list_dead_letters, replay_dead_letters
from drainbus.node import Node
from tests.conftest import User, run_ssh, serve_process
from tests.fakes.cloudflare_api import FakeCloudflare
from tests.nginx_env import SOFT_PURGE_DIRECTIVES, NginxEnv, run_nginx_env

StartNode = Callable[..., Awaitable[Node]]

PAGES = [
    ("acme-blog.pages.example", "/"),
    ("acme-blog.pages.example", "/post/1"),
    ("acme-blog.pages.example", "/docs"),
    ("acme-blog.pages.example", "/docs/a"),
    ("acme-blog.pages.example", "/docs2"),
    ("acme-blog2.pages.example", "/"),
    ("other.pages.example", "/x"),
]


@pytest.fixture
async def cloudflare() -> AsyncIterator[FakeCloudflare]:
    async with FakeCloudflare(plan="enterprise") as fake:
        yield fake


def drain_config(
    *envs: NginxEnv, cloudflare: FakeCloudflare | None = None, node: str = "web1", **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "node": node,
        "key_host": "{key}.pages.example",
        "retry_after": 0.5,
        "nginx": [{"cache_path": str(env.cache_path), "key": "$scheme$host$request_uri"}
                  for env in envs],
    }  # fmt: skip
    if cloudflare is not None:
        config["cloudflare"] = {
            "zone_id": "zone-a",
            "api_token": "test-token",
            "api_base": cloudflare.api_base,
            "plan": "enterprise",
            "batch_window": 0.05,
        }
    return {**config, **extra}


async def wait_drained(node: Node, timeout: float = 15) -> None:
    """Until every group on cache-drain has read everything and acked it."""
    key = node.bus.keys.stream("cache-drain")
    async with asyncio.timeout(timeout):
        while True:
            groups = await node.bus.redis.xinfo_groups(key)
            if groups and all(g["lag"] == 0 and g["pending"] == 0 for g in groups):
                return
            await asyncio.sleep(0.01)


def cache_states(env: NginxEnv) -> dict[tuple[str, str], str]:
    """What nginx answers for every page: HIT if still cached, MISS if it was evicted."""
    return {(host, path): env.get(path, host).cache for host, path in PAGES}


def prime(env: NginxEnv) -> None:
    for host, path in PAGES:
        env.prime(path, host)


@pytest.mark.parametrize(
    ("line", "evicted"),
    [
        pytest.param("acme-blog", {("acme-blog.pages.example", p) for p in
                     ("/", "/post/1", "/docs", "/docs/a", "/docs2")}, id="bare-key"),
        pytest.param("tag:acme-blog2", {("acme-blog2.pages.example", "/")}, id="tag-boundary"),
        pytest.param("url:http://acme-blog.pages.example/post/1",
                     {("acme-blog.pages.example", "/post/1")}, id="url"),
        pytest.param("http://acme-blog.pages.example/post/1",
                     {("acme-blog.pages.example", "/post/1")}, id="bare-url"),
        pytest.param("host:other.pages.example", {("other.pages.example", "/x")}, id="host"),
        pytest.param("prefix:http://acme-blog.pages.example/docs",
                     {("acme-blog.pages.example", "/docs"), ("acme-blog.pages.example", "/docs/a")},
                     id="prefix-boundary"),
        pytest.param("*", set(PAGES), id="everything"),
        pytest.param('{"tags": ["acme-blog2"], "urls": ["http://other.pages.example/x"]}',
                     {("acme-blog2.pages.example", "/"), ("other.pages.example", "/x")}, id="json"),
    ],
)  # fmt: skip
async def test_purge_evicts_exactly_the_purged_objects(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv,
    line: str, evicted: set[tuple[str, str]],
) -> None:  # fmt: skip
    """After `pub cache-drain` returns and the drain catches up: MISS for purged, HIT else."""
    root = add_user("root")
    node = await start_bus(drain=drain_config(nginx_env))
    prime(nginx_env)
    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=line.encode())
    assert (result.code, result.stderr) == (0, "")
    await wait_drained(node)
    expected = {page: "MISS" if page in evicted else "HIT" for page in PAGES}
    assert cache_states(nginx_env) == expected


@pytest.mark.parametrize("nginx_directives", [SOFT_PURGE_DIRECTIVES], ids=["stale"])
async def test_soft_purge_line_leaves_pages_served_stale(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv
) -> None:
    """`soft:acme-blog` through the bus expires the site's pages: STALE, not MISS; others HIT."""
    root = add_user("root")
    node = await start_bus(drain=drain_config(nginx_env))
    prime(nginx_env)
    result = await run_ssh(
        node.port, root.key_file, "pub", "cache-drain", stdin=b"soft:acme-blog\n"
    )
    assert (result.code, result.stderr) == (0, "")
    await wait_drained(node)
    site = {page for page in PAGES if page[0] == "acme-blog.pages.example"}
    assert cache_states(nginx_env) == {page: "STALE" if page in site else "HIT" for page in PAGES}


async def test_site_owner_purges_own_site_but_not_others(
    start_bus: StartNode, add_user: Callable[[str], User], nginx_env: NginxEnv
) -> None:
    """A non-admin may purge keys and hosts they own; other lines are refused with 77."""
    acme = add_user("acme")
    node = await start_bus(drain=drain_config(nginx_env))
    prime(nginx_env)
    lines = b"acme-blog2\nother\nhost:other.pages.example\n*\nhttp://other.pages.example/x\n"
    result = await run_ssh(node.port, acme.key_file, "pub", "cache-drain", stdin=lines)
    assert result.code == 77
    for number in (2, 3, 4, 5):
        assert f"line {number}: " in result.stderr
    assert "line 1:" not in result.stderr
    await wait_drained(node)
    states = cache_states(nginx_env)
    assert states[("acme-blog2.pages.example", "/")] == "MISS"
    assert states[("other.pages.example", "/x")] == "HIT"
    assert states[("acme-blog.pages.example", "/")] == "HIT"


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        pytest.param("tag:", "empty", id="empty-tag"),
        pytest.param("tag:" + "t" * 1025, "1,024", id="long-tag"),
        pytest.param("url:ftp://x.example/", "http", id="bad-url"),
        pytest.param("frob:x", "frob", id="unknown-word"),
        pytest.param("{not json", "JSON", id="bad-json"),
        # What Cloudflare would refuse never reaches the stream (nor the dead letters).
        pytest.param("host:192.0.2.7", "is an IP address", id="host-ip"),
        pytest.param("prefix:https://h.example" + "/a" * 32, "at most 31 path separators",
                     id="prefix-32-slashes"),
        pytest.param("tag:seg café", "contains whitespace", id="tag-space"),
    ],
)  # fmt: skip
async def test_malformed_purge_is_rejected_with_65(
    start_bus: StartNode, add_user: Callable[[str], User], line: str, rule: str
) -> None:
    """A malformed purge line is named with its line number and the rule; exit 65."""
    root = add_user("root")
    node = await start_bus()
    stdin = f"root-ok\n{line}\n".encode()
    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=stdin)
    assert result.code == 65
    assert "line 2: " in result.stderr
    assert rule in result.stderr
    replay = await run_ssh(
        node.port, root.key_file, "sub", "cache-drain", "--since", "all", "--count", "1"
    )
    assert replay.stdout == b"root-ok\n"


async def test_raw_publish_to_cache_drain_is_refused(
    start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """--raw would bypass the line checks, so cache-drain refuses it (64)."""
    root = add_user("root")
    node = await start_bus()
    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", "--raw", stdin=b"*")
    assert result.code == 64


async def test_cloudflare_receives_batched_coalesced_purges(
    start_bus: StartNode, add_user: Callable[[str], User], cloudflare: FakeCloudflare
) -> None:
    """150 tag purges (with repeats) that pile up behind a call in flight become 2 calls of
    at most 100 tags."""
    root = add_user("root")
    cloudflare.hold_next(1)
    node = await start_bus(drain=drain_config(cloudflare=cloudflare))
    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"tag:first\n")
    assert result.code == 0
    await cloudflare.wait_for_async(1)  # in flight until released
    lines = [f"tag:t{n}" for n in range(150)] * 2
    result = await run_ssh(
        node.port, root.key_file, "pub", "cache-drain", stdin="\n".join(lines).encode()
    )
    assert result.code == 0
    cloudflare.release()
    await wait_drained(node)
    first, *calls = cloudflare.accepted
    assert first.items == ["first"]
    assert sorted(len(c.items) for c in calls) == [50, 100]
    assert {t for c in calls for t in c.items} == {f"t{n}" for n in range(150)}
    assert all(c.kind == "tags" and c.endpoint == "purge_cache" for c in calls)


async def test_cloudflare_5xx_is_retried_until_success(
    start_bus: StartNode, add_user: Callable[[str], User], cloudflare: FakeCloudflare
) -> None:
    """A 503 from Cloudflare is retried; the purge is acked only after a success."""
    root = add_user("root")
    cloudflare.fail_next(2, status=503)
    node = await start_bus(drain=drain_config(cloudflare=cloudflare))
    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"root-site\n")
    assert result.code == 0
    await wait_drained(node)
    # A bare key is its tag and its host (key_host): the tag call is retried, then the host's.
    assert [r.status for r in cloudflare.received] == [503, 503, 200, 200]
    assert [(c.kind, c.items) for c in cloudflare.accepted] == [
        ("tags", ["root-site"]),
        ("hosts", ["root-site.pages.example"]),
    ]


async def test_an_idle_bus_calls_cloudflare_at_once_whatever_the_batch_window(
    start_bus: StartNode, add_user: Callable[[str], User], cloudflare: FakeCloudflare
) -> None:
    """One purge on an idle bus is sent without waiting: a 60 s batch_window only caps how
    long a busy drain waits for rate-limit room, so the call arrives within the test's
    timeout."""
    root = add_user("root")
    config = drain_config(cloudflare=cloudflare)
    config["cloudflare"]["batch_window"] = 60
    node = await start_bus(drain=config)
    result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"root-site\n")
    assert result.code == 0
    calls = await cloudflare.wait_for_async(2, timeout=15)
    # A bare key is its tag and its host (key_host): one call each.
    assert [(c.kind, c.items) for c in calls] == [
        ("tags", ["root-site"]),
        ("hosts", ["root-site.pages.example"]),
    ]
    await wait_drained(node)


async def test_purges_arriving_while_a_call_is_in_flight_share_the_next_call(
    start_bus: StartNode, add_user: Callable[[str], User], cloudflare: FakeCloudflare
) -> None:
    """While Cloudflare holds the first call, later purges wait and then go in one call;
    each is acked only after its call was accepted."""
    root = add_user("root")
    cloudflare.hold_next(1)
    node = await start_bus(drain=drain_config(cloudflare=cloudflare))
    stream = node.bus.keys.stream("cache-drain")
    first = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"root-a\n")
    assert first.code == 0
    await cloudflare.wait_for_async(1)  # received, answer held
    for lines in (b"root-b\nroot-c\n", b"root-d\n", b"root-b\n"):
        result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=lines)
        assert result.code == 0
    (group,) = await node.bus.redis.xinfo_groups(stream)
    assert group["pending"] + group["lag"] == 5  # nothing acked while the call is held

    cloudflare.release()
    await wait_drained(node)
    # A bare key is its tag and its host (key_host): one call of each kind per batch.
    assert [sorted(c.items) for c in cloudflare.received if c.kind == "tags"] == [
        ["root-a"],
        ["root-b", "root-c", "root-d"],
    ]
    assert [sorted(c.items) for c in cloudflare.received if c.kind == "hosts"] == [
        ["root-a.pages.example"],
        ["root-b.pages.example", "root-c.pages.example", "root-d.pages.example"],
    ]
    assert all(c.status == 200 for c in cloudflare.received)


async def test_permanent_cloudflare_error_is_dead_lettered_and_replayable(
    start_bus: StartNode, add_user: Callable[[str], User]
) -> None:
    """A 4xx that will never succeed goes to the dead-letter stream at once; replay works."""
    root = add_user("root")
    async with FakeCloudflare(plan="enterprise", bad_tags={"doomed"}) as fake:
        node = await start_bus(drain=drain_config(cloudflare=fake))
        result = await run_ssh(
            node.port, root.key_file, "pub", "cache-drain", stdin=b"tag:doomed\n"
        )
        assert result.code == 0
        await wait_drained(node)
        letters = await list_dead_letters(node.bus.redis, node.bus.keys, "cache-drain")
        assert [(d.data, d.group, d.user) for d in letters] == [("tag:doomed", "cdn", "root")]
        assert "1014" in letters[0].error
        assert len(fake.received) == 1  # not retried: it would fail the same way

        listing = await run_ssh(node.port, root.key_file, "ls", "cache-drain", "--json")
        assert '"dead_letters": 1' in listing.stdout.decode()

        fake.bad_tags = frozenset()
        await replay_dead_letters(node.bus.redis, node.bus.keys, "cache-drain", None)
        await wait_drained(node)
        assert fake.accepted[-1].items == ["doomed"]
        assert await list_dead_letters(node.bus.redis, node.bus.keys, "cache-drain") == []


async def test_two_nodes_each_evict_their_nginx_and_cloudflare_is_called_once(
    start_bus: StartNode, add_user: Callable[[str], User], cloudflare: FakeCloudflare,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Every node evicts its own cache; the shared cdn group calls Cloudflare once."""
    root = add_user("root")
    with run_nginx_env(tmp_path / "n1") as env1, run_nginx_env(tmp_path / "n2") as env2:
        one = await start_bus(drain=drain_config(env1, cloudflare=cloudflare, node="web1"))
        two = await start_bus(drain=drain_config(env2, cloudflare=cloudflare, node="web2"))
        for env in (env1, env2):
            prime(env)
        result = await run_ssh(one.port, root.key_file, "pub", "cache-drain", stdin=b"acme-blog\n")
        assert result.code == 0
        await wait_drained(one)
        for env in (env1, env2):
            assert env.get("/", "acme-blog.pages.example").cache == "MISS"
            assert env.get("/", "acme-blog2.pages.example").cache == "HIT"
        # Once for the whole bus: the key's tag and its host (key_host), one call each.
        assert sorted((c.kind, c.items) for c in cloudflare.accepted) == [
            ("hosts", ["acme-blog.pages.example"]),
            ("tags", ["acme-blog"]),
        ]
        groups = {g["name"].decode() for g in await two.bus.redis.xinfo_groups(
            two.bus.keys.stream("cache-drain"))}  # fmt: skip
        assert groups == {"node-web1", "node-web2", "cdn"}


async def test_drain_killed_before_ack_carries_out_the_purge_after_restart(
    tmp_path: Path, users_dir: Path, add_user: Callable[[str], User], redis_url: str,
    cloudflare: FakeCloudflare,
) -> None:  # fmt: skip
    """SIGKILL between receiving a purge and acking it: the restarted daemon still sends it."""
    root = add_user("root")
    config = tmp_path / "drain.toml"
    config.write_text(
        f'namespace = "{tmp_path.name}"\n'
        f'[server]\nlisten = "127.0.0.1:0"\nadmins = ["root"]\nusers_dir = "{users_dir}"\n'
        f'host_keys_dir = "{tmp_path / "host"}"\n'
        '[drain]\nnode = "web1"\nretry_after = "1s"\n'
        f'[drain.cloudflare]\nzone_id = "zone-a"\napi_token = "test-token"\n'
        f'api_base = "{cloudflare.api_base}"\nplan = "enterprise"\nbatch_window = 0.05\n'
        "timeout = 30\n"
    )
    env = {"DRAINBUS_REDIS_URL": redis_url}
    cloudflare.hang_next(1)
    async with serve_process("--config", str(config), env=env) as node:
        result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"root-x\n")
        assert result.code == 0
        await cloudflare.wait_for_async(1)  # the call is in flight: received, not acked
        node.proc.send_signal(signal.SIGKILL)
        await node.proc.wait()
    assert cloudflare.accepted == []
    async with serve_process("--config", str(config), env=env):
        calls = await cloudflare.wait_for_async(2, timeout=15)
        assert calls[-1].status == 200
        assert calls[-1].items == ["root-x"]
