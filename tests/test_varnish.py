"""The http_purge target against a real Varnish running the shipped examples/varnish VCL.

Pages are primed through Varnish (``X-Varnish`` naming two requests is a HIT); purges are
published with the real OpenSSH client and carried out by the drain with the
``[[drain.http_purge]]`` entry of examples/varnish/drainbus.toml, pointed at this Varnish.
Every purge kind must evict what it names and leave everything else cached.
"""

from __future__ import annotations

import subprocess
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import User, run_ssh
from tests.fakes.cloudflare_api import FakeCloudflare
from tests.nginx_env import Origin, run_nginx_env
from tests.test_drain import StartNode, wait_drained
from tests.varnish_env import EXAMPLES, VarnishEnv, find_varnishd, run_varnish_env, varnish_env

__all__ = ["varnish_env"]  # the fixture, for pytest

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


@pytest.mark.parametrize(
    ("primed", "line"),
    [
        pytest.param((SITE, "/caf%c3%a9"), f"url:http://{SITE}/caf%C3%A9", id="lower-primed"),
        pytest.param((SITE, "/caf%C3%A9"), f"url:http://{SITE}/caf%c3%a9", id="upper-primed"),
        pytest.param((SITE, "/s?q=%e2%9C%93"), f"url:http://{SITE}/s?q=%E2%9c%93", id="query"),
        pytest.param(("ACME-Blog.Pages.Example", "/post/1"), f"url:http://{SITE}/post/1",
                     id="host-case"),
        pytest.param((SITE, "/d%c3%a9/x"), f"prefix:http://{SITE}/d%C3%a9", id="prefix"),
        pytest.param((SITE, "/d%C3%A9/x"), f"prefix:http://{SITE}/d%c3%a9/", id="prefix-slash"),
    ],
)  # fmt: skip
async def test_url_and_prefix_purges_evict_every_case_spelling(
    start_bus: StartNode, add_user: Callable[[str], User], varnish_env: VarnishEnv,
    primed: tuple[str, str], line: str,
) -> None:  # fmt: skip
    """Percent-escape and Host case do not matter: the object a client cached is purged."""
    neighbours = [(SITE, "/caf%C3%A9s"), (SITE, "/d%C3%A9x"), (SITE, "/post/12")]
    for host, path in [primed, *neighbours]:
        varnish_env.prime(path, host)
    await publish(start_bus, add_user("root"), varnish_env, line)
    expected = {primed: "MISS"} | dict.fromkeys(neighbours, "HIT")
    assert cache_states(varnish_env, [primed, *neighbours]) == expected


@pytest.mark.parametrize(
    ("primed", "purged"),
    [
        pytest.param("/A", "/%41", id="escaped-unreserved"),
        pytest.param("/s?b=2&a=1", "/s?a=1&b=2", id="query-order"),
        pytest.param("/s?", "/s", id="empty-query"),
    ],
)
async def test_spellings_the_readme_lists_as_not_covered_are_other_objects(
    start_bus: StartNode, add_user: Callable[[str], User], varnish_env: VarnishEnv,
    primed: str, purged: str,
) -> None:  # fmt: skip
    """What docs/drain.md says a URL purge does not reach: keep it true, or update it."""
    varnish_env.prime(primed, SITE)
    varnish_env.prime(purged, SITE)
    await publish(start_bus, add_user("root"), varnish_env, f"url:http://{SITE}{purged}")
    assert cache_states(varnish_env, [(SITE, primed), (SITE, purged)]) == {
        (SITE, primed): "HIT",
        (SITE, purged): "MISS",
    }


@dataclass
class WatchedOrigin(Origin):
    """An origin a test can wait on until a given number of requests reached it."""

    _arrived: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def count(self) -> int:
        n = super().count()
        with self._arrived:
            self._arrived.notify_all()
        return n

    def wait_for_hits(self, hits: int, timeout: float = 10.0) -> None:
        with self._arrived:
            if not self._arrived.wait_for(lambda: self.hits >= hits, timeout):
                pytest.fail(f"the origin got {self.hits} requests, expected {hits}")


def test_vcl_takes_xkey_softpurge_and_serves_stale_while_refetching(tmp_path: Path) -> None:
    """PURGE with xkey-softpurge: tagged objects are served stale once and refetched."""
    origin = WatchedOrigin(path_tags={"/post/": ["posts"]})
    with run_varnish_env(tmp_path / "varnish", origin) as env:
        post = env.prime("/post/1", SITE)
        other = env.prime("/x", "other.pages.example")
        hits = origin.hits
        response = env.client.request(
            "PURGE", env.varnish.base + "/", headers={"xkey-softpurge": "posts"}
        )
        assert (response.status_code, response.reason_phrase) == (200, "Soft-purged 1 objects")
        assert env.get("/post/1", SITE) == post  # stale, within the default grace
        origin.wait_for_hits(hits + 1)  # the background refetch
        assert env.get("/x", "other.pages.example") == other


