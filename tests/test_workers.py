"""`drainbus serve --workers N`: worker processes on one port under a supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import ServeProcess, Subscriber, User, run_ssh, serve_process
from tests.test_serve import pid_alive, write_config


@asynccontextmanager
async def two_workers(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[ServeProcess]:
    """``serve --workers 2``, once the supervisor says every worker serves."""
    async with serve_process("--config", str(config), "--workers", "2", *args, env=env) as server:
        await server.wait_for_event("serving", workers=2)
        yield server


async def wait_gone(*pids: int) -> None:
    async with asyncio.timeout(15):
        while any(pid_alive(pid) for pid in pids):
            await asyncio.sleep(0.05)


async def test_connections_spread_over_workers_that_form_one_bus(
    tmp_path: Path,
    users_dir: Path,
    add_user: Callable[[str], User],
    redis_url: str,
    subscribe: Callable[..., Awaitable[Subscriber]],
) -> None:
    """Sessions land on both workers, and a message published through either reaches a sub."""
    alice = add_user("alice")
    config = write_config(tmp_path, users_dir)
    async with two_workers(config, env={"DRAINBUS_REDIS_URL": redis_url}) as server:
        sub = await subscribe(server.port, alice.key_file, "shared/feed", "--since", "all")
        # The sub sits on one of the two workers: once pubs went through both, one crossed.
        published: list[bytes] = []
        workers: set[int] = set()
        while workers != {0, 1}:
            assert len(published) < 40, "40 connections, all on one worker"
            published.append(f"m{len(published)}".encode())
            result = await run_ssh(server.port, alice.key_file, "pub", "shared/feed",
                                   stdin=published[-1] + b"\n")  # fmt: skip
            assert result.code == 0, result.stderr
            pubs = await server.wait_for_events("session_ended", len(published), command="pub")
            workers.add(pubs[-1]["worker"])
        assert await sub.lines(len(published)) == published


async def test_a_killed_worker_is_restarted(
    tmp_path: Path, users_dir: Path, add_user: Callable[[str], User], redis_url: str
) -> None:
    """SIGKILL on a worker: the supervisor logs it and starts another, which serves."""
    alice = add_user("alice")
    config = write_config(tmp_path, users_dir)
    async with two_workers(config, env={"DRAINBUS_REDIS_URL": redis_url}) as server:
        killed = (await server.wait_for_event("worker_started", worker=1))["pid"]
        os.kill(killed, signal.SIGKILL)
        exited = await server.wait_for_event("worker_exited", worker=1)
        assert (exited["pid"], exited["signal"]) == (killed, "SIGKILL")
        await server.wait_for_event("worker_restarting", worker=1)
        _, restarted = await server.wait_for_events("worker_started", 2, worker=1)
        await server.wait_for_event("serving", worker=1, pid=restarted["pid"])
        calls = 0
        while True:  # until a session lands on the new worker 1
            assert calls < 40, "40 connections, none on the restarted worker"
            result = await run_ssh(server.port, alice.key_file, "whoami")
            assert result.code == 0, result.stderr
            calls += 1
            sessions = await server.wait_for_events("session_ended", calls, command="whoami")
            if sessions[-1]["worker"] == 1:
                break


async def test_a_worker_that_cannot_restart_for_a_config_reason_stops_the_service(
    tmp_path: Path, users_dir: Path, redis_url: str
) -> None:
    """A host key broken since start-up: the restarted worker fails, and so does serve (78)."""
    config = write_config(tmp_path, users_dir)
    async with two_workers(config, env={"DRAINBUS_REDIS_URL": redis_url}) as server:
        (tmp_path / "host" / "ssh_host_ed25519_key").write_text("not a key\n")
        os.kill((await server.wait_for_event("worker_started", worker=0))["pid"], signal.SIGKILL)
        assert await asyncio.wait_for(server.proc.wait(), 20) == 78
        await server.reader
    assert len([e for e in server.log if e["event"] == "worker_started"]) == 3
    assert server.log[-2]["text"].startswith("drainbus: worker 0: host key ")


async def test_sigterm_stops_every_worker_and_the_embedded_server(
    short_tmp: Path, tmp_path: Path, users_dir: Path
) -> None:
    """SIGHUP reaches every worker; SIGTERM stops each cleanly, then the server; exit 0."""
    config = write_config(tmp_path, users_dir)
    data_dir = short_tmp / f"term-{tmp_path.name}"
    args = ("--data-dir", str(data_dir))
    async with two_workers(config, *args, env={"DRAINBUS_REDIS_URL": ""}) as server:
        workers = [e["pid"] for e in await server.wait_for_events("worker_started", 2)]
        embedded = (await server.wait_for_event("embedded_redis_started"))["pid"]
        server.proc.send_signal(signal.SIGHUP)
        for index in (0, 1):
            await server.wait_for_event("reload", worker=index, reason="SIGHUP")
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.proc.wait(), 20) == 0
        for index in (0, 1):
            await server.wait_for_event("stopped", worker=index)
        await server.wait_for_event("embedded_redis_stopped")
    assert not any(pid_alive(pid) for pid in (*workers, embedded))


async def test_killed_supervisor_leaves_no_orphan(
    short_tmp: Path, tmp_path: Path, users_dir: Path
) -> None:
    """SIGKILL on the supervisor takes its workers and the embedded server down with it."""
    config = write_config(tmp_path, users_dir)
    data_dir = short_tmp / f"kill-{tmp_path.name}"
    args = ("--data-dir", str(data_dir))
    async with two_workers(config, *args, env={"DRAINBUS_REDIS_URL": ""}) as server:
        workers = [e["pid"] for e in await server.wait_for_events("worker_started", 2)]
        embedded = (await server.wait_for_event("embedded_redis_started"))["pid"]
        server.proc.kill()
        await server.proc.wait()
    await wait_gone(*workers, embedded)


def run_serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drainbus", "--log-json", "serve", "--workers", "2", *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, **env}, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("option", "code", "fragment"),
    [
        pytest.param("--listen", 71, "cannot listen on 127.0.0.1:", id="ssh-port-taken"),
        pytest.param("--metrics-listen", 71, "cannot serve metrics on", id="metrics-port-taken"),
        pytest.param(None, 78, "mallory.pub", id="bad-user-key-file"),
    ],
)
def test_a_worker_that_cannot_start_stops_the_supervisor(
    tmp_path: Path, users_dir: Path, redis_url: str, option: str | None, code: int, fragment: str
) -> None:
    """A bind or config failure ends serve with its usual code and line, and no restarts."""
    config = write_config(tmp_path, users_dir)
    if option is None:
        (users_dir / "mallory.pub").write_text("this is not a key\n")
    with socket.socket() as other:  # a plain listener: it shares its port with nobody
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = [option, f"127.0.0.1:{other.getsockname()[1]}"] if option else []
        result = run_serve("--config", str(config), *taken, env={"DRAINBUS_REDIS_URL": redis_url})
    assert result.returncode == code, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("drainbus: ")
    assert fragment in last
    assert result.stderr.count('"worker_started"') <= 2
