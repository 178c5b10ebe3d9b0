"""The Cloudflare-compatible purge API, driven by the official ``cloudflare`` SDK and curl.

The node runs exactly as under ``drainbus serve --http-listen``; purges go through the real
drain into a real nginx; tokens are made by the same code as ``drainbus tokens add``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import cloudflare
import httpx
import pytest
import structlog

from drainbus import cloudflare_codes as codes
from drainbus.config import Settings
from drainbus.errors import BackendUnavailable, ConfigError, LimitExceeded
from drainbus.http.app import _as_fault
from drainbus.http.tokens import TokenStore
from drainbus.node import Node, open_node
from tests.conftest import serve_process
from tests.nginx_env import NginxEnv
from tests.test_drain import PAGES, cache_states, drain_config, prime, wait_drained
from tests.test_serve import write_config

StartNode = Callable[..., Awaitable[Node]]
ZONE = "023e105f4ecef8ad9ca31a8372d0c353"
KEY_HOST = "{key}.pages.example"  # so a user's sites are hosts too (drain.key_host)


def make_token(users_dir: Path, name: str) -> str:
    return TokenStore(users_dir).add(name, acl_topics=["cache-drain"], owner_separator="-")


def http_config(**extra: Any) -> dict[str, Any]:
    return {"listen": "127.0.0.1:0", "zones": [ZONE], **extra}


@pytest.fixture
async def sdk() -> AsyncIterator[Callable[[Node, str], cloudflare.AsyncCloudflare]]:
    """An SDK client for a node and a token, pointed at drainbus by ``base_url`` alone."""
    clients: list[cloudflare.AsyncCloudflare] = []

    def make(node: Node, token: str) -> cloudflare.AsyncCloudflare:
        client = cloudflare.AsyncCloudflare(
            api_token=token,
            base_url=f"http://127.0.0.1:{node.http_port}/client/v4",
            max_retries=0,  # a refusal must reach the test, not be retried
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def stored(node: Node) -> list[tuple[str, dict[bytes, bytes]]]:
    """Every entry on cache-drain: (id, fields)."""
    entries: Any = await node.bus.redis.xrange(node.bus.keys.stream("cache-drain"))
    return [(entry_id.decode(), fields) for entry_id, fields in entries]


def errors(exc: cloudflare.APIStatusError) -> list[dict[str, Any]]:
    """The ``errors`` of the answer the SDK raised for."""
    body: Any = exc.body
    return list(body["errors"])


async def test_sdk_tag_purge_evicts_from_nginx(
    start_bus: StartNode, users_dir: Path, nginx_env: NginxEnv, sdk: Any
) -> None:
    """client.cache.purge(tags=…) evicts exactly the tagged pages; result.id is the entry."""
    token = make_token(users_dir, "acme")
    node = await start_bus(drain=drain_config(nginx_env), http=http_config())
    prime(nginx_env)
    result = await sdk(node, token).cache.purge(zone_id=ZONE, tags=["acme-blog2"])
    assert result is not None
    [(entry_id, fields)] = await stored(node)
    assert result.id == entry_id
    assert fields[b"u"] == b"acme"
    await wait_drained(node)
    expected = {p: "MISS" if p == ("acme-blog2.pages.example", "/") else "HIT" for p in PAGES}
    assert cache_states(nginx_env) == expected


async def test_sdk_invalidate_is_a_soft_purge(
    start_bus: StartNode, users_dir: Path, sdk: Any
) -> None:
    """invalidate_cache stores the same purge with "soft": true."""
    token = make_token(users_dir, "acme")
    node = await start_bus(drain={"key_host": KEY_HOST}, http=http_config())
    await sdk(node, token).cache.invalidate(zone_id=ZONE, prefixes=["acme-blog.pages.example/docs"])
    [(_, fields)] = await stored(node)
    assert json.loads(fields[b"d"]) == {
        "soft": True,
        "prefixes": ["http://acme-blog.pages.example/docs", "https://acme-blog.pages.example/docs"],
    }


async def test_sdk_bad_token_is_an_authentication_error(
    start_bus: StartNode, users_dir: Path, sdk: Any
) -> None:
    """An unknown token: 401 with Cloudflare's code 10000, and nothing stored."""
    make_token(users_dir, "acme")
    node = await start_bus(http=http_config())
    with pytest.raises(cloudflare.AuthenticationError) as caught:
        await sdk(node, "dbt_not-a-token").cache.purge(zone_id=ZONE, tags=["acme-blog"])
    assert caught.value.status_code == 401
    assert errors(caught.value)[0]["code"] == codes.AUTHENTICATION_ERROR
    assert await stored(node) == []