def test_shipped_default_vcl_compiles(tmp_path: Path) -> None:
    """examples/varnish/default.vcl and the drainbus.vcl it includes compile as shipped."""
    done = subprocess.run(
        [find_varnishd(), "-C", "-n", str(tmp_path / "n"), "-f", str(EXAMPLES / "default.vcl"),
         "-p", f"vcl_path={EXAMPLES}"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("line", ["tag:mixedcase", "tag:MIXEDCASE"])
async def test_tag_purge_ignores_ascii_case_as_cloudflare_does(
    start_bus: StartNode, add_user: Callable[[str], User], tmp_path: Path, line: str
) -> None:
    """The shipped VCL stores and purges tags lower-cased: any case of a tag evicts it."""
    origin = Origin(path_tags={"/mixed/": ["MixedCase"]})
    with run_varnish_env(tmp_path / "varnish", origin) as env:
        env.prime("/mixed/1", SITE)
        env.prime("/other", SITE)
        await publish(start_bus, add_user("root"), env, line)
        assert cache_states(env, [(SITE, "/mixed/1"), (SITE, "/other")]) == {
            (SITE, "/mixed/1"): "MISS",
            (SITE, "/other"): "HIT",
        }


async def test_non_ascii_tag_is_published_and_purged(
    start_bus: StartNode, add_user: Callable[[str], User], tmp_path: Path
) -> None:
    """`pub` accepts `tag:seg-café` and the drain sends it (UTF-8) to Varnish's xkey."""
    origin = Origin(path_tags={"/cafe/": ["seg-café"]})
    with run_varnish_env(tmp_path / "varnish", origin) as env:
        env.prime("/cafe/1", SITE)
        env.prime("/other", SITE)
        await publish(start_bus, add_user("root"), env, "tag:seg-café")
        assert cache_states(env, [(SITE, "/cafe/1"), (SITE, "/other")]) == {
            (SITE, "/cafe/1"): "MISS",
            (SITE, "/other"): "HIT",
        }


def _label_tags_except_untagged(host: str, path: str) -> list[str]:
    """The origin tags pages with their host's first label, but not /untagged ones."""
    return [] if path.startswith("/untagged") else [host.split(".", 1)[0]]


async def test_a_bare_key_is_its_tag_and_its_host_on_every_target(
    start_bus: StartNode, add_user: Callable[[str], User], tmp_path: Path
) -> None:
    """`acme-blog` with key_host: nginx and Varnish evict the host's pages, tagged or not, and
    Cloudflare gets the tag and the host; the neighbour acme-blog2 is left alone."""
    blog, blog2 = SITE, "acme-blog2.pages.example"
    pages = [(blog, "/"), (blog, "/untagged"), (blog2, "/"), (blog2, "/untagged")]
    with (
        run_nginx_env(tmp_path / "nginx", Origin(tags_for=_label_tags_except_untagged)) as nginx,
        run_varnish_env(
            tmp_path / "varnish", Origin(tags_for=_label_tags_except_untagged)
        ) as varnish,
        FakeCloudflare(plan="enterprise") as cloudflare,
    ):
        for host, path in pages:
            nginx.prime(path, host)
            varnish.prime(path, host)
        config = drain_config(varnish) | {
            "nginx": [{"cache_path": str(nginx.cache_path), "key": "$scheme$host$request_uri"}],
            "cloudflare": {"zone_id": "zone-a", "api_token": "test-token",
                           "api_base": cloudflare.api_base, "plan": "enterprise"},
        }  # fmt: skip
        root = add_user("root")
        node = await start_bus(drain=config)
        result = await run_ssh(node.port, root.key_file, "pub", "cache-drain", stdin=b"acme-blog\n")
        assert (result.code, result.stderr) == (0, "")
        await wait_drained(node)

        expected = {page: "MISS" if page[0] == blog else "HIT" for page in pages}
        assert {(h, p): nginx.get(p, h).cache for h, p in pages} == expected
        assert cache_states(varnish, pages) == expected
        assert sorted((c.kind, c.items) for c in cloudflare.accepted) == [
            ("hosts", [blog]),
            ("tags", ["acme-blog"]),
        ]
