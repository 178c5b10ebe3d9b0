"""Sharing a bus: no user can lock out or impersonate another, driven by real clients."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from drainbus.ssh.commands import parse_since
from tests.conftest import (
    RunningBus,
    ServeProcess,
    Subscriber,
    User,
    run_ssh,
    serve_process,
    ssh_argv,
    wait_subscribed,
)

StartBus = Callable[..., Awaitable[RunningBus]]
Subscribe = Callable[..., Awaitable[Subscriber]]
Held = Callable[..., Awaitable[asyncio.subprocess.Process]]
Serving = Callable[..., AbstractAsyncContextManager[ServeProcess]]


async def until(check: Callable[[], bool], timeout: float = 15) -> None:
    """Wait until ``check()`` holds: the server's own state, polled (it has no event to await)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


@pytest.fixture
def serving(tmp_path: Path, users_dir: Path, redis_url: str, namespace: str) -> Serving:
    """``drainbus serve`` as a real process on this test's users folder, settings from the
    environment: for tests that read its JSON log."""

    def start(**env: str) -> AbstractAsyncContextManager[ServeProcess]:
        env = {
            "DRAINBUS_REDIS_URL": redis_url,
            "DRAINBUS_NAMESPACE": namespace,
            "DRAINBUS_DATA_DIR": str(tmp_path / "data"),
            "DRAINBUS_SERVER__LISTEN": "127.0.0.1:0",
            "DRAINBUS_SERVER__USERS_DIR": str(users_dir),
            "DRAINBUS_SERVER__HOST_KEYS_DIR": str(tmp_path / "keys" / "host"),
            "DRAINBUS_SERVER__USERS_RELOAD_INTERVAL": "0.2",
            **env,
        }
        return serve_process(env=env)

    return start


