"""Stream ids, key names, the entry format, and the stream reads the bus is made of."""

from __future__ import annotations

import time

import pytest
from redis.asyncio import Redis

from drainbus.bus.streams import (
    ZERO_ID,
    Entry,
    Keys,
    StreamInfo,
    entry_fields,
    format_id,
    parse_id,
    read_after,
    read_rows,
    rfc3339,
    stream_info,
    text,
)

# --- ids, times, names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"1700000000000-3", (1700000000000, 3), id="bytes"),
        pytest.param("1700000000000-3", (1700000000000, 3), id="str"),
        pytest.param("1700000000000", (1700000000000, 0), id="bare-ms-is-seq-0"),
        pytest.param(b"5", (5, 0), id="bare-ms-bytes"),
    ],
)
def test_parse_id(raw: bytes | str, expected: tuple[int, int]) -> None:
    """An id reads as (ms, seq), from bytes or str; a bare ``ms`` means ``ms-0``."""
    assert parse_id(raw) == expected
    assert format_id(expected) == f"{expected[0]}-{expected[1]}"


def test_text_decodes_replies_and_passes_str_through() -> None:
    """Redis replies arrive as bytes; text() gives str either way."""
    assert text(b"caf\xc3\xa9") == "café"
    assert text("café") == "café"


