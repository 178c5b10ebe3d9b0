"""The Cloudflare forwarder against a local fake of the purge API."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr, ValidationError

import drainbus.drain.cloudflare as cloudflare_module
from drainbus.drain.cloudflare import (
    CloudflareForwarder,
    CloudflareZoneConfig,
    PlanLimits,
    ZoneConfigError,
)
from drainbus.drain.purges import Purge, parse_purge
from drainbus.drain.retry import (
    RateInfo,
    RetryPolicy,
    TokenBucket,
    parse_ratelimit,
    parse_retry_after,
)
from tests.fakes import FakeCloudflare, Received

TOKEN = "test-token"
FAST = RetryPolicy(base=0.01, cap=0.05, max_attempts=4, max_retry_after=2.0)

MakeFake = Callable[..., FakeCloudflare]
MakeForwarder = Callable[..., AbstractAsyncContextManager[CloudflareForwarder]]


@pytest.fixture
def make_fake() -> Iterator[MakeFake]:
    """Start fakes on demand; stop them all at the end of the test."""
    started: list[FakeCloudflare] = []

    def make(**options: Any) -> FakeCloudflare:
        fake = FakeCloudflare(**options)
        fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def fake(make_fake: MakeFake) -> FakeCloudflare:
    """A fake Free-plan account that knows TOKEN."""
    return make_fake()


def zone(fake: FakeCloudflare, zone_id: str = "zone-a", **options: Any) -> CloudflareZoneConfig:
    """A zone config pointing at the fake, with TOKEN unless told otherwise."""
    options.setdefault("api_token", SecretStr(TOKEN))
    return CloudflareZoneConfig(zone_id=zone_id, api_base=fake.api_base, **options)


@pytest.fixture
def forwarder() -> MakeForwarder:
    """Open a forwarder with fast retries (overridable) for the test's zones."""

    @asynccontextmanager
    async def open_forwarder(
        *zones: CloudflareZoneConfig, **options: Any
    ) -> AsyncIterator[CloudflareForwarder]:
        options.setdefault("retry", FAST)
        async with CloudflareForwarder(zones, **options) as fwd:
            yield fwd

    return open_forwarder


def by_zone(calls: list[Received]) -> dict[tuple[str, str, str | None], list[Any]]:
    """Accepted items keyed by (zone, endpoint, kind)."""
    out: dict[tuple[str, str, str | None], list[Any]] = {}
    for call in calls:
        out.setdefault((call.zone, call.endpoint, call.kind), []).extend(call.items)
    return out


def tags(*names: str) -> Purge:
    return Purge(tags=frozenset(names))


def urls(*names: str, soft: bool = False) -> Purge:
    return Purge(urls=frozenset(names), soft=soft)


# -- batching, coalescing, routing --------------------------------------------------------


