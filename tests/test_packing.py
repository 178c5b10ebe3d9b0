"""Packed entries: a burst from one pub shares stream entries, yet every line stays addressable.

The line splitter's fast path (whole chunks split at once) must agree exactly with the
line-by-line path, whatever the chunking; the end-to-end tests go through OpenSSH.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from drainbus.bus.streams import read_rows
from drainbus.errors import NotDurable
from drainbus.ssh.commands import SessionContext
from drainbus.ssh.pub import LinePublisher
from tests.conftest import RunningBus, User, run_ssh

StartBus = Callable[..., Awaitable[RunningBus]]

_INPUTS = [
    b"one\ntwo\nthree\n",
    b"no-final-newline\nlast",
    b"crlf\r\nline\r\n\r\nend",
    b"empty\n\n\nlines\n",
    b"short\n" + b"x" * 30 + b"\nafter-long\n" + b"y" * 21 + b"\n",
    b"cr-inside\rstays\n\r\n\r",
]


def _split(data: bytes, *, chunk: int, slow: bool) -> tuple[list[bytes], int, list[str]]:
    """Feed ``data`` in ``chunk``-byte pieces; return stored lines, line count, errors."""
    errors: list[str] = []
    ctx = SimpleNamespace(
        identity=None,
        line_checks={"t": lambda identity, line: None} if slow else {},
        settings=SimpleNamespace(server=SimpleNamespace(max_message_bytes=20)),
        stderr=errors.append,
    )
    lines = LinePublisher(cast(SessionContext, ctx), "t")
    for start in range(0, len(data), chunk):
        lines.feed(data[start : start + chunk])
    lines.finish()
    return lines.pending, lines.line_number, errors


@pytest.mark.parametrize("data", _INPUTS)
def test_fast_split_agrees_with_line_by_line_for_any_chunking(data: bytes) -> None:
    """Same lines, same line numbers, same errors: CRLF, empties, long lines, no final LF."""
    expected = _split(data, chunk=1, slow=True)
    for chunk in [*range(1, len(data) + 1), 65536]:
        assert _split(data, chunk=chunk, slow=False) == expected, f"chunk={chunk}"


async def test_a_burst_shares_entries_and_each_line_keeps_its_id(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """20,000 lines in one pub: far fewer entries, all lines in order, ID:INDEX resumable."""
    alice = add_user("alice")
    node = await start_bus()
    lines = [f"line-{n:05}".encode() for n in range(20_000)]
    stdin = b"\n".join(lines) + b"\n"
    assert (await run_ssh(node.port, alice.key_file, "pub", "alice/burst", stdin=stdin)).code == 0
    entries = await node.bus.redis.xlen(node.bus.keys.stream("alice/burst"))
    assert 2 <= entries <= 40  # 220 KB arrives in several SSH reads; each read is packed

    replay = await run_ssh(
        node.port, alice.key_file, "sub", "alice/burst", "--since", "all", "--count", "20000"
    )
    assert replay.stdout == stdin

    records = [
        json.loads(r)
        for r in (
            await run_ssh(
                node.port,
                alice.key_file,
                *("sub", "alice/burst", "--since", "all", "--count", "20000", "--json"),
            )
        ).stdout.splitlines()
    ]
    assert [r["data"].encode() for r in records] == lines
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    assert all(":" in i for i in ids)  # every entry of this burst is packed

    resumed = await run_ssh(
        node.port, alice.key_file, "sub", "alice/burst", "--since", ids[12_345], "--count", "3"
    )
    assert resumed.stdout == b"line-12346\nline-12347\nline-12348\n"


async def test_a_single_line_entry_keeps_a_plain_id(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """A pub of one line stores an ordinary entry, and --json shows its plain stream id."""
    alice = add_user("alice")
    node = await start_bus()
    await run_ssh(node.port, alice.key_file, "pub", "alice/one", stdin=b"hello\n")
    replay = await run_ssh(
        node.port, alice.key_file, "sub", "alice/one", "--since", "all", "--count", "1", "--json"
    )
    record: dict[str, Any] = json.loads(replay.stdout)
    assert ":" not in record["id"]
    stored = await read_rows(node.bus.redis, node.bus.keys.stream("alice/one"))
    assert record["id"] == stored[0][0].decode()


async def test_checked_purge_lines_are_stored_one_entry_each(
    start_bus: StartBus, add_user: Callable[[str], User]
) -> None:
    """cache-drain lines are never packed: the drain acks and dead-letters each on its own."""
    acme = add_user("acme")
    node = await start_bus()
    stdin = b"acme-blog\ntag:acme-news\nacme-shop\n"
    assert (await run_ssh(node.port, acme.key_file, "pub", "cache-drain", stdin=stdin)).code == 0
    assert await node.bus.redis.xlen(node.bus.keys.stream("cache-drain")) == 3


class _PublisherWhoseDiskFails:
    """Stores every batch, but a durability check finds the server's AOF write failed."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def publish(self, topic: str, messages: list[bytes], **options: Any) -> list[Any]:
        self.calls.append(f"publish confirm={options['confirm']}")
        return [None] * len(messages)

    async def confirm(self, topic: str) -> None:
        self.calls.append("confirm")
        raise NotDurable("not durable: Redis persistence is failing", topic=topic)


async def test_a_session_counts_as_stored_only_what_was_confirmed_durable() -> None:
    """Lines go out without a durability round trip each; before the session says anything
    was stored it confirms, and when that fails it counts only what was confirmed."""
    publisher = _PublisherWhoseDiskFails()
    ctx = SimpleNamespace(
        identity=SimpleNamespace(user="alice"),
        line_checks={},
        settings=SimpleNamespace(server=SimpleNamespace(max_message_bytes=100)),
        stderr=[].append,
        bus=SimpleNamespace(publisher=publisher),
    )
    lines = LinePublisher(cast(SessionContext, ctx), "t")
    lines.feed(b"a\nb\n")
    await lines.flush()
    assert (lines.published, lines.confirmed, publisher.calls) == (2, 0, ["publish confirm=False"])
    with pytest.raises(NotDurable) as caught:
        await lines.confirm()
    assert publisher.calls[-1] == "confirm"
    assert str(caught.value).endswith(
        "0 message(s) of this session were stored before it, the rest are not"
    )
    assert lines.confirmed == 0