async def test_sdk_purge_outside_scope_is_permission_denied(
    start_bus: StartNode, users_dir: Path, sdk: Any
) -> None:
    """acme may purge acme-* only: a tag of another user's site is 403, and not stored."""
    token = make_token(users_dir, "acme")
    node = await start_bus(http=http_config())
    with pytest.raises(cloudflare.PermissionDeniedError) as caught:
        await sdk(node, token).cache.purge(zone_id=ZONE, tags=["acme-blog", "other"])
    assert caught.value.status_code == 403
    assert "other" in errors(caught.value)[0]["message"]
    assert await stored(node) == []


async def test_over_the_purge_rate_limit_is_cloudflares_429(
    start_bus: StartNode, users_dir: Path, sdk: Any
) -> None:
    """The per-user rate limit applies to HTTP as to `pub`: beyond the burst, 429 with code
    1134 and Retry-After, and the refused request is not stored."""
    token = make_token(users_dir, "acme")
    node = await start_bus(
        http=http_config(), drain={"max_purges_per_user": 1, "purge_burst_per_user": 1}
    )
    first = await sdk(node, token).cache.purge(zone_id=ZONE, tags=["acme-blog"])
    with pytest.raises(cloudflare.RateLimitError) as caught:
        await sdk(node, token).cache.purge(zone_id=ZONE, tags=["acme-shop"])
    assert caught.value.status_code == 429
    assert [e["code"] for e in errors(caught.value)] == [1134]
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    [(entry_id, fields)] = await stored(node)
    assert first is not None
    assert (first.id, json.loads(fields[b"d"])) == (entry_id, {"tags": ["acme-blog"]})


async def test_admin_token_may_purge_everything(
    start_bus: StartNode, users_dir: Path, sdk: Any
) -> None:
    """A token is a user as a key is: the admin's purges everything, as `pub '*'` would."""
    token = make_token(users_dir, "root")  # settings_for makes root the admin
    node = await start_bus(http=http_config())
    result = await sdk(node, token).cache.purge(zone_id=ZONE, purge_everything=True)
    [(entry_id, fields)] = await stored(node)
    assert result is not None
    assert (result.id, json.loads(fields[b"d"])) == (entry_id, {"everything": True})


async def test_unknown_zone_is_not_found(start_bus: StartNode, users_dir: Path, sdk: Any) -> None:
    """A zone id neither in [http] zones nor [drain.cloudflare]: Cloudflare's 404, 7003."""
    token = make_token(users_dir, "acme")
    node = await start_bus(http=http_config())
    with pytest.raises(cloudflare.NotFoundError) as caught:
        await sdk(node, token).cache.purge(zone_id="f" * 32, tags=["acme-blog"])
    assert [e["code"] for e in errors(caught.value)] == [
        codes.ROUTE_INVALID,
        codes.NO_ROUTE,
    ]