def test_rfc3339_is_utc_with_milliseconds() -> None:
    """Epoch milliseconds render as RFC 3339 in UTC, 'Z' suffix, millisecond precision."""
    assert rfc3339(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"


def test_key_names_are_the_documented_ones() -> None:
    """Key names are an interface (operators and other nodes read them): they must not drift."""
    keys = Keys()
    assert keys.namespace == "drainbus"
    assert (keys.topics, keys.nodes) == ("drainbus:topics", "drainbus:nodes")
    assert keys.stream("a/b") == "drainbus:{a/b}:stream"
    other = Keys("t1")
    assert (other.topics, other.nodes) == ("t1:topics", "t1:nodes")
    assert other.stream("x") == "t1:{x}:stream"
    assert other.dead_letters("x") == "t1:{x}:dead"


# --- the entry format -----------------------------------------------------------------------


def test_entry_fields_of_one_message_are_d_u_m_t() -> None:
    """One plain message stores d, u, m and t (receipt time in ms); no n, no r."""
    before = int(time.time() * 1000)
    fields = entry_fields(b"hello", user="alice", message_id="ab12", raw=False)
    after = int(time.time() * 1000)

    assert set(fields) == {"d", "u", "m", "t"}
    assert (fields["d"], fields["u"], fields["m"]) == (b"hello", "alice", "ab12")
    assert isinstance(fields["t"], int)
    assert before <= fields["t"] <= after


def test_entry_fields_mark_packed_and_raw_entries() -> None:
    """n counts the messages of a packed entry (2 or more); r is '1' for a raw chunk."""
    packed = entry_fields(b"a\nb", user="u", message_id="m", raw=False, count=2)
    assert packed["n"] == 2
    assert "r" not in packed
    raw = entry_fields(b"chunk", user="u", message_id="m", raw=True)
    assert raw["r"] == "1"
    assert "n" not in raw


def test_from_redis_reads_every_field() -> None:
    """A stored entry decodes to what was stored."""
    entry = Entry.from_redis(
        b"1700000000000-7",
        {b"d": b"a\nb\nc", b"u": b"alice", b"m": b"ab12", b"t": b"1699999999999", b"n": b"3",
         b"r": b"1"},
    )  # fmt: skip
    assert entry == Entry(
        id=(1700000000000, 7),
        data=b"a\nb\nc",
        user="alice",
        message_id="ab12",
        received_ms=1699999999999,
        raw=True,
        count=3,
        packed=True,
    )


def test_from_redis_defaults_for_missing_fields() -> None:
    """Absent fields read as: no data, no user, no id, received at the id's time, 1 message."""
    entry = Entry.from_redis(b"1700000000000-7", {})
    assert entry == Entry(
        id=(1700000000000, 7),
        data=b"",
        user="",
        message_id="",
        received_ms=1700000000000,
        raw=False,
        count=1,
        packed=False,
    )
    assert entry.messages() == [b""]


def test_from_redis_replaces_undecodable_names() -> None:
    """A user or message id that is not valid text reads with U+FFFD, rather than failing."""
    entry = Entry.from_redis(b"1-0", {b"d": b"x", b"u": b"al\xffce", b"m": b"m\xff1"})
    assert entry.user == "al\ufffdce"
    assert entry.message_id == "m\ufffd1"


def test_from_redis_packed_only_from_two_messages() -> None:
    """n=2 is packed; n=1 (or no n) is a plain entry, whatever its data holds."""
    two = Entry.from_redis(b"1-0", {b"d": b"a\nb", b"n": b"2"})
    assert (two.count, two.packed, two.messages()) == (2, True, [b"a", b"b"])
    one = Entry.from_redis(b"1-0", {b"d": b"a\nb", b"n": b"1"})
    assert (one.count, one.packed, one.messages()) == (1, False, [b"a\nb"])


def _packed(*messages: bytes, offset: int = 0) -> Entry:
    return Entry(
        id=(9, 2),
        data=b"\n".join(messages),
        user="alice",
        message_id="m",
        received_ms=9,
        raw=False,
        count=len(messages),
        packed=len(messages) > 1,
        offset=offset,
    )


def test_message_ids_address_each_message_of_a_packed_entry() -> None:
    """A plain entry is its stream id; a packed one's messages are ID:INDEX from its offset."""
    assert _packed(b"only").message_ids() == ["9-2"]
    assert _packed(b"a", b"b", b"c").message_ids() == ["9-2:0", "9-2:1", "9-2:2"]
    assert _packed(b"c", b"d", offset=2).message_ids() == ["9-2:2", "9-2:3"]


def test_packed_messages_split_at_newlines_only() -> None:
    """Messages of a packed entry may hold spaces and tabs: only the newline separates them."""
    assert _packed(b"a b", b"c\td").messages() == [b"a b", b"c\td"]


def test_first_keeps_the_first_messages_and_their_ids() -> None:
    """first(n) cuts after n messages; n at or past the end is the entry itself."""
    entry = _packed(b"a", b"b", b"c", offset=1)
    cut = entry.first(2)
    assert (cut.messages(), cut.count, cut.offset) == ([b"a", b"b"], 2, 1)
    assert cut.message_ids() == ["9-2:1", "9-2:2"]
    assert entry.first(3) is entry
    assert entry.first(4) is entry


def test_without_first_drops_messages_and_keeps_their_ids() -> None:
    """without_first(n) drops n messages, shifting the offset; nothing left is None."""
    entry = _packed(b"a", b"b", b"c", offset=1)
    assert entry.without_first(0) is entry
    assert entry.without_first(-1) is entry
    rest = entry.without_first(1)
    assert rest is not None
    assert (rest.messages(), rest.count, rest.offset) == ([b"b", b"c"], 2, 2)
    assert rest.message_ids() == ["9-2:2", "9-2:3"]
    last = entry.without_first(2)
    assert last is not None
    assert (last.messages(), last.message_ids()) == ([b"c"], ["9-2:3"])
    assert entry.without_first(3) is None
    assert entry.without_first(4) is None


# --- reading streams ------------------------------------------------------------------------


def test_was_trimmed_once_entries_were_removed() -> None:
    """A stream was trimmed when fewer entries remain than were ever added."""
    assert not StreamInfo(length=3, last_id=(3, 0), first_id=(1, 0), entries_added=3).was_trimmed
    assert StreamInfo(length=2, last_id=(3, 0), first_id=(2, 0), entries_added=3).was_trimmed


async def test_stream_info_of_a_stream_and_of_none(redis: Redis, namespace: str) -> None:
    """XINFO as first and last id, length, entries added; None for a missing stream."""
    key = Keys(namespace).stream("info")
    assert await stream_info(redis, key) is None
    for ms in (5, 6, 7):
        await redis.xadd(key, {"d": b"x"}, id=f"{ms}-1")

    assert await stream_info(redis, key) == StreamInfo(
        length=3, last_id=(7, 1), first_id=(5, 1), entries_added=3
    )
    await redis.xtrim(key, maxlen=1, approximate=False)
    trimmed = await stream_info(redis, key)
    assert trimmed == StreamInfo(length=1, last_id=(7, 1), first_id=(7, 1), entries_added=3)
    assert trimmed.was_trimmed
    await redis.xdel(key, "7-1")
    assert await stream_info(redis, key) == StreamInfo(
        length=0, last_id=(7, 1), first_id=None, entries_added=3
    )


async def test_read_after_starts_strictly_after_the_id(redis: Redis, namespace: str) -> None:
    """read_after(ZERO_ID) reads from the start; after an id, from the entry after it."""
    key = Keys(namespace).stream("after")
    for ms in (1, 2, 3, 4):
        await redis.xadd(key, entry_fields(b"m%d" % ms, user="u", message_id="", raw=False),
                         id=f"{ms}-0")  # fmt: skip

    assert [e.id for e in await read_after(redis, key, ZERO_ID, 10)] == [
        (1, 0), (2, 0), (3, 0), (4, 0)
    ]  # fmt: skip
    after_two = await read_after(redis, key, (2, 0), 10)
    assert [(e.id, e.data) for e in after_two] == [((3, 0), b"m3"), ((4, 0), b"m4")]
    assert [e.id for e in await read_after(redis, key, (2, 0), 1)] == [(3, 0)]
    assert await read_after(redis, key, (4, 0), 10) == []


async def test_read_rows_reads_a_range(redis: Redis, namespace: str) -> None:
    """read_rows is XRANGE: whole stream by default, or from min to max, at most count."""
    key = Keys(namespace).stream("rows")
    for ms in (1, 2, 3):
        await redis.xadd(key, {"d": b"%d" % ms}, id=f"{ms}-0")

    assert [i for i, _ in await read_rows(redis, key)] == [b"1-0", b"2-0", b"3-0"]
    assert [i for i, _ in await read_rows(redis, key, min="2", max="2")] == [b"2-0"]
    assert [i for i, _ in await read_rows(redis, key, count=2)] == [b"1-0", b"2-0"]
    assert (await read_rows(redis, key, min="3"))[0][1] == {b"d": b"3"}