@pytest.fixture
async def hold() -> AsyncIterator[Held]:
    """Start ``ssh -N`` (logged in, no session) processes; kill whatever is left after."""
    started: list[asyncio.subprocess.Process] = []

    async def start(port: int, key: Path, *options: str) -> asyncio.subprocess.Process:
        argv = ssh_argv(port, key)
        host = argv.pop()
        proc = await asyncio.create_subprocess_exec(
            *argv, "-N", *options, host,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def logged_in(node: RunningBus, user: str) -> int:
    """How many logged-in connections ``user`` holds on ``node``."""
    return len(node.door.connections_by_user.get(user, ()))


async def test_connections_per_user_are_limited(
    start_bus: StartBus, add_user: Callable[[str], User], hold: Held
) -> None:
    """One user holding max_connections_per_user idle connections locks out only themself."""
    alice = add_user("alice")
    bob = add_user("bob")
    node = await start_bus(server={"max_connections_per_user": 3, "max_connections": 5})
    for _ in range(3):
        await hold(node.port, alice.key_file)
    await until(lambda: logged_in(node, "alice") == 3)
    refused = await run_ssh(node.port, alice.key_file, "whoami")
    assert refused.code == 75  # a session refused with the reason, as over max_sessions_per_user
    assert "too many connections for user 'alice' (limit 3)" in refused.stderr
    assert refused.stdout == b""
    allowed = await run_ssh(node.port, bob.key_file, "whoami")
    assert allowed.code == 0, allowed.stderr
    assert "user: bob" in allowed.stdout.decode()


async def test_idle_connection_is_closed(
    start_bus: StartBus, add_user: Callable[[str], User], hold: Held, subscribe: Subscribe
) -> None:
    """A connection with no session is closed after idle_timeout; one with a session stays."""
    alice = add_user("alice")
    node = await start_bus(server={"idle_timeout": 1})
    sub = await subscribe(node.port, alice.key_file, "alice/x")
    await wait_subscribed(node.bus, "alice/x")
    idle = await hold(node.port, alice.key_file)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(idle.wait(), 15)
    assert asyncio.get_running_loop().time() - started >= 0.9
    assert idle.returncode == 255
    # The subscriber connected before the idle one and outlived it: sessions keep it open.
    result = await run_ssh(node.port, alice.key_file, "pub", "alice/x", stdin=b"still here\n")
    assert result.code == 0, result.stderr
    assert await sub.line() == b"still here"


class Banner:
    """A raw TCP client that sends only the SSH version line, as a handshake flood does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.2") -> Banner:
        """Connect from ``source`` (any 127.x address is this host) and await the server's
        version line, so the server has counted this connection before the next one."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 10
        )
        writer.write(b"SSH-2.0-flood\r\n")
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line.startswith(b"SSH-2.0-"), line
        return cls(reader, writer)

    async def closed_by_server(self, timeout: float = 10) -> bytes:
        """Everything the server sent until it closed the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def banners() -> AsyncIterator[Callable[..., Awaitable[Banner]]]:
    """Open :class:`Banner` connections; close them all after the test."""
    opened: list[Banner] = []

    async def open_one(port: int, source: str = "127.0.0.2") -> Banner:
        banner = await Banner.open(port, source)
        opened.append(banner)
        return banner

    yield open_one
    for banner in opened:
        banner.close()


async def test_handshake_flood_from_one_source_leaves_logins_in(
    start_bus: StartBus, add_user: Callable[[str], User], banners: Callable[..., Awaitable[Banner]]
) -> None:
    """Banner-only connections from one address stop at max_startups_per_source, and the
    ones held never count against the logged-in connections: a real login still gets in."""
    alice = add_user("alice")
    node = await start_bus(
        server={
            "max_startups_per_source": 3,
            "max_startups": "20:30:50",
            "max_connections": 1,
            "login_timeout": 30,
        }
    )
    flood = [await banners(node.port) for _ in range(8)]
    for dropped in flood[3:]:
        assert b"too many connections still logging in" in await dropped.closed_by_server()
    result = await run_ssh(node.port, alice.key_file, "whoami")
    assert result.code == 0, result.stderr
    assert "user: alice" in result.stdout.decode()
    assert node.door.startups == 3  # the first three are still held open


async def test_handshake_budget_is_shared_out_like_max_startups(
    start_bus: StartBus, add_user: Callable[[str], User], banners: Callable[..., Awaitable[Banner]]
) -> None:
    """Past START of max_startups (here: drop 100% at 3) new connections are refused, from
    any address, with a message; a slot freed lets the next login in."""
    alice = add_user("alice")
    node = await start_bus(server={"max_startups": "3:100:6", "login_timeout": 30})
    flood = [await banners(node.port, f"127.0.0.{n}") for n in range(2, 10)]
    for dropped in flood[3:]:
        assert b"too many connections still logging in" in await dropped.closed_by_server()
    refused = await run_ssh(node.port, alice.key_file, "whoami")
    # The refusal is sent before the close, but OpenSSH's next packet can meet the closed
    # socket first (a reset discards what it had not read yet): the message is best effort.
    assert refused.code == 255
    assert not refused.stderr or "too many connections still logging in" in refused.stderr
    assert node.door.startups == 3
    flood[0].close()
    await until(lambda: node.door.startups == 2)
    result = await run_ssh(node.port, alice.key_file, "whoami")
    assert result.code == 0, result.stderr


async def test_slow_login_is_dropped_at_login_timeout(
    start_bus: StartBus, add_user: Callable[[str], User], banners: Callable[..., Awaitable[Banner]]
) -> None:
    """A connection that does not finish logging in is closed after login_timeout."""
    add_user("alice")
    node = await start_bus(server={"login_timeout": 1})
    loop = asyncio.get_running_loop()
    started = loop.time()
    slow = await banners(node.port)
    await slow.closed_by_server(timeout=15)
    assert 0.9 <= loop.time() - started < 15
    await until(lambda: node.door.startups == 0)


async def test_removed_key_closes_its_open_connections(
    start_bus: StartBus, add_user: Callable[[str], User], hold: Held, users_dir: Path,
    short_tmp: Path,
) -> None:  # fmt: skip
    """Removing a user's key file closes their ControlMaster: no new sessions ride on it."""
    carol = add_user("carol")
    node = await start_bus()
    control = ["-o", f"ControlPath={short_tmp}/cm-{node.port}"]
    master = await hold(node.port, carol.key_file, "-o", "ControlMaster=yes", *control)
    await until(lambda: logged_in(node, "carol") == 1)

    async def whoami_through_master() -> tuple[int, str]:
        argv = ssh_argv(node.port, carol.key_file, "whoami")
        at = argv.index("-T")
        argv[at:at] = control
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    assert await whoami_through_master() == (0, await _whoami_text(node, carol))
    (users_dir / "carol.pub").unlink()
    await asyncio.wait_for(master.wait(), 15)
    assert logged_in(node, "carol") == 0
    code, _ = await whoami_through_master()
    assert code == 255


async def _whoami_text(node: RunningBus, user: User) -> str:
    return (await run_ssh(node.port, user.key_file, "whoami")).stdout.decode()


