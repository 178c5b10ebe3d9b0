"""Signals to a real `serve`: SIGUSR1 dumps its state to the log, SIGUSR2 and SIGPIPE do no harm."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.conftest import ServeProcess, Subscriber, User, run_ssh, serve_process
from tests.test_serve import write_config

Subscribe = Callable[..., Awaitable[Subscriber]]


async def still_serves(server: ServeProcess, user: User) -> None:
    result = await run_ssh(server.port, user.key_file, "whoami")
    assert result.code == 0, result.stderr
    assert server.proc.returncode is None


async def test_sigusr1_logs_sessions_and_readers_and_stray_signals_are_ignored(
    tmp_path: Path, users_dir: Path, add_user: Callable[[str], User], redis_url: str,
    subscribe: Subscribe,
) -> None:  # fmt: skip
    """With a live `sub`, SIGUSR1 logs the node, the user's connection and session, and the
    topic's reader; SIGUSR2 and SIGPIPE leave `serve` serving."""
    alice = add_user("alice")
    config = write_config(tmp_path, users_dir)
    async with serve_process(
        "--config", str(config), env={"DRAINBUS_REDIS_URL": redis_url}
    ) as server:
        sub = await subscribe(server.port, alice.key_file, "shared/watch", "--since", "all")
        published = await run_ssh(server.port, alice.key_file, "pub", "shared/watch", stdin=b"hi\n")
        assert published.code == 0, published.stderr
        assert await sub.line() == b"hi"  # the reader runs and has delivered
        for signum in (signal.SIGUSR2, signal.SIGPIPE):
            server.proc.send_signal(signum)
        server.proc.send_signal(signal.SIGUSR1)
        await server.wait_for_event("state_dump", reason="SIGUSR1")
        node = await server.wait_for_event("state_node")
        assert node["connections"] == 1
        assert node["sessions"] == 1
        assert node["subscribers"] == 1
        assert node["persistence"] == "ok"
        user = await server.wait_for_event("state_user", user="alice")
        assert (user["connections"], user["sessions"]) == (1, 1)
        reader = await server.wait_for_event("state_reader", topic="shared/watch")
        assert reader["subscribers"] == 1
        assert reader["queued_bytes_max"] == 0  # it keeps up: nothing waits in its inbox
        assert reader["position"] != "0-0"
        await still_serves(server, alice)
        await sub.stop()


async def test_the_supervisor_passes_sigusr1_to_every_worker(
    tmp_path: Path, users_dir: Path, add_user: Callable[[str], User], redis_url: str
) -> None:
    """Under `--workers 2`, SIGUSR1 to the supervisor makes each worker log its state, and
    SIGUSR2 / SIGPIPE stop neither the supervisor nor a worker."""
    alice = add_user("alice")
    config = write_config(tmp_path, users_dir)
    env = {"DRAINBUS_REDIS_URL": redis_url}
    async with serve_process("--config", str(config), "--workers", "2", env=env) as server:
        await server.wait_for_event("serving", workers=2)
        for signum in (signal.SIGUSR2, signal.SIGPIPE, signal.SIGUSR1):
            server.proc.send_signal(signum)
        for index in (0, 1):
            await server.wait_for_event("state_node", worker=index)
        await still_serves(server, alice)
        assert not [e for e in server.log if e["event"] in ("worker_exited", "worker_restarting")]
        server.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.proc.wait(), 20) == 0