async def test_cloudflare_zone_id_is_accepted(
    start_bus: StartNode, users_dir: Path, sdk: Any
) -> None:
    """The zone_id of a [drain.cloudflare] zone works without listing it in [http] zones."""
    token = make_token(users_dir, "acme")
    cloudflare_zone = {"zone_id": "zone-a", "api_token": "t", "api_base": "http://127.0.0.1:9"}
    settings = {"cloudflare": cloudflare_zone, "node": "web1", "key_host": KEY_HOST}
    node = await start_bus(drain=settings, http={"listen": "127.0.0.1:0"})
    result = await sdk(node, token).cache.purge(zone_id="zone-a", hosts=["acme.pages.example"])
    assert result is not None
    assert [entry_id for entry_id, _ in await stored(node)] == [result.id]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param(b"{not json", 400, codes.BAD_JSON, id="bad-json"),
        pytest.param(b"{}", 400, codes.NO_PURGE_KIND, id="no-kind"),
        pytest.param(b'{"purge_everything": true, "tags": ["a"]}', 400,
                     codes.EVERYTHING_AND_OTHERS, id="everything-and-tags"),
        pytest.param(b'{"tags": ["acme-a"], "hosts": ["acme-a.example"]}', 400,
                     codes.INVALID_FIELD, id="two-kinds"),
        pytest.param(json.dumps({"tags": [f"acme-{i}" for i in range(101)]}).encode(), 400,
                     codes.INVALID_FIELD, id="101-tags"),
        pytest.param(b'{"tags": ["acme a"]}', 400, codes.INVALID_FIELD, id="tag-with-space"),
        pytest.param(b'{"files": ["ftp://acme-blog.example/x"]}', 400, codes.INVALID_FIELD,
                     id="not-http-url"),
        pytest.param(b'{"prefixes": ["https://acme-blog.example/x"]}', 400, codes.INVALID_FIELD,
                     id="prefix-with-scheme"),
        pytest.param(b'{"tags": []}', 400, codes.INVALID_FIELD, id="empty-list"),
        pytest.param(b"[1]", 400, codes.INVALID_FIELD, id="not-an-object"),
        pytest.param(b'{"purge_everything": true}', 403, codes.UNAUTHORIZED,
                     id="everything-by-user"),
    ],
)  # fmt: skip
async def test_faults_answer_as_cloudflare_does(
    start_bus: StartNode, users_dir: Path, body: bytes, status: int, code: int
) -> None:
    """Each fault: Cloudflare's status, envelope and error code; nothing is stored."""
    token = make_token(users_dir, "acme")
    node = await start_bus(http=http_config())
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"http://127.0.0.1:{node.http_port}/client/v4/zones/{ZONE}/purge_cache",
            content=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
    answer = response.json()
    assert (response.status_code, answer["success"], answer["result"]) == (status, False, None)
    assert answer["errors"][0]["code"] == code
    assert answer["errors"][0]["message"]
    assert await stored(node) == []