async def test_failed_login_flood_is_logged_per_source_and_interval(
    serving: Serving, add_user: Callable[[str], User], make_key: Callable[[str], Path]
) -> None:
    """Twelve refused logins from one address are a couple of log lines whose counts add up
    to twelve, not twelve lines."""
    add_user("alice")
    stranger = make_key("stranger")
    async with serving(DRAINBUS_SERVER__AUTH_FAILURE_LOG_INTERVAL="3s") as server:
        for _ in range(3):
            results = await asyncio.gather(
                *(run_ssh(server.port, stranger, "whoami") for _ in range(4))
            )
            assert all(r.code == 255 for r in results)

        def failures() -> list[dict[str, Any]]:
            return [e for e in server.log if e.get("event") == "auth_failed"]

        await until(lambda: sum(int(e["count"]) for e in failures()) >= 12)
        assert sum(int(e["count"]) for e in failures()) == 12
        assert {e["source"] for e in failures()} == {"127.0.0.1"}
        assert len(failures()) <= 4


async def test_embedded_data_dir_is_private_whatever_the_umask(
    start_bus: StartBus, add_user: Callable[[str], User], short_tmp: Path, namespace: str
) -> None:
    """With umask 000 the data dir is still 0700 and every file in it 0600 (sockets and
    folders owner-only), also after messages are written to the append-only file."""
    alice = add_user("alice")
    data_dir = short_tmp / f"d-{namespace}"
    data_dir.mkdir(mode=0o755)
    (data_dir / "left-from-before.aof").write_text("")
    old = os.umask(0)
    try:
        node = await start_bus(redis_url=None, data_dir=str(data_dir))
        result = await run_ssh(node.port, alice.key_file, "pub", "alice/x", stdin=b"secret\n")
        assert result.code == 0, result.stderr
    finally:
        os.umask(old)
    assert any(p.suffix == ".aof" for p in data_dir.rglob("*") if p.is_file())
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for path in data_dir.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {mode:o}"
        if path.is_file():
            assert mode == 0o600, f"{path} is {mode:o}"


async def test_user_file_differing_only_in_case_cannot_log_in(
    serving: Serving, add_user: Callable[[str], User], make_key: Callable[[str], Path],
    users_dir: Path,
) -> None:  # fmt: skip
    """An ACME.pub written next to acme.pub is refused at reload: ACME cannot log in as a
    second user (and so cannot purge acme's host); acme keeps working."""
    acme = add_user("acme")
    impostor = make_key("impostor")
    async with serving(DRAINBUS_DRAIN__KEY_HOST="{key}.pages.example") as server:
        (users_dir / "ACME.pub").write_text(impostor.with_suffix(".pub").read_text())
        await server.wait_for_event("user_name_clash")
        refused = await run_ssh(
            server.port, impostor, "pub", "cache-drain", stdin=b"host:acme.pages.example\n"
        )
        assert refused.code == 255
        assert "Permission denied (publickey)" in refused.stderr
        whoami = await run_ssh(server.port, acme.key_file, "whoami")
        assert "user: acme" in whoami.stdout.decode()


async def test_ownership_compares_names_regardless_of_case(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """User Acme owns topic acme/x, key and tag acme-blog and host acme-blog.pages.example
    alike: names compare the same way in every scope check. Others still own none of it."""
    acme = add_user("Acme")
    bob = add_user("bob")
    node = await start_bus(drain={"key_host": "{key}.pages.example"})
    lines = b"acme-blog\ntag:ACME-blog\nhost:acme-blog.pages.example\n"
    owned = await run_ssh(node.port, acme.key_file, "pub", "cache-drain", stdin=lines)
    assert owned.code == 0, owned.stderr
    topic = await run_ssh(node.port, acme.key_file, "pub", "acme/x", stdin=b"hello\n")
    assert topic.code == 0, topic.stderr
    foreign = await run_ssh(node.port, bob.key_file, "pub", "cache-drain", stdin=lines)
    assert foreign.code == 77
    assert (await run_ssh(node.port, bob.key_file, "pub", "ACME/x", stdin=b"x\n")).code == 77


@pytest.mark.parametrize(
    "since",
    [
        pytest.param("99999999999999999999999-0", id="issue"),
        pytest.param("18446744073709551616-0", id="ms-2**64"),
        pytest.param("0-18446744073709551616", id="seq-2**64"),
        pytest.param("18446744073709551616", id="bare-ms"),
    ],
)
async def test_since_id_beyond_64_bits_is_a_usage_error(
    start_bus: StartBus, add_user: Callable[[str], User], since: str
) -> None:
    """An id part past 64 bits exits 64 at once with one line, instead of hanging."""
    alice = add_user("alice")
    node = await start_bus()
    result = await run_ssh(node.port, alice.key_file, "sub", "alice/x", "--since", since)
    assert result.code == 64
    assert f"--since '{since}' is not a stream id" in result.stderr
    assert "(64 bits)" in result.stderr
    assert result.stderr.count("\n") == 1


def test_since_accepts_the_largest_64_bit_id() -> None:
    """18446744073709551615-18446744073709551615 is still a valid id."""
    top = 2**64 - 1
    assert parse_since(f"{top}-{top}") == ((top, top), None)
