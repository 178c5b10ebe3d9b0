"""Delivery guarantees: slow subscribers, Redis going away, ordering without gaps or repeats."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from drainbus.bus.embedded import EmbeddedRedis
from tests.conftest import RunningBus, Subscriber, User, run_ssh, wait_subscribed

StartBus = Callable[..., Awaitable[RunningBus]]
Subscribe = Callable[..., Awaitable[Subscriber]]


async def test_stalled_subscriber_neither_blocks_others_nor_loses_messages(
    start_bus: StartBus, add_user: Callable[[str], User], subscribe: Subscribe
) -> None:
    """A subscriber that stops reading does not hold up another; later it gets everything."""
    alice = add_user("alice")
    node = await start_bus(server={"subscriber_buffer_bytes": 65536})
    stalled = await subscribe(node.port, alice.key_file, "alice/firehose")
    reading = await subscribe(node.port, alice.key_file, "alice/firehose")
    await wait_subscribed(node.bus, "alice/firehose", 2)

    count = 60_000  # ~6 MB: more than the pipe, the SSH window and the inbox together
    payload = b"".join(b"%06d %s\n" % (n, b"x" * 92) for n in range(count))
    publish = asyncio.create_task(
        run_ssh(node.port, alice.key_file, "pub", "alice/firehose", stdin=payload, timeout=120)
    )
    received = await reading.lines(count, timeout=60)
    assert [int(line[:6]) for line in received] == list(range(count))
    assert (await publish).code == 0
    assert node.bus.fanout.lagged >= 1, "the stalled subscriber should have overflowed"

    late = await stalled.lines(count, timeout=60)
    assert [int(line[:6]) for line in late] == list(range(count))


async def test_subscriber_survives_redis_restart_without_gap_or_repeat(
    start_bus: StartBus, add_user: Callable[[str], User], subscribe: Subscribe, short_tmp: Path
) -> None:
    """Redis restarts under a live sub: pub fails with 69 meanwhile, sub resumes exactly."""
    alice = add_user("alice")
    server = EmbeddedRedis(short_tmp / "restart-redis")
    server.start()
    try:
        node = await start_bus(redis_url=server.url)
        sub = await subscribe(node.port, alice.key_file, "alice/r")
        await wait_subscribed(node.bus, "alice/r")
        assert (
            await run_ssh(node.port, alice.key_file, "pub", "alice/r", stdin=b"1\n2\n")
        ).code == 0
        assert await sub.lines(2) == [b"1", b"2"]

        server.stop()
        down = await run_ssh(node.port, alice.key_file, "pub", "alice/r", stdin=b"lost\n")
        assert down.code == 69
        assert "backend unavailable" in down.stderr
        assert "0 message(s) of this session were stored" in down.stderr

        server.start()
        back = await run_ssh(node.port, alice.key_file, "pub", "alice/r", stdin=b"3\n4\n")
        assert back.code == 0
        assert await sub.lines(2) == [b"3", b"4"]
        assert (await run_ssh(node.port, alice.key_file, "pub", "alice/r", stdin=b"5\n")).code == 0
        assert await sub.line() == b"5"
    finally:
        server.stop()


async def test_replay_then_live_has_no_gap_or_repeat(
    start_bus: StartBus, add_user: Callable[[str], User], subscribe: Subscribe
) -> None:
    """--since all while publishing continues: every message once, in order."""
    alice = add_user("alice")
    node = await start_bus()
    history = b"".join(b"%d\n" % n for n in range(3000))
    assert (await run_ssh(node.port, alice.key_file, "pub", "alice/mix", stdin=history)).code == 0
    sub = await subscribe(node.port, alice.key_file, "alice/mix", "--since", "all")
    more = b"".join(b"%d\n" % n for n in range(3000, 6000))
    publish = asyncio.create_task(
        run_ssh(node.port, alice.key_file, "pub", "alice/mix", stdin=more)
    )
    lines = await sub.lines(6000)
    assert [int(x) for x in lines] == list(range(6000))
    assert (await publish).code == 0


async def test_pub_to_unreachable_redis_exits_69_at_start(
    start_bus: StartBus, add_user: Callable[[str], User], short_tmp: Path
) -> None:
    """A sub started while Redis is down fails fast with exit 69 and a clear message."""
    alice = add_user("alice")
    server = EmbeddedRedis(short_tmp / "gone-redis")
    server.start()
    node = await start_bus(redis_url=server.url)
    server.stop()
    result = await run_ssh(node.port, alice.key_file, "sub", "alice/x")
    assert result.code == 69
    assert (
        "backend unavailable: Redis did not answer while subscribing to 'alice/x'" in result.stderr
    )
