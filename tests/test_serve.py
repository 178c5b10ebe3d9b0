"""`drainbus serve` as a real process: start-up, shutdown, restarts, several nodes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import User, run_ssh, serve_process

ACL = '[[acl]]\ntopics = ["shared/**"]\npublish = ["*"]\nsubscribe = ["*"]\n'


def write_config(directory: Path, users_dir: Path, extra: str = "") -> Path:
    path = directory / "drainbus.toml"
    path.write_text(
        f'namespace = "{directory.name}"\n{extra}\n[server]\nlisten = "127.0.0.1:0"\n'
        f'users_dir = "{users_dir}"\nhost_keys_dir = "{directory / "host"}"\n{ACL}'
    )
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; it only waits for its parent to reap it.
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split(") ", 1)[1][0] != "Z"


async def test_two_nodes_on_one_redis_are_one_bus(
    tmp_path: Path, users_dir: Path, add_user: Callable[[str], User], redis_url: str
) -> None:
    """A message published on one node reaches a subscriber on the other; ls counts both."""
    alice = add_user("alice")
    config = write_config(tmp_path, users_dir)
    env = {"DRAINBUS_REDIS_URL": redis_url}
    async with (
        serve_process("--config", str(config), env=env) as one,
        serve_process("--config", str(config), env=env) as two,
    ):
        subs = [
            await asyncio.create_subprocess_exec(
                *_ssh(node.port, alice.key_file, "sub", "shared/feed"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for node in (one, two)
        ]
        try:
            async with asyncio.timeout(15):  # both subscribed, as seen from either node
                while True:
                    listing = await run_ssh(one.port, alice.key_file, "ls", "--json")
                    rows = [json.loads(line) for line in listing.stdout.splitlines()]
                    if rows and rows[0]["subscribers"] == 2:
                        break
                    await run_ssh(one.port, alice.key_file, "pub", "shared/feed", stdin=b"warm\n")
            result = await run_ssh(one.port, alice.key_file, "pub", "shared/feed", stdin=b"x1\n")
            assert result.code == 0
            for sub in subs:
                assert sub.stdout is not None
                async with asyncio.timeout(10):
                    while (line := await sub.stdout.readline()) != b"x1\n":
                        assert line == b"warm\n"
        finally:
            for sub in subs:
                sub.kill()
                await sub.wait()


async def test_restarted_serve_replays_messages_from_before(
    short_tmp: Path, tmp_path: Path, users_dir: Path, add_user: Callable[[str], User]
) -> None:
    """With the embedded server, messages survive a restart; SIGTERM exits 0, no orphan."""
    alice = add_user("alice")
    data_dir = short_tmp / f"data-{tmp_path.name}"
    config = write_config(tmp_path, users_dir)
    args = ("--config", str(config), "--data-dir", str(data_dir))
    env = {"DRAINBUS_REDIS_URL": ""}
    async with serve_process(*args, env=env) as first:
        result = await run_ssh(first.port, alice.key_file, "pub", "shared/feed", stdin=b"a\nb\n")
        assert result.code == 0
        started = await first.wait_for_event("embedded_redis_started")
        first.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.proc.wait(), 20) == 0
    assert not pid_alive(int(started["pid"]))
    async with serve_process(*args, env=env) as second:
        replay = await run_ssh(
            second.port, alice.key_file, "sub", "shared/feed", "--since", "all", "--count", "2"
        )
        assert replay.stdout == b"a\nb\n"


async def test_killed_serve_leaves_no_orphan_server(
    short_tmp: Path, tmp_path: Path, users_dir: Path
) -> None:
    """SIGKILL on drainbus takes the embedded server down with it."""
    config = write_config(tmp_path, users_dir)
    data_dir = short_tmp / f"kill-{tmp_path.name}"
    async with serve_process(
        "--config", str(config), "--data-dir", str(data_dir), env={"DRAINBUS_REDIS_URL": ""}
    ) as node:
        started = await node.wait_for_event("embedded_redis_started")
        node.proc.kill()
        await node.proc.wait()
    async with asyncio.timeout(10):
        while pid_alive(int(started["pid"])):
            await asyncio.sleep(0.05)


def _run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drainbus", "--log-json", "serve", *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, **(env or {})},
        check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("config_text", "fragment"),
    [
        pytest.param("[server]\nlisen = 1\n", "server.lisen: unknown setting", id="unknown-key"),
        pytest.param('[topics]\nretention = "5x"\n', "topics.retention", id="bad-duration"),
        pytest.param("[server\n", "is not valid TOML", id="bad-toml"),
    ],
)
def test_bad_config_stops_startup_with_one_line(
    tmp_path: Path, config_text: str, fragment: str
) -> None:
    """A bad config file ends start-up with exit 78 and one line naming the key."""
    config = tmp_path / "bad.toml"
    config.write_text(config_text)
    result = _run_serve("--config", str(config))
    assert result.returncode == 78
    assert fragment in result.stderr
    assert result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize(
    ("config_text", "env", "fragment"),
    [
        pytest.param(
            '[drain.cloudflare]\nzone_id = "z"\napi_token = ["hunter2-token"]\n', {},
            "drain.cloudflare.0.api_token: Input should be a valid string", id="api-token-list",
        ),
        pytest.param(
            'redis_url = "redis+sentinel://:hunter2-pw@10.0.0.1:26379"\n', {},
            "'redis+sentinel://***@10.0.0.1:26379' is invalid", id="redis-url-in-file",
        ),
        pytest.param(
            "", {"DRAINBUS_REDIS_URL": "ftp://user:hunter2-pw@10.0.0.1"},
            "'ftp://***@10.0.0.1' is not a Redis URL", id="redis-url-in-env",
        ),
        pytest.param(
            '[[drain.http_purge]]\nurl = "http://127.0.0.1/"\n'
            '[drain.http_purge.headers]\nAuthorization = ["Bearer hunter2-token"]\n', {},
            "drain.http_purge.0.headers.Authorization", id="http-purge-header",
        ),
    ],
)  # fmt: skip
def test_config_errors_never_show_a_secret(
    tmp_path: Path, config_text: str, env: dict[str, str], fragment: str
) -> None:
    """A bad secret setting is named, but its value (token, password) is never printed."""
    config = tmp_path / "bad.toml"
    config.write_text(config_text)
    result = _run_serve("--config", str(config), env=env)
    assert result.returncode == 78
    assert fragment in result.stderr
    assert "value not shown: it is secret" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_port_in_use_exits_71(tmp_path: Path, users_dir: Path, redis_url: str) -> None:
    """serve exits 71 with one line when it cannot bind its port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_serve(
            "--config", str(write_config(tmp_path, users_dir)), "--listen", f"127.0.0.1:{port}",
            env={"DRAINBUS_REDIS_URL": redis_url},
        )  # fmt: skip
    assert result.returncode == 71
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr.splitlines()[-1]


def test_unreachable_redis_exits_69(tmp_path: Path, users_dir: Path) -> None:
    """serve exits 69 with one line when the configured Redis does not answer."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = _run_serve(
        "--config", str(write_config(tmp_path, users_dir)),
        "--redis-url", f"redis://127.0.0.1:{port}",
    )  # fmt: skip
    assert result.returncode == 69
    assert "backend unavailable" in result.stderr.splitlines()[-1]


def test_unreadable_user_key_file_stops_startup(tmp_path: Path, users_dir: Path) -> None:
    """A user key file that is not a valid authorized_keys file stops start-up (78)."""
    (users_dir / "mallory.pub").write_text("this is not a key\n")
    result = _run_serve("--config", str(write_config(tmp_path, users_dir)))
    assert result.returncode == 78
    assert "mallory.pub" in result.stderr.splitlines()[-1]


def _ssh(port: int, key: Path, *args: str) -> list[str]:
    from tests.conftest import ssh_argv

    return ssh_argv(port, key, *args)
