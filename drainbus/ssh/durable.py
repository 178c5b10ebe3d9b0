"""``sub TOPIC --durable NAME``: a ``sub --since <saved position>`` that saves its progress.

When the position advances. Writing to an SSH channel only buffers, so a message counts as
sent once its bytes have left this process *and* the client's TCP stack acknowledged them:

1. the channel's send buffer no longer holds them (asyncssh handed them to the transport);
2. then the transport's buffer was seen empty (they are in the kernel's socket buffer), at
   which moment the socket's acknowledged-byte counter plus its queue (TCP_INFO
   ``tcpi_bytes_acked`` + ``SIOCOUTQ``) marks where they end;
3. then the acknowledged-byte counter passed that mark (the client's machine has them).

Only then is the message's id saved. A worker, node or Redis that dies can therefore only
cause repeats of what was in flight, never a gap. Where the kernel counters are unavailable
(not Linux), step 3 is skipped: a crash of the whole machine could then lose what its socket
buffer held. Saves are coalesced (at most one per ``_SAVE_EVERY``) and retried on the next
tick when Redis fails, which again only delays the position.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from redis.exceptions import RedisError

from drainbus.bus.connection import backend_error
from drainbus.bus.durable import LAG_CAP, DurableStore, check_durable_name
from drainbus.bus.fanout import Batch
from drainbus.bus.streams import format_id, stream_info
from drainbus.errors import UsageError
from drainbus.ssh.since import Since

if TYPE_CHECKING:
    from drainbus.ssh.commands import SessionContext

__all__ = ["DurableCursor", "durable_cursor"]

log = structlog.get_logger(__name__)

_TICK = 0.05  # seconds between looks at the buffers
_SAVE_EVERY = 0.1  # seconds: at most this often a save, however fast messages go
_FINAL_WAIT = 2.0  # seconds a session that ends by itself waits for its last bytes to land
_TCPI_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in struct tcp_info (Linux >= 4.1)


def _tcp_sent_and_acked(sock: Any) -> tuple[int, int] | None:
    """(bytes handed to the socket, bytes the peer acknowledged), or None where unknown."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        if len(info) < _TCPI_BYTES_ACKED + 8:
            return None
        (acked,) = struct.unpack_from("=Q", info, _TCPI_BYTES_ACKED)
        (queued,) = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
    except (OSError, AttributeError):
        return None
    return acked + queued, acked


