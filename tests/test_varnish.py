"""The http_purge target against a real Varnish running the shipped examples/varnish VCL.

Pages are primed through Varnish (``X-Varnish`` naming two requests is a HIT); purges are
published with the real OpenSSH client and carried out by the drain with the
``[[drain.http_purge]]`` entry of examples/varnish/drainbus.toml, pointed at this Varnish.
Every purge kind must evict what it names and leave everything else cached.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import User, run_ssh
from tests.nginx_env import Origin
from tests.test_drain import StartNode, wait_drained
from tests.varnish_env import EXAMPLES, VarnishEnv, run_varnish_env

SITE = "acme-blog.pages.example"

PAGES = [
    (SITE, "/"),
    (SITE, "/post/1"),
    (SITE, "/docs"),
    (SITE, "/docs/a"),
    (SITE, "/docs?page=2"),
    (SITE, "/docs2"),
    (SITE, "/caf%C3%A9"),
    ("acme-blog2.pages.example", "/"),
    ("other.pages.example", "/x"),
]


def http_purge_config(env: VarnishEnv) -> dict[str, Any]:
    """The shipped ``[[drain.http_purge]]`` entry, sent to this Varnish instead of :6081."""
    text = (EXAMPLES / "drainbus.toml").read_text()
    text = text.replace("127.0.0.1:6081", f"127.0.0.1:{env.varnish.port}")
    (entry,) = tomllib.loads(text)["drain"]["http_purge"]
    assert isinstance(entry, dict)
    return entry


def drain_config(env: VarnishEnv) -> dict[str, Any]:
    return {
        "node": "web1",
        "key_host": "{key}.pages.example",
        "retry_after": 0.5,
        "http_purge": [http_purge_config(env)],
    }


async def publish(
    start_bus: StartNode, user: User, env: VarnishEnv, *lines: str
) -> None:  # fmt: skip
    """Start a node draining into ``env``'s Varnish, publish ``lines``, wait until drained."""
    node = await start_bus(drain=drain_config(env))
    data = "".join(line + "\n" for line in lines).encode()
    result = await run_ssh(node.port, user.key_file, "pub", "cache-drain", stdin=data)
    assert (result.code, result.stderr) == (0, "")
    await wait_drained(node)


def cache_states(env: VarnishEnv, pages: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """What Varnish answers for every page: HIT if still cached, MISS if it was evicted."""
    return {(host, path): env.get(path, host).cache for host, path in pages}


@pytest.fixture
def varnish_site(tmp_path: Path) -> Iterator[VarnishEnv]:
    """Varnish in front of an origin that also tags /post/* pages with ``posts``."""
    with run_varnish_env(tmp_path / "varnish", Origin(path_tags={"/post/": ["posts"]})) as env:
        for host, path in PAGES:
            env.prime(path, host)
        yield env


@pytest.mark.parametrize(
    ("line", "evicted"),
    [
        pytest.param("acme-blog", {p for p in PAGES if p[0] == SITE}, id="bare-key"),
        pytest.param("tag:acme-blog2", {("acme-blog2.pages.example", "/")}, id="tag-boundary"),
        pytest.param("tag:posts", {(SITE, "/post/1")}, id="path-tag"),
        pytest.param(f"url:http://{SITE}/post/1", {(SITE, "/post/1")}, id="url"),
        pytest.param(f"https://{SITE}/docs?page=2", {(SITE, "/docs?page=2")}, id="url-query"),
        pytest.param(f"http://{SITE}/caf%c3%a9", {(SITE, "/caf%C3%A9")}, id="url-escape-case"),
        pytest.param("host:other.pages.example", {("other.pages.example", "/x")}, id="host"),
        pytest.param(f"prefix:http://{SITE}/docs",
                     {(SITE, "/docs"), (SITE, "/docs/a"), (SITE, "/docs?page=2")},
                     id="prefix-boundary"),
        pytest.param(f"prefix:https://{SITE}/docs/", {(SITE, "/docs/a")}, id="prefix-slash"),
        pytest.param("*", set(PAGES), id="everything"),
        pytest.param('{"tags": ["acme-blog2"], "urls": ["http://other.pages.example/x"], '
                     f'"prefixes": ["http://{SITE}/post"]}}',
                     {("acme-blog2.pages.example", "/"), ("other.pages.example", "/x"),
                      (SITE, "/post/1")}, id="json"),
    ],
)  # fmt: skip
async def test_purge_evicts_exactly_the_purged_objects(
    start_bus: StartNode, add_user: Callable[[str], User], varnish_site: VarnishEnv,
    line: str, evicted: set[tuple[str, str]],
) -> None:  # fmt: skip
    """After `pub cache-drain` and the drain: MISS for what the purge names, HIT for the rest."""
    await publish(start_bus, add_user("root"), varnish_site, line)
    expected = {page: "MISS" if page in evicted else "HIT" for page in PAGES}
    assert cache_states(varnish_site, PAGES) == expected
