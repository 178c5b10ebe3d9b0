"""A full disk under the embedded server: `pub` counts only what survives a kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aredis

from tests.conftest import User, run_ssh, serve_process

ACL = '[[acl]]\ntopics = ["shared/**"]\npublish = ["*"]\nsubscribe = ["*"]\n'
STORED = re.compile(r"(\d+) message\(s\) of this session were stored")


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path``; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


async def stored_lines(socket_path: Path, topic_key: str) -> set[bytes]:
    """Every message line the stream holds (packed entries split into their lines)."""
    client = aredis.Redis(unix_socket_path=str(socket_path))
    try:
        rows = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(topic_key))
    finally:
        await client.aclose()
    return {line for _id, fields in rows for line in fields[b"d"].split(b"\n")}


async def test_a_full_disk_fails_pub_with_75_and_loses_nothing_it_reported_stored(
    short_tmp: Path,
    tmp_path: Path,
    users_dir: Path,
    add_user: Callable[[str], User],
) -> None:
    """Publish into a 1 MiB data disk until the server cannot append to its AOF: that pub
    exits 75 and counts only what was durable; later pubs exit 75 too (MISCONF); `stats`
    and the metrics say so. Once there is room again, pub works again; after a kill -9 of
    the server and a restart, every message reported stored is there."""
    root = add_user("root")
    data_dir = short_tmp / f"full-{os.getpid()}-{tmp_path.name[-12:]}"
    config = tmp_path / "drainbus.toml"
    config.write_text(
        f'namespace = "full"\ndata_dir = "{data_dir}"\nmetrics_listen = "127.0.0.1:0"\n'
        f'[server]\nlisten = "127.0.0.1:0"\nusers_dir = "{users_dir}"\n'
        f'host_keys_dir = "{tmp_path / "host"}"\nadmins = ["root"]\n{ACL}'
    )
    env = {"DRAINBUS_REDIS_URL": ""}
    reported: list[bytes] = []  # every line some pub said was stored
    with small_tmpfs(data_dir, "1m"):
        async with serve_process("--config", str(config), env=env) as server:
            embedded = (await server.wait_for_event("embedded_redis_started"))["pid"]
            failed = None
            for n in range(40):
                # 6 writes of ~50 KB each: stdin arrives in several chunks, so several
                # batches, and the failing pub can report a part as stored.
                lines = [f"pub{n}-line{i:05d}-".encode().ljust(200, b"x") for i in range(1500)]
                result = await run_ssh(server.port, root.key_file, "pub", "shared/fill",
                                       stdin=b"\n".join(lines) + b"\n")  # fmt: skip
                if result.code == 0:
                    reported += lines
                    continue
                assert result.code == 75, result.stderr
                failed = result
                count = STORED.search(result.stderr)
                assert count, result.stderr
                reported += lines[: int(count[1])]
                break
            assert failed is not None, "1 MiB never filled up"
            assert "not durable" in failed.stderr
            await server.wait_for_event("persistence_failing")
            again = await run_ssh(server.port, root.key_file, "pub", "shared/fill", stdin=b"x\n")
            assert again.code == 75, again.stderr
            assert "0 message(s) of this session were stored" in again.stderr
            stats = await run_ssh(server.port, root.key_file, "stats", "--json")
            assert json.loads(stats.stdout)["persistence"]["ok"] is False
            text = await run_ssh(server.port, root.key_file, "stats")
            assert text.stdout.startswith(b"persistence: failing: "), text.stdout
            port = (await server.wait_for_event("metrics_listening"))["listen"].rsplit(":", 1)[1]
            metrics = await asyncio.to_thread(_scrape, int(port))
            assert re.search(r"^drainbus_persistence_ok\{node=.*\} 0\.0$", metrics, re.M)
            resize(data_dir, "64m")  # the operator makes room: the server resumes by itself
            await server.wait_for_event("persistence_recovered")
            after = await run_ssh(server.port, root.key_file, "pub", "shared/fill",
                                  stdin=b"after-the-disk-was-freed\n")  # fmt: skip
            assert (after.code, after.stderr) == (0, "")
            reported.append(b"after-the-disk-was-freed")
            os.kill(embedded, signal.SIGKILL)
        async with serve_process("--config", str(config), env=env):
            found = await stored_lines(data_dir / "redis.sock", "full:{shared/fill}:stream")
    missing = [line for line in reported if line not in found]
    assert not missing, f"{len(missing)} of {len(reported)} reported lines lost: {missing[:3]}"
    assert len(reported) > 1500, "no pub went through before the disk filled"


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()