class DurableCursor:
    """Follows where a durable ``sub`` session's bytes are, and saves what reached the client.

    After :meth:`start`, ``confirmed`` is where the session resumes (a ``--since`` value);
    call :meth:`sent` after each batch is written.
    """

    def __init__(self, ctx: SessionContext, store: DurableStore, topic: str, name: str) -> None:
        self._ctx = ctx
        self._store = store
        self._topic = topic
        self._name = name
        self._channel = ctx.process.channel
        self._written: deque[tuple[int, str]] = deque()  # (channel byte offset, position)
        self._in_transport: str | None = None
        self._in_kernel: deque[tuple[int, str]] = deque()  # (acked-byte mark, position)
        self.confirmed: str | None = None
        self._saved: str | None = None
        self._saved_at = 0.0

    async def start(self, since: Since | None) -> None:
        """Load the saved position, or create it at ``since`` (None: the newest message)."""
        user = self._ctx.identity.user
        redis = self._ctx.bus.redis
        try:
            saved = await self._store.load(self._topic, user, self._name)
            if saved is None:
                if since is None:
                    info = await stream_info(redis, self._ctx.bus.keys.stream(self._topic))
                    since = (info.last_id if info else (0, 0)), None
                saved = _position(since)
                await self._store.save(self._topic, user, self._name, saved)
        except (RedisError, OSError) as exc:
            raise backend_error(exc, f"reading durable position '{self._name}'") from exc
        self._saved = self.confirmed = saved
        self._saved_at = time.monotonic()
        log.info("durable_resumed", durable=self._name, position=saved)

    def sent(self, batch: Batch) -> None:
        """``batch`` was just written to the channel (its bytes end at ``bytes_out``)."""
        self._written.append((self._ctx.bytes_out, batch.entries[-1].message_ids()[-1]))

    @property
    def in_flight(self) -> bool:
        """True while written messages have not yet been acknowledged by the client."""
        return bool(self._written or self._in_transport or self._in_kernel)

    def tick(self) -> None:
        """Advance ``confirmed`` as far as the buffers and the socket show it may."""
        channel_sent = self._ctx.bytes_out - self._channel.get_write_buffer_size()
        while self._written and self._written[0][0] <= channel_sent:
            self._in_transport = self._written.popleft()[1]
        conn = self._channel.get_connection()
        # asyncssh exposes neither its transport's buffer nor its held packets: private names.
        transport = getattr(conn, "_transport", None)
        if transport is None:
            return  # the connection is gone: what it still held is lost, not sent
        counters = _tcp_sent_and_acked(conn.get_extra_info("socket"))
        # During a key exchange asyncssh holds packets back (_deferred_packets): not sent.
        held = bool(getattr(conn, "_deferred_packets", None))
        if self._in_transport is not None and not held and transport.get_write_buffer_size() == 0:
            mark = counters[0] if counters else 0
            self._in_kernel.append((mark, self._in_transport))
            self._in_transport = None
        acked = counters[1] if counters else 0
        while self._in_kernel and self._in_kernel[0][0] <= acked:
            self.confirmed = self._in_kernel.popleft()[1]

    async def save(self, *, force: bool = False) -> None:
        """Save ``confirmed`` if it moved (or ``force``); a Redis error leaves it for later."""
        if self.confirmed is None or (self.confirmed == self._saved and not force):
            return
        position = self.confirmed
        try:
            await self._store.save(self._topic, self._ctx.identity.user, self._name, position)
        except (RedisError, OSError) as exc:
            log.warning("durable_save_failed", durable=self._name, error=str(exc))
            return
        self._saved, self._saved_at = position, time.monotonic()

    async def run(self, keepalive: float) -> None:
        """Tick and save until cancelled; save at least every ``keepalive`` s (renews the TTL)."""
        while True:
            await anyio.sleep(_TICK)
            self.tick()
            idle = time.monotonic() - self._saved_at
            if idle >= _SAVE_EVERY and self.confirmed != self._saved:
                await self.save()
            elif idle >= keepalive:
                await self.save(force=True)

    async def finish(self) -> None:
        """Give the last bytes a moment to land (unless the channel closed), then save."""
        with anyio.move_on_after(_FINAL_WAIT):
            while self.in_flight and not self._channel.is_closing():
                self.tick()
                await anyio.sleep(_TICK)
        self.tick()
        with anyio.move_on_after(_FINAL_WAIT):
            await self.save()


def _position(since: Since) -> str:
    """A ``--since`` start as a saved position: the last message *before* the start."""
    after, inside = since
    if inside is None:
        return format_id(after)
    entry, skip = inside
    return f"{format_id(entry)}:{skip - 1}"


@asynccontextmanager
async def durable_cursor(
    ctx: SessionContext, topic: str, name: str | None, since: Since | None, *, receipts: bool
) -> AsyncIterator[DurableCursor | None]:
    """A started :class:`DurableCursor` for ``sub --durable NAME`` (None without it), saving
    in the background while the session runs and once more when it ends."""
    if name is None:
        yield None
        return
    check_durable_name(name)
    if receipts:
        raise UsageError("sub --durable follows the topic's messages, not --receipts")
    retention = ctx.settings.topics.retention
    store = DurableStore(ctx.bus.redis, ctx.bus.keys, retention)
    cursor = DurableCursor(ctx, store, topic, name)
    await cursor.start(since)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cursor.run, min(retention / 4, 3600.0))
            try:
                yield cursor
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await cursor.finish()


async def durable_listing(ctx: SessionContext, topics: list[str]) -> dict[str, list[Any]]:
    """For ``ls``: topic -> the user's durable positions on it, as dicts (only the owner's)."""
    store = DurableStore(ctx.bus.redis, ctx.bus.keys, ctx.settings.topics.retention)
    listing: dict[str, list[Any]] = {}
    try:
        for topic in topics:
            if rows := await store.describe(topic, ctx.identity.user):
                listing[topic] = [asdict(row) for row in rows]
    except (RedisError, OSError) as exc:
        raise backend_error(exc, "reading durable positions") from exc
    return listing


def durable_table(listing: dict[str, list[Any]]) -> list[str]:
    """The lines ``ls`` prints under its topic table (none when there are no positions)."""
    rows = [("DURABLE", "TOPIC", "POSITION", "LAG", "LAST USED")]
    for topic, positions in listing.items():
        for p in positions:
            lag = f"{p['lag']}" if p["lag"] is not None else f"{LAG_CAP}+"
            rows.append((p["name"], topic, p["position"], lag, p["last_used"]))
    if len(rows) == 1:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["", *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                  for r in rows)]  # fmt: skip