async def test_many_tag_purges_pack_into_calls_of_at_most_100(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """250 tag purges become three calls of at most 100 tags that together carry every tag."""
    purges = [tags(f"site-{i}") for i in range(250)]
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply(purges)

    assert {o.status for o in outcomes} == {"done"}
    assert [len(c.items) for c in fake.accepted] == [100, 100, 50]
    assert sorted(t for c in fake.accepted for t in c.items) == sorted(
        f"site-{i}" for i in range(250)
    )


@pytest.mark.parametrize(
    ("plan", "sizes"), [("free", [100] * 6), ("enterprise", [500, 100])], ids=["free", "enterprise"]
)
async def test_url_calls_carry_up_to_the_plan_limit(
    make_fake: MakeFake, forwarder: MakeForwarder, plan: str, sizes: list[int]
) -> None:
    """URL purges are packed 100 per call, 500 on Enterprise."""
    fake = make_fake(plan=plan)
    purges = [urls(f"https://a.example/p/{i}") for i in range(600)]
    async with forwarder(zone(fake, plan=plan)) as fwd:
        outcomes = await fwd.apply(purges)

    assert {o.status for o in outcomes} == {"done"}
    assert [len(c.items) for c in fake.accepted] == sizes
    assert {c.kind for c in fake.accepted} == {"files"}


async def test_duplicate_purges_are_coalesced(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """Repeated tags, keys and URLs are sent once, and every purge that asked is done."""
    purges = [
        tags("a", "b"),
        tags("b", "a"),
        Purge(keys=frozenset({"a"})),
        urls("https://a.example/x"),
        urls("https://a.example/x"),
    ]
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply(purges)

    assert [o.status for o in outcomes] == ["done"] * 5
    assert by_zone(fake.accepted) == {
        ("zone-a", "purge_cache", "tags"): ["a", "b"],
        ("zone-a", "purge_cache", "files"): ["https://a.example/x"],
    }


async def test_purges_are_routed_to_zones_by_host(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """URLs and hosts go to the most specific zone (else the catch-all); tags go everywhere."""
    zones = [
        zone(fake, "exact", hosts=["a.example", "shop.b.example"]),
        zone(fake, "wild", hosts=["*.b.example"]),
        zone(fake, "rest", hosts=[]),
    ]
    purges = [
        urls("https://A.example/1"),
        urls("https://www.b.example/2"),
        urls("https://shop.b.example/3"),
        urls("https://elsewhere.example/4"),
        Purge(hosts=frozenset({"b.example"})),  # the apex is not covered by *.b.example
        tags("t"),
    ]
    async with forwarder(*zones) as fwd:
        outcomes = await fwd.apply(purges)

    assert {o.status for o in outcomes} == {"done"}
    assert by_zone(fake.accepted) == {
        ("exact", "purge_cache", "files"): ["https://A.example/1", "https://shop.b.example/3"],
        ("wild", "purge_cache", "files"): ["https://www.b.example/2"],
        ("rest", "purge_cache", "files"): ["https://elsewhere.example/4"],
        ("rest", "purge_cache", "hosts"): ["b.example"],
        ("exact", "purge_cache", "tags"): ["t"],
        ("wild", "purge_cache", "tags"): ["t"],
        ("rest", "purge_cache", "tags"): ["t"],
    }


async def test_a_host_no_zone_serves_is_done_without_a_call(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """With no catch-all zone, a URL on a foreign host needs no call and counts as unrouted."""
    async with forwarder(zone(fake, hosts=["a.example"])) as fwd:
        outcomes = await fwd.apply([urls("https://other.example/x")])
        stats = fwd.stats()

    assert [o.status for o in outcomes] == ["done"]
    assert fake.received == []
    assert stats.unrouted == 1


async def test_prefixes_are_sent_without_scheme(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """A prefix is sent as host/path; a prefix at the root becomes a host purge."""
    purge = Purge(prefixes=frozenset({"https://a.example/docs", "http://b.example/"}))
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([purge])

    assert [o.status for o in outcomes] == ["done"]
    assert by_zone(fake.accepted) == {
        ("zone-a", "purge_cache", "prefixes"): ["a.example/docs"],
        ("zone-a", "purge_cache", "hosts"): ["b.example"],
    }


async def test_soft_purges_and_invalidate_zones_use_invalidate_cache(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """Soft purges, and every purge of a zone in invalidate mode, go to invalidate_cache."""
    zones = [
        zone(fake, "hard", hosts=["h.example"]),
        zone(fake, "soft", hosts=["s.example"], mode="invalidate"),
    ]
    purges = [
        urls("https://h.example/soft", soft=True),
        urls("https://h.example/hard"),
        urls("https://s.example/any"),
    ]
    async with forwarder(*zones) as fwd:
        outcomes = await fwd.apply(purges)

    assert {o.status for o in outcomes} == {"done"}
    assert by_zone(fake.accepted) == {
        ("hard", "invalidate_cache", "files"): ["https://h.example/soft"],
        ("hard", "purge_cache", "files"): ["https://h.example/hard"],
        ("soft", "invalidate_cache", "files"): ["https://s.example/any"],
    }


async def test_purge_everything_absorbs_the_zones_other_calls(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """A zone's purge_everything replaces its other calls, and their purges depend on it."""
    purges = [urls("https://a.example/x", soft=True), tags("t"), Purge(everything=True)]
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply(purges)

    assert [o.status for o in outcomes] == ["done"] * 3
    assert [(c.endpoint, c.body) for c in fake.accepted] == [
        ("purge_cache", {"purge_everything": True})
    ]


async def test_the_purge_id_reaches_the_outcome(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """A done purge's reference is the id Cloudflare answered its call with; a purge carried
    by several calls has all their ids."""
    purges = [
        tags("a"),
        urls("https://a.example/x"),
        Purge(tags=frozenset({"b"}), urls=frozenset({"https://a.example/y"})),
    ]
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply(purges)

    ids = {call.kind: call.reference for call in fake.accepted}
    assert None not in ids.values()
    assert len(set(ids.values())) == 2
    assert [o.status for o in outcomes] == ["done"] * 3
    assert outcomes[0].reference == ids["tags"]
    assert outcomes[1].reference == ids["files"]
    assert set((outcomes[2].reference or "").split(",")) == {ids["tags"], ids["files"]}


async def test_a_success_without_a_purge_id_is_done_without_reference(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """Cloudflare's id is kept when given; an answer without one is still a success."""
    fake.fail_next(1, status=200, body={"success": True, "errors": [], "result": None})
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([tags("a")])

    assert [(o.status, o.reference) for o in outcomes] == [("done", None)]


async def test_busy_for_says_when_the_last_calls_bucket_has_room(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """0 while the bucket the last batch spent from has room; once it is spent, the wait for
    its next token; a batch of the other kind switches to that kind's bucket."""
    limits = {"free": PlanLimits(calls_per_second=0.01, calls_bucket=1, urls_per_second=800)}
    async with forwarder(zone(fake), limits=limits) as fwd:
        assert fwd.busy_for() == 0
        await fwd.apply([urls("https://a.example/x")])
        assert fwd.busy_for() == 0  # 799 URL tokens left
        await fwd.apply([tags("a")])
        assert fwd.busy_for() > 60  # the only call token is spent: the next in 111 s
        await fwd.apply([urls("https://a.example/y")])
        assert fwd.busy_for() == 0


# -- rate limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [True, False], ids=["rate-headers", "local-bucket-only"])
async def test_a_burst_is_paced_without_429(
    make_fake: MakeFake, forwarder: MakeForwarder, headers: bool
) -> None:
    """Ten calls' worth against a 2-token bucket refilling at 20/s draws no 429."""
    fake = make_fake(bucket=(2, 20), ratelimit_headers=headers)
    limits = {"free": PlanLimits(calls_per_second=20, calls_bucket=2, urls_per_second=800)}
    purges = [tags(f"t{i}") for i in range(1000)]
    async with forwarder(zone(fake), limits=limits) as fwd:
        outcomes = await fwd.apply(purges)
        stats = fwd.stats()

    assert {o.status for o in outcomes} == {"done"}
    assert len(fake.accepted) == 10
    assert [r.status for r in fake.rejected] == []
    assert stats.rate_limited == 0


async def test_ratelimit_header_lowers_the_local_bucket(
    make_fake: MakeFake, forwarder: MakeForwarder
) -> None:
    """A forwarder that believes in a big bucket still draws no 429 when the server says less."""
    fake = make_fake(bucket=(3, 20))
    limits = {"free": PlanLimits(calls_per_second=1000, calls_bucket=100, urls_per_second=800)}
    async with forwarder(zone(fake), limits=limits) as fwd:
        outcomes = await fwd.apply([tags(f"t{i}") for i in range(800)])

    assert {o.status for o in outcomes} == {"done"}
    assert len(fake.accepted) == 8
    assert fake.rejected == []


async def test_429_retry_after_is_honoured(fake: FakeCloudflare, forwarder: MakeForwarder) -> None:
    """After a 429 with Retry-After the retry waits that long, then succeeds."""
    fake.fail_next(1, status=429, code=1134, message="slow down", headers={"Retry-After": "0.3"})
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([tags("t")])
        stats = fwd.stats()

    first, second = fake.received
    assert [o.status for o in outcomes] == ["done"]
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.28
    assert (stats.rate_limited, stats.retries) == (1, 1)


async def test_a_retry_after_beyond_the_limit_gives_up_at_once(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """A Retry-After beyond max_retry_after is retry_later at once, and so are calls after it."""
    fake.fail_next(1, status=429, code=1134, message="slow down", headers={"Retry-After": "3600"})
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([tags("t")])
        stats = fwd.stats()
        later = await fwd.apply([tags("u")])

    assert outcomes[0].status == "retry_later"
    assert "HTTP 429" in (outcomes[0].error or "")
    assert stats.tokens_left == {"token of zone zone-a": 0.0}
    assert later[0].status == "retry_later"
    assert "rate limit allows the next call in 3600 s" in (later[0].error or "")
    assert len(fake.received) == 1


# -- retries and failures --------------------------------------------------------------------


async def test_5xx_is_retried_until_it_succeeds(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """Two 503s then success: the purge is done after three calls and two retries."""
    fake.fail_next(2, status=503)
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([tags("t")])
        stats = fwd.stats()

    assert [o.status for o in outcomes] == ["done"]
    assert [r.status for r in fake.received] == [503, 503, 200]
    assert stats.retries == 2
    assert stats.calls == {"done": 1}


async def test_a_timeout_is_retried(fake: FakeCloudflare, forwarder: MakeForwarder) -> None:
    """A call the server never answers times out and is retried."""
    fake.hang_next(1)
    async with forwarder(zone(fake, timeout=0.2)) as fwd:
        outcomes = await fwd.apply([tags("t")])

    assert [o.status for o in outcomes] == ["done"]
    assert [r.status for r in fake.received] == [None, 200]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (502, None, "HTTP 502"),
        (200, {"success": False, "errors": [{"code": 5, "message": "odd"}]}, "error 5: odd"),
    ],
    ids=["502", "200-success-false"],
)
async def test_transient_failures_past_the_limit_are_retry_later(
    fake: FakeCloudflare,
    forwarder: MakeForwarder,
    status: int,
    body: dict[str, Any] | None,
    expected: str,
) -> None:
    """A failure that outlasts max_attempts leaves the purge for redelivery, saying why."""
    fake.fail_next(10, status=status, body=body)
    retry = RetryPolicy(base=0.01, cap=0.02, max_attempts=3)
    async with forwarder(zone(fake), retry=retry) as fwd:
        outcomes = await fwd.apply([tags("t")])
        stats = fwd.stats()

    assert outcomes[0].status == "retry_later"
    assert expected in (outcomes[0].error or "")
    assert len(fake.received) == 3
    assert stats.calls == {"retry_later": 1}
    assert stats.last_error == outcomes[0].error


async def test_an_unreachable_api_is_retry_later(forwarder: MakeForwarder) -> None:
    """Connection refused on every try is a transient failure, not a permanent one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = CloudflareZoneConfig(
        zone_id="zone-a", api_token=SecretStr(TOKEN), api_base=f"http://127.0.0.1:{port}/v4"
    )
    async with forwarder(config, retry=RetryPolicy(base=0.01, max_attempts=2)) as fwd:
        outcomes = await fwd.apply([tags("t")])

    assert outcomes[0].status == "retry_later"
    assert "ConnectError" in (outcomes[0].error or "")


async def test_a_refusal_is_permanent_with_cloudflares_code_and_message(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """A 400 with a code that can never succeed is not retried; the outcome carries the zone,
    the code and the message."""
    fake.fail_next(1, status=400, code=1014, message="Bad things happened")
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([tags("t")])

    assert outcomes[0].status == "permanent"
    assert "zone-a" in (outcomes[0].error or "")
    assert "HTTP 400, error 1014: Bad things happened" in (outcomes[0].error or "")
    assert len(fake.received) == 1


RATE_LIMITED = (
    "Unable to purge, rate limit reached. Please wait and consider throttling your request speed"
)


@pytest.mark.parametrize("status", [400, 200, 503], ids=["400", "200", "503"])
async def test_a_rate_limit_code_is_retried_whatever_the_status(
    fake: FakeCloudflare, forwarder: MakeForwarder, status: int
) -> None:
    """Cloudflare's rate-limit code 1134 is retried after its Retry-After, then the purge is
    done."""
    fake.fail_next(
        1, status=status, code=1134, message=RATE_LIMITED, headers={"Retry-After": "0.2"}
    )
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([tags("t")])
        stats = fwd.stats()

    assert [o.status for o in outcomes] == ["done"]
    first, second = fake.received
    assert (first.code, second.code) == (1134, None)
    assert second.at - first.at >= 0.18
    assert (stats.rate_limited, stats.retries) == (1, 1)


@pytest.mark.parametrize(
    ("status", "code"),
    [(500, 10000), (503, 7003), (502, 1014)],
    ids=["auth-on-500", "zone-on-503", "item-on-502"],
)
async def test_a_code_that_can_never_succeed_is_permanent_whatever_the_status(
    fake: FakeCloudflare, forwarder: MakeForwarder, status: int, code: int
) -> None:
    """Authentication, zone not found and invalid items are not retried, even on a 5xx."""
    fake.fail_next(1, status=status, code=code, message="refused")
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([tags("t")])

    assert outcomes[0].status == "permanent"
    assert f"error {code}: refused" in (outcomes[0].error or "")
    assert len(fake.received) == 1


async def test_a_4xx_with_a_code_not_known_to_be_final_is_retried(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """Only codes that can never succeed are permanent: an unknown one is retried."""
    fake.fail_next(1, status=400, code=1234, message="something new")
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([tags("t")])

    assert [o.status for o in outcomes] == ["done"]
    assert len(fake.received) == 2


async def test_the_fake_rate_limits_with_cloudflares_code(
    make_fake: MakeFake, forwarder: MakeForwarder
) -> None:
    """The stand-in's own 429 carries 1134 and the API reference's message."""
    fake = make_fake(bucket=(1, 0.001))
    status, payload, headers = fake.handle("/client/v4/zones/z/purge_cache", f"Bearer {TOKEN}",
                                           json.dumps({"tags": ["a"]}).encode())  # fmt: skip
    assert status == 200
    status, payload, headers = fake.handle("/client/v4/zones/z/purge_cache", f"Bearer {TOKEN}",
                                           json.dumps({"tags": ["b"]}).encode())  # fmt: skip
    assert status == 429
    assert payload["errors"] == [{"code": 1134, "message": RATE_LIMITED}]
    assert "Retry-After" in headers


async def test_a_bad_item_fails_only_its_own_purge(
    make_fake: MakeFake, forwarder: MakeForwarder
) -> None:
    """When a shared call is refused, bisection leaves only the culprit permanent."""
    fake = make_fake(bad_tags={"evil"})
    purges = [tags("ok1"), tags("evil"), tags("ok2", "ok1"), tags("ok3")]
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply(purges)

    assert [o.status for o in outcomes] == ["done", "permanent", "done", "done"]
    assert "error 1014" in (outcomes[1].error or "")
    assert {t for c in fake.accepted for t in c.items} == {"ok1", "ok2", "ok3"}


async def test_an_auth_failure_is_permanent_for_every_purge(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """A wrong token is one refused call (no bisection) and a permanent outcome for all."""
    async with forwarder(zone(fake, api_token=SecretStr("wrong"))) as fwd:
        outcomes = await fwd.apply([tags("a"), tags("b"), tags("c")])

    assert {o.status for o in outcomes} == {"permanent"}
    assert "error 10000: Authentication error" in (outcomes[0].error or "")
    assert len(fake.received) == 1


async def test_purges_cloudflare_would_refuse_fail_without_a_call(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """A too-long tag or a prefix with a query is permanent locally; the rest still goes out."""
    purges = [
        tags("x" * 1025),
        Purge(prefixes=frozenset({"https://a.example/docs?page=2"})),
        tags("fine"),
    ]
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply(purges)

    assert [o.status for o in outcomes] == ["permanent", "permanent", "done"]
    assert "1025 characters" in (outcomes[0].error or "")
    assert "query string" in (outcomes[1].error or "")
    assert [c.items for c in fake.received] == [["fine"]]


@pytest.mark.parametrize(
    ("purge", "rule"),
    [
        pytest.param(Purge(hosts=frozenset({"192.0.2.7"})), "IP address", id="host-ip"),
        pytest.param(Purge(prefixes=frozenset({"https://a.example" + "/a" * 32})),
                     "more than 31 path separators", id="prefix-32-slashes"),
        pytest.param(tags("seg café"), "space", id="tag-space"),
        pytest.param(tags("a,b"), "comma", id="tag-comma"),
    ],
)  # fmt: skip
async def test_stored_purges_cloudflare_refuses_fail_without_a_call(
    fake: FakeCloudflare, forwarder: MakeForwarder, purge: Purge, rule: str
) -> None:
    """Entries stored before pub refused these are permanent locally, never a refused call."""
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([purge, tags("fine")])

    assert [o.status for o in outcomes] == ["permanent", "done"]
    assert rule in (outcomes[0].error or "")
    assert [c.items for c in fake.received] == [["fine"]]


@pytest.mark.parametrize(
    "body",
    [
        {"hosts": ["192.0.2.7"]},
        {"prefixes": ["a.example" + "/a" * 32]},
        {"tags": ["seg café"]},
    ],
    ids=["host-ip", "prefix-32-slashes", "tag-space"],
)
def test_the_fake_refuses_what_cloudflare_refuses(
    fake: FakeCloudflare, body: dict[str, Any]
) -> None:
    """The stand-in answers these with a 400 as the real API does, so no test relies on them."""
    status, payload, _ = fake.handle(
        "/client/v4/zones/zone-a/purge_cache", f"Bearer {TOKEN}", json.dumps(body).encode()
    )
    assert status == 400
    assert payload["success"] is False


@pytest.mark.parametrize(
    ("purge", "kind", "item"),
    [
        pytest.param(Purge(prefixes=frozenset({"https://h.example:8443/docs"})), "prefixes",
                     "h.example:8443/docs", id="prefix-keeps-port"),
        pytest.param(urls("https://h.example:8443/docs/x"), "files",
                     "https://h.example:8443/docs/x", id="url-keeps-port"),
        pytest.param(Purge(prefixes=frozenset({"https://h.example:443/docs"})), "prefixes",
                     "h.example/docs", id="prefix-drops-default-port"),
        pytest.param(urls("https://h.example:443/docs/x"), "files", "https://h.example/docs/x",
                     id="url-drops-default-port"),
        pytest.param(Purge(prefixes=frozenset({"http://h.example:8080/"})), "prefixes",
                     "h.example:8080/", id="root-prefix-with-port-stays-a-prefix"),
        pytest.param(Purge(prefixes=frozenset({"http://h.example:80/"})), "hosts",
                     "h.example", id="root-prefix-default-port-is-the-host"),
    ],
)  # fmt: skip
async def test_urls_and_prefixes_follow_one_port_rule(
    fake: FakeCloudflare, forwarder: MakeForwarder, purge: Purge, kind: str, item: str
) -> None:
    """Cloudflare: "include the port unless it is the default for the scheme", for both."""
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([purge])

    assert [o.status for o in outcomes] == ["done"]
    assert [(c.kind, c.items) for c in fake.accepted] == [(kind, [item])]


GERMAN_MOBILE = {"Accept-Language": "de", "CF-Device-Type": "mobile"}


async def test_urls_with_headers_are_forwarded_unchanged(
    fake: FakeCloudflare, forwarder: MakeForwarder
) -> None:
    """A JSON urls entry with headers reaches Cloudflare as {"url", "headers"}, as given."""
    line = json.dumps({"urls": [
        {"url": "https://a.example/x", "headers": GERMAN_MOBILE},
        {"url": "https://a.example/x", "headers": {"Accept-Language": "fr"}},
        "https://a.example/x",
        "https://a.example/y",
    ]})  # fmt: skip
    async with forwarder(zone(fake)) as fwd:
        outcomes = await fwd.apply([parse_purge(line)])

    assert [o.status for o in outcomes] == ["done"]
    sent = sorted(
        (json.dumps(item, sort_keys=True) for c in fake.accepted for item in c.items), key=str
    )
    assert sent == sorted(
        [
            json.dumps({"url": "https://a.example/x", "headers": GERMAN_MOBILE}, sort_keys=True),
            json.dumps({"url": "https://a.example/x", "headers": {"Accept-Language": "fr"}},
                       sort_keys=True),
            json.dumps("https://a.example/x"),
            json.dumps("https://a.example/y"),
        ],
        key=str,
    )  # fmt: skip
    # Objects and plain URLs never share a call: they are the two forms of "files".
    for call in fake.accepted:
        assert len({type(item) for item in call.items}) == 1


# -- secrets and configuration -------------------------------------------------------------


async def test_the_token_never_appears_in_repr_logs_or_errors(
    make_fake: MakeFake,
    forwarder: MakeForwarder,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The token stays out of config repr, ValidationError, structlog and stdlib logs, outcomes."""
    secret = "sekrit-0123456789abcdef"
    fake = make_fake(tokens={secret: "acct"})
    other = make_fake()  # does not know the secret: 403
    config = zone(fake, "good", api_token=SecretStr(secret), hosts=["a.example"], timeout=0.2)
    refused = zone(other, "refused", api_token=SecretStr(secret), hosts=["b.example"])
    texts = [repr(config), str(config), config.model_dump_json(), repr(config.model_dump())]
    with pytest.raises(ValidationError) as invalid:
        CloudflareZoneConfig(zone_id="z", api_tokn=secret)  # type: ignore[call-arg]
    texts.append(str(invalid.value))

    fake.fail_next(1, status=503)
    fake.hang_next(1)
    caplog.set_level(logging.DEBUG)
    # A fresh logger: one cached after an earlier test configured logging would bypass
    # capture, and this test would then find no token in no events.
    monkeypatch.setattr(cloudflare_module, "_log", structlog.get_logger(cloudflare_module.__name__))
    with structlog.testing.capture_logs() as events:
        async with forwarder(config, refused) as fwd:
            outcomes = await fwd.apply([urls("https://a.example/x"), urls("https://b.example/y")])
            texts.append(repr(fwd.stats()))

    assert [o.status for o in outcomes] == ["done", "permanent"]
    assert any(e["event"] == "request_retry" for e in events)
    texts += [repr(events), caplog.text, repr(outcomes)]
    assert all(secret not in text for text in texts)


@pytest.mark.parametrize(
    ("explicit", "file_text", "env", "expected"),
    [
        ("from-config", "from-file\n", "from-env", "from-config"),
        (None, "  from-file\n", "from-env", "from-file"),
        (None, None, "from-env", "from-env"),
    ],
    ids=["explicit-first", "then-file", "then-environment"],
)
def test_token_resolution_order(
    tmp_path: Path, explicit: str | None, file_text: str | None, env: str, expected: str
) -> None:
    """api_token beats api_token_file (stripped), which beats CLOUDFLARE_API_TOKEN."""
    token_file = None
    if file_text is not None:
        token_file = tmp_path / "token"
        token_file.write_text(file_text)
    config = CloudflareZoneConfig(
        zone_id="zone-a",
        api_token=SecretStr(explicit) if explicit else None,
        api_token_file=token_file,
    )
    token = config.resolve_token({"CLOUDFLARE_API_TOKEN": env})
    assert token.get_secret_value() == expected


@pytest.mark.parametrize("where", ["nowhere", "empty-file", "missing-file"])
def test_a_missing_token_is_a_config_error_naming_the_zone(tmp_path: Path, where: str) -> None:
    """No usable token fails at start-up with an error that names the zone."""
    token_file = None
    if where == "empty-file":
        token_file = tmp_path / "token"
        token_file.write_text("\n")
    elif where == "missing-file":
        token_file = tmp_path / "absent"
    config = CloudflareZoneConfig(zone_id="zone-q", api_token_file=token_file)
    with pytest.raises(ZoneConfigError, match="zone-q") as caught:
        CloudflareForwarder([config], environ={})
    assert caught.value.zone == "zone-q"


@pytest.mark.parametrize(
    "host", ["https://a.example", "a.example:8080", "a.example/docs", "*.", "a..example"]
)
def test_zone_hosts_must_be_host_names(host: str) -> None:
    """A scheme, port, path or empty label in hosts is rejected when the config is loaded."""
    with pytest.raises(ValidationError, match="host"):
        CloudflareZoneConfig(zone_id="z", hosts=[host])


# -- the pacing parts on their own -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), ("0.25", 0.25), ("Thu, 01 Jan 1970 00:00:10 GMT", 5.0), ("soon", None)],
    ids=["seconds", "fraction", "http-date", "garbage"],
)
def test_retry_after_parsing(value: str, expected: float | None) -> None:
    """Retry-After is read as seconds or as an HTTP date, and garbage is ignored."""
    assert parse_retry_after(value, now=lambda: 5.0) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"default";r=20;t=3', RateInfo(20, 3)),
        ("limit=100, remaining=5, reset=7", RateInfo(5, 7)),
        ('"a";r=9;t=1, "b";r=2;t=4.5', RateInfo(2, 4.5)),
        ("nonsense", None),
    ],
    ids=["structured", "draft-7", "two-policies", "garbage"],
)
def test_ratelimit_parsing(value: str, expected: RateInfo | None) -> None:
    """Ratelimit headers are read leniently; the most restrictive policy wins."""
    assert parse_ratelimit(value) == expected


async def test_token_bucket_spends_waits_and_pauses() -> None:
    """The bucket spends its burst, then waits for refill; pause and r=0 hold it for their time."""
    now = [0.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(round(seconds, 6))
        now[0] += seconds

    bucket = TokenBucket(2, 10, clock=lambda: now[0], sleep=sleep)
    assert [(await bucket.acquire()).waited for _ in range(3)] == [0, 0, pytest.approx(0.1)]
    bucket.pause(1.0)
    assert (await bucket.acquire()).waited == pytest.approx(1.0)
    bucket.observe(RateInfo(remaining=0, reset=0.5))
    assert (await bucket.acquire()).waited == pytest.approx(0.5)
    now[0] += 10
    bucket.observe(RateInfo(remaining=1, reset=3))
    assert bucket.tokens == 1
    bucket.pause(2.0)
    assert bucket.delay() == pytest.approx(2.0)
    assert waits == [0.1, 1.0, 0.5]


async def test_settling_counts_a_spend_when_its_answer_arrived() -> None:
    """Refill while the bucket was full and the request in flight is not counted twice."""
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    bucket = TokenBucket(2, 10, clock=lambda: now[0], sleep=sleep)
    spend = await bucket.acquire()  # full bucket: 2 -> 1
    now[0] += 0.05  # the answer comes 50 ms later; the early count says 1.5
    bucket.settle(spend)
    assert bucket.tokens == pytest.approx(1.0)
    spend = await bucket.acquire()  # 1 -> 0, not full: settling changes nothing
    now[0] += 0.05
    bucket.settle(spend)
    assert bucket.tokens == pytest.approx(0.5)
