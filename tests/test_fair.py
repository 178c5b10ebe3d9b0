"""The drain's read-ahead backlog: one queue per publisher, served in turns; and the
heartbeat that keeps the entries it holds claimed (against a real Redis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import structlog
from redis.asyncio import Redis
from structlog.testing import capture_logs

from drainbus.bus.streams import Keys, Row
from drainbus.drain import fair
from drainbus.drain.fair import FairBacklog, keep_claimed


def rows(user: str, count: int, start: int = 0) -> list[Row]:
    """``count`` entries published by ``user``, ids ``USER-N``."""
    return [(f"{user}-{n}".encode(), {b"u": user.encode()}) for n in range(start, start + count)]


def ids(taken: list[Row]) -> list[str]:
    return [row[0].decode() for row in taken]


def test_an_empty_backlog_has_room_for_its_limit() -> None:
    backlog = FairBacklog(5)
    assert (len(backlog), backlog.users, backlog.room, backlog.limit) == (0, 0, 5, 5)
    assert backlog.take(3) == []


def test_entries_are_queued_per_publisher_and_fill_the_room() -> None:
    """Adding counts every entry and every publisher waiting; beyond the limit entries are
    kept (a restart's pending ones), and the room stays 0."""
    backlog = FairBacklog(5)
    backlog.add(rows("a", 2))
    backlog.add(rows("b", 1))
    assert (len(backlog), backlog.users, backlog.room) == (3, 2, 2)
    backlog.add(rows("a", 4, start=2))
    assert (len(backlog), backlog.users, backlog.room) == (7, 2, 0)
    assert ids(backlog.take(10)) == ["a-0", "b-0", "a-1", "a-2", "a-3", "a-4", "a-5"]
    assert (len(backlog), backlog.users, backlog.room) == (0, 0, 5)


def test_one_publisher_gets_a_slice_in_stream_order() -> None:
    """With one publisher waiting, a batch is the next ``most`` of its entries."""
    backlog = FairBacklog(100)
    backlog.add(rows("a", 5))
    assert ids(backlog.take(3)) == ["a-0", "a-1", "a-2"]
    assert (len(backlog), backlog.users) == (2, 1)
    assert ids(backlog.take(3)) == ["a-3", "a-4"]
    assert (len(backlog), backlog.users) == (0, 0)


def test_several_publishers_take_turns_and_keep_their_turn_across_batches() -> None:
    """One entry per publisher in turn; the next batch starts with the publisher after the
    last one served; a publisher arriving joins at the back."""
    backlog = FairBacklog(100)
    backlog.add(rows("a", 4))
    backlog.add(rows("b", 1))
    backlog.add(rows("c", 2))
    assert ids(backlog.take(4)) == ["a-0", "b-0", "c-0", "a-1"]
    assert backlog.users == 2  # b is done
    backlog.add(rows("d", 1))
    assert ids(backlog.take(3)) == ["c-1", "a-2", "d-0"]
    assert ids(backlog.take(5)) == ["a-3"]
    assert len(backlog) == 0


def test_entries_without_a_publisher_share_one_queue() -> None:
    """Entries with no ``u`` field (written before it existed) wait as one more publisher."""
    backlog = FairBacklog(10)
    backlog.add([(b"x-0", {}), (b"x-1", {b"d": b"k"})])
    backlog.add(rows("a", 1))
    assert backlog.users == 2
    assert ids(backlog.take(3)) == ["x-0", "a-0", "x-1"]


def test_ids_lists_every_entry_held_and_clear_forgets_them() -> None:
    backlog = FairBacklog(10)
    backlog.add(rows("a", 2))
    backlog.add(rows("b", 1))
    assert sorted(backlog.ids()) == [b"a-0", b"a-1", b"b-0"]
    backlog.clear()
    assert (len(backlog), backlog.users, backlog.room, backlog.ids()) == (0, 0, 10, [])


# --- keep_claimed ----------------------------------------------------------------------------


class Rounds:
    """The ``ids`` callable for keep_claimed: the ids to keep, and a signal once keep_claimed
    asks for them a second time (so its first round of claims is done)."""

    def __init__(self, held: Sequence[bytes]) -> None:
        self.held = list(held)
        self.asked = 0
        self.second = anyio.Event()

    def __call__(self) -> list[bytes]:
        self.asked += 1
        if self.asked == 2:
            self.second.set()
        return self.held


async def one_round(redis: Redis, stream: str, rounds: Rounds) -> None:
    """Run keep_claimed (group ``g``, consumer ``me``) until its first round of claims is done."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: keep_claimed(redis, stream, group="g", consumer="me", ids=rounds, every=0)
        )
        with anyio.fail_after(5):
            await rounds.second.wait()
        tg.cancel_scope.cancel()


async def test_held_entries_are_claimed_again_without_counting_a_delivery(
    redis: Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every held entry's idle time is reset (in chunks of ids), its delivery count kept;
    entries not held are left idle."""
    monkeypatch.setattr(fair, "_CLAIM_CHUNK", 2)
    stream = Keys(namespace).stream("cache-drain")
    await redis.xgroup_create(stream, "g", id="$", mkstream=True)
    for n in range(6):
        await redis.xadd(stream, {"d": f"site-{n}"})
    read: Any = await redis.xreadgroup("g", "me", {stream: ">"}, count=6)
    all_ids = [entry_id for entry_id, _ in read[0][1]]
    await redis.xclaim(stream, "g", "me", 0, all_ids, idle=600_000, justid=True)  # long idle
    await one_round(redis, stream, Rounds(all_ids[:5]))
    pending: Any = await redis.xpending_range(stream, "g", min="-", max="+", count=10)
    idle = {p["message_id"]: p["time_since_delivered"] for p in pending}
    assert all(idle[i] < 60_000 for i in all_ids[:5])
    assert idle[all_ids[5]] >= 600_000
    assert {p["times_delivered"] for p in pending} == {1}


async def test_a_failing_heartbeat_is_logged_and_retried(
    redis: Redis, namespace: str, fresh_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis refusing the claim (the group is gone) is a warning naming the group and the
    error; the heartbeat goes on to its next round."""
    monkeypatch.setattr(fair, "log", structlog.get_logger(fair.__name__))
    stream = Keys(namespace).stream("cache-drain")
    await redis.xadd(stream, {"d": "site"})
    with capture_logs() as logs:
        await one_round(redis, stream, Rounds([b"1-0"]))
    [failed] = [e for e in logs if e["event"] == "drain_heartbeat_failed"]
    assert (failed["group"], failed["log_level"]) == ("g", "warning")
    assert "NOGROUP" in failed["error"]