def test_drainbus_errors_map_to_cloudflare_answers() -> None:
    """A per-user limit (exit 75) is Cloudflare's 429 with code 1134 and the limit's wait;
    Redis down is 503."""
    limited = _as_fault(LimitExceeded("publish rate limit for acme: 10 a second"))
    assert (limited.status, limited.code, limited.retry_after) == (429, codes.RATE_LIMITED, 1)
    assert "acme" in limited.message
    slow = LimitExceeded("quota for acme")
    slow.retry_after = 2.5  # type: ignore[attr-defined]  # as a limit that knows may say
    assert _as_fault(slow).retry_after == 3
    assert _as_fault(BackendUnavailable("Redis is unreachable")).status == 503


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with cryptography (asyncssh's)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_files_serve_https(start_bus: StartNode, users_dir: Path, tmp_path: Path) -> None:
    """With tls_cert and tls_key the endpoint speaks HTTPS (and may listen off loopback)."""
    cert, key = self_signed(tmp_path)
    token = make_token(users_dir, "acme")
    node = await start_bus(http=http_config(tls_cert=str(cert), tls_key=str(key)))
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)) as client:
        response = await client.post(
            f"https://127.0.0.1:{node.http_port}/client/v4/zones/{ZONE}/purge_cache",
            json={"tags": ["acme-blog"]},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.json()["success"] is True


async def test_unreadable_tls_files_stop_start_up(
    settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    """A TLS file that cannot be loaded is a ConfigError (78) naming the settings."""
    (tmp_path / "empty.pem").write_text("")
    broken = http_config(tls_cert=str(tmp_path / "empty.pem"), tls_key=str(tmp_path / "empty.pem"))
    with pytest.RaisesGroup(
        pytest.RaisesExc(ConfigError, match=r"http.tls_cert / http.tls_key cannot be loaded"),
        flatten_subgroups=True,
    ):
        async with open_node(settings_for(http=broken)):
            pass


async def test_removed_token_stops_working_without_restart(
    start_bus: StartNode, users_dir: Path, sdk: Any
) -> None:
    """tokens rm: at the next reload of the users folder the token is refused (401)."""
    token = make_token(users_dir, "acme")
    node = await start_bus(http=http_config())
    client = sdk(node, token)
    assert await client.cache.purge(zone_id=ZONE, tags=["acme-blog"]) is not None
    assert TokenStore(users_dir).remove("acme") == 1
    async with asyncio.timeout(10):  # the reload runs every 0.2 s in these tests
        while True:
            try:
                await client.cache.purge(zone_id=ZONE, tags=["acme-blog"])
            except cloudflare.AuthenticationError:
                break
            await asyncio.sleep(0.05)
    assert len(await stored(node)) >= 1


async def test_sighup_reload_drops_a_removed_token_at_once(
    start_bus: StartNode, users_dir: Path, sdk: Any
) -> None:
    """The reload SIGHUP runs (UserKeys.reload) re-reads the tokens too, with no poll."""
    token = make_token(users_dir, "acme")
    node = await start_bus(http=http_config(), server={"users_reload_interval": 3600})
    client = sdk(node, token)
    assert await client.cache.purge(zone_id=ZONE, tags=["acme-blog"]) is not None
    TokenStore(users_dir).remove("acme")
    node.users.reload()  # what cli._wait_for_stop does on SIGHUP
    with pytest.raises(cloudflare.AuthenticationError):
        await client.cache.purge(zone_id=ZONE, tags=["acme-blog"])


@pytest.mark.usefixtures("fresh_logging")
async def test_tokens_never_reach_the_logs(
    start_bus: StartNode,
    users_dir: Path,
    sdk: Any,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Neither a good nor a bad token appears in any log line: structlog's (captured, or
    printed by a logger configured earlier), or the stdlib's (uvicorn's)."""
    from drainbus.http import app

    monkeypatch.setattr(app, "log", structlog.get_logger(app.__name__))  # as fresh_logging
    token = make_token(users_dir, "acme")
    wrong = "dbt_" + "x" * 43
    with structlog.testing.capture_logs() as events, caplog.at_level("DEBUG"):
        node = await start_bus(http=http_config())
        await sdk(node, token).cache.purge(zone_id=ZONE, tags=["acme-blog"])
        with pytest.raises(cloudflare.PermissionDeniedError):
            await sdk(node, token).cache.purge(zone_id=ZONE, tags=["other"])
        with pytest.raises(cloudflare.AuthenticationError):
            await sdk(node, wrong).cache.purge(zone_id=ZONE, tags=["acme-blog"])
    clients = ("cloudflare", "httpx", "httpcore")  # the test's own side of the wire
    stdlib = [r.getMessage() for r in caplog.records if not r.name.startswith(clients)]
    printed = capsys.readouterr()
    logged = repr(events) + repr(stdlib) + printed.out + printed.err
    assert any(e["event"] == "http_purge" and e["user"] == "acme" for e in events)
    assert token not in logged
    assert token[4:20] not in logged
    assert wrong not in logged


def readme_curl_line() -> str:
    """The curl command of the README's "Use your existing Cloudflare integration"."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use your existing Cloudflare integration", 1)[1]
    return re.search(r"`(curl -X POST [^`]+)`", section)[1]  # type: ignore[index]


async def test_curl_as_the_readme_shows(start_bus: StartNode, users_dir: Path) -> None:
    """The README's curl line, pointed at a test bus, purges and prints Cloudflare's envelope."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    token = make_token(users_dir, "acme")
    node = await start_bus(http=http_config())
    command = (
        readme_curl_line()
        .replace("https://bus.example", f"http://127.0.0.1:{node.http_port}")
        .replace("$ZONE", ZONE)
        .replace("$TOKEN", token)
    )
    argv = shlex.split(command)
    proc = await asyncio.create_subprocess_exec(
        curl, "-sS", *argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    [(entry_id, fields)] = await stored(node)
    assert json.loads(out) == {
        "success": True, "errors": [], "messages": [], "result": {"id": entry_id}
    }  # fmt: skip
    assert fields[b"u"] == b"acme"


async def test_requests_are_counted_by_status(
    start_bus: StartNode, users_dir: Path, sdk: Any
) -> None:
    """drainbus_http_requests_total counts answers by endpoint and status on /metrics."""
    token = make_token(users_dir, "acme")
    node = await start_bus(http=http_config(), metrics_listen="127.0.0.1:0")
    await sdk(node, token).cache.purge(zone_id=ZONE, tags=["acme-blog"])
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{node.metrics_port}/metrics")).text
    assert 'drainbus_http_requests_total{endpoint="purge_cache",status="200"}' in text


@pytest.mark.parametrize(
    ("http", "message"),
    [
        pytest.param({"listen": "0.0.0.0:8452"}, "allow_insecure_http", id="public-plain"),
        pytest.param({"listen": "127.0.0.1:8452", "tls_cert": "c.pem"}, "tls_key", id="cert-only"),
    ],
)
def test_unsafe_http_settings_stop_start_up(
    tmp_path: Path, http: dict[str, str], message: str
) -> None:
    """Plain HTTP off loopback (or half a TLS pair) is one line and exit 78."""
    config = tmp_path / "drainbus.toml"
    config.write_text("[http]\n" + "".join(f'{k} = "{v}"\n' for k, v in http.items()))
    result = subprocess.run(
        [sys.executable, "-m", "drainbus", "check-config", str(config)],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == 78
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_non_loopback_plain_http_is_allowed_when_asked() -> None:
    """allow_insecure_http = true, or TLS files, let the endpoint listen anywhere."""
    from drainbus.config import load_settings

    insecure = {"listen": "0.0.0.0:8452", "allow_insecure_http": True}
    assert load_settings(None, {"http": insecure}).http.listen == "0.0.0.0:8452"
    tls = {"listen": "0.0.0.0:8452", "tls_cert": "c.pem", "tls_key": "k.pem"}
    assert load_settings(None, {"http": tls}).http.tls


async def test_under_workers_only_worker_0_serves_http(
    tmp_path: Path, users_dir: Path, redis_url: str
) -> None:
    """serve --workers 2: one HTTP listener (worker 0's), which purges through the bus."""
    token = make_token(users_dir, "acme")
    config = write_config(tmp_path, users_dir, '[[acl]]\ntopics = ["cache-drain"]\npublish = ["*"]')
    args = ("--config", str(config), "--workers", "2", "--http-listen", "127.0.0.1:0")
    env = {"DRAINBUS_REDIS_URL": redis_url, "DRAINBUS_HTTP__ZONES": f'["{ZONE}"]'}
    async with serve_process(*args, env=env) as server:
        await server.wait_for_event("serving", workers=2)
        listening = [e for e in server.log if e["event"] == "http_listening"]
        assert [e["worker"] for e in listening] == [0]
        async with httpx.AsyncClient() as client:
            response = await client.post(
                listening[0]["listen"] + f"/client/v4/zones/{ZONE}/purge_cache",
                json={"tags": ["acme-blog"]},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert response.json()["success"] is True, response.text
        purge = await server.wait_for_event("http_purge")
        assert (purge["worker"], purge["id"]) == (0, response.json()["result"]["id"])
