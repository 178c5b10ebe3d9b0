"""Whether what Redis acknowledged is durable: its persistence state, and the waits for it.

A Redis-compatible server acknowledges a write before it appends it to its AOF (it writes
the file just before sending the replies of each event-loop turn). When that append fails (a
full disk), it still sends the replies, then refuses later writes with ``MISCONF`` and
reports ``aof_last_write_status:err``. So a reply alone does not mean "stored": the state
must be read *after* the reply. :meth:`Persistence.confirm` does that with one ``INFO
persistence`` shared by every publisher waiting at the time (group commit: a burst of
publishers costs two reads, not one each).

Durability modes, per topic (``topics.durability``):

- ``os`` (default): the server wrote the entry to its AOF (the OS holds it; fsynced within a
  second under ``appendfsync everysec``): survives a kill of the server, not an OS crash.
- ``fsync``: ``WAITAOF 1 0``: the local AOF was fsynced: survives an OS crash or power loss.
- ``replica``: ``WAITAOF 1 1``: fsynced here and on one replica: survives losing this
  machine (a failover). Where the server has no WAITAOF (Redis < 7.2), ``WAIT 1``: one
  replica has it in memory, which survives a failover but not both crashing at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from drainbus.bus.connection import RedisClient
from drainbus.errors import ConfigError, NotDurable
from drainbus.systemd import notify as notify_systemd
from drainbus.values import Durability

__all__ = ["Persistence", "PersistenceState", "is_misconf", "state_from_info"]

log = structlog.get_logger(__name__)

_WATCHED = ("aof_last_write_status", "rdb_last_bgsave_status")


def is_misconf(exc: BaseException) -> bool:
    """True for the error a server refuses writes with while it cannot persist them."""
    return isinstance(exc, ResponseError) and str(exc).startswith("MISCONF")


@dataclass(frozen=True)
class PersistenceState:
    """What the server last said about its persistence (``INFO persistence``).

    ``failures`` names each failing status (``aof_last_write_status=err``) or the error the
    server answered with; empty when all is well. ``checked`` is a ``time.time()``, 0 if never.
    """

    aof_enabled: bool | None = None
    statuses: Mapping[str, str] = field(default_factory=dict)
    failures: tuple[str, ...] = ()
    checked: float = 0.0

    @property
    def ok(self) -> bool:
        """True unless the server reported a write error at the last check."""
        return not self.failures

    def summary(self) -> str:
        """One line: ``ok`` or ``failing: aof_last_write_status=err``."""
        return "ok" if self.ok else "failing: " + "; ".join(self.failures)

    def as_dict(self) -> dict[str, Any]:
        """For ``stats --json``."""
        return {"ok": self.ok, "aof_enabled": self.aof_enabled, **self.statuses,
                "failures": list(self.failures), "checked": self.checked}  # fmt: skip


def state_from_info(info: Mapping[str, Any]) -> PersistenceState:
    # A cluster client answers INFO from every node: one mapping per node. The bus is
    # failing if any node is.
    nodes = [v for v in info.values() if isinstance(v, Mapping)] or [info]
    statuses: dict[str, str] = {}
    for node in nodes:
        for name in _WATCHED:
            if name in node and statuses.get(name) != "err":
                statuses[name] = str(node[name])
    failures = tuple(f"{name}={value}" for name, value in statuses.items() if value != "ok")
    aof = [bool(int(n.get("aof_enabled", 0))) for n in nodes]
    return PersistenceState(all(aof), statuses, failures, time.time())


class Persistence:
    """Watches one server's (or cluster's) persistence; confirms writes as configured."""

    def __init__(self, redis: RedisClient, *, interval: float = 5.0, timeout: float = 5.0) -> None:
        """``interval``: seconds between checks while nobody publishes (for ``stats``, the
        metrics and the log). ``timeout``: how long ``fsync``/``replica`` waits, seconds."""
        self._redis = redis
        self._interval = interval
        self._timeout_ms = int(timeout * 1000)
        self._lock = anyio.Lock()
        self._reads_started = 0
        self.waitaof = True  # the server has WAITAOF (learnt by check_support)
        self.state = PersistenceState()

    async def check_support(self, modes: set[Durability]) -> None:
        """Read the state; raise ConfigError if the server cannot give a configured mode,
        or does not let drainbus read its state (then every pub would fail with 75)."""
        try:
            self._set(state_from_info(await self._redis.info("persistence")))
        except ResponseError as exc:  # NOPERM, or INFO renamed away
            raise ConfigError(
                f"Redis refuses INFO persistence ({str(exc).split('. ', 1)[0]}): pub needs it "
                "to know what is durable; allow it (ACL: +info) for drainbus's Redis user"
            ) from None
        if not modes - {"os"}:
            return
        if isinstance(self._redis, RedisCluster):
            raise ConfigError(
                f"topics.durability {sorted(modes - {'os'})} is not supported on Redis "
                'Cluster yet: use "os", or one server / Sentinel'
            )
        try:  # asks for nothing, so it returns at once, even with appendonly no
            await self._redis.execute_command("WAITAOF", 0, 0, 0)  # type: ignore[no-untyped-call]
        except ResponseError:  # unknown command: Redis < 7.2
            self.waitaof = False
        if "fsync" in modes and not self.waitaof:
            raise ConfigError(
                'topics.durability "fsync" needs WAITAOF (Redis >= 7.2 or Valkey); this '
                'server has none: upgrade it, or use "os" (or "replica", which uses WAIT)'
            )
        if self.waitaof and not self.state.aof_enabled:
            raise ConfigError(
                f"topics.durability {sorted(modes - {'os'})} waits for the AOF, but this "
                'server runs with appendonly no: set appendonly yes, or use "os"'
            )

    async def refresh(self) -> PersistenceState:
        """Read the state now (a server that cannot be asked is failing until it answers)."""
        # Under the lock, as confirm's reads: a read in flight must not be taken as done.
        async with self._lock:
            return await self._read()

    async def _read(self) -> PersistenceState:
        self._reads_started += 1
        try:
            info = await self._redis.info("persistence")
        except (RedisError, OSError) as exc:
            # Unknown is not "ok": a write confirmed by this read must not count as stored.
            unknown = (f"cannot read INFO persistence ({exc})",)
            self._set(replace(self.state, failures=unknown, checked=time.time()))
        else:
            self._set(state_from_info(info))
        return self.state

    async def confirm(self, topic: str) -> None:
        """Raise NotDurable unless a check begun after this call finds no write error.

        Callers that arrive while a check runs wait for it, then share the next one.
        """
        asked = self._reads_started
        async with self._lock:
            state = self.state if self._reads_started > asked else await self._read()
        if not state.ok:
            raise NotDurable(f"not durable: Redis persistence is {state.summary()}", topic=topic)

    def misconf(self, exc: ResponseError, topic: str) -> NotDurable:
        """The error for a write the server refused with MISCONF; marks the state failing."""
        detail = str(exc).split(". ", 1)[0]
        self._set(replace(self.state, failures=(detail,), checked=time.time()))
        return NotDurable(f"not durable: the server refused the write ({detail})", topic=topic)

    def wait_args(self, mode: Durability) -> tuple[Any, ...]:
        """The command that waits, after a write on the same connection, until ``mode`` holds."""
        if not self.waitaof:
            return ("WAIT", 1, self._timeout_ms)
        return ("WAITAOF", 1, int(mode == "replica"), self._timeout_ms)

    def check_wait(self, mode: Durability, reply: Any, topic: str) -> None:
        """Raise NotDurable if the reply of :meth:`wait_args`'s command falls short."""
        local, replicas = (1, reply) if isinstance(reply, int) else (reply[0], reply[1])
        if local >= 1 and (mode != "replica" or replicas >= 1):
            return
        what = "fsynced to the AOF" if local < 1 else "confirmed by a replica"
        raise NotDurable(
            f"not durable: the write was not {what} within {self._timeout_ms} ms "
            f"(topics.durability = \"{mode}\")", topic=topic,
        )  # fmt: skip

    def _set(self, state: PersistenceState) -> None:
        if state.ok != self.state.ok or (not state.ok and state.failures != self.state.failures):
            if state.ok:
                log.info("persistence_recovered")
            else:
                log.error("persistence_failing", failures=list(state.failures))
            notify_systemd(f"STATUS=persistence {state.summary()}")
        self.state = state

    async def run(self) -> None:
        """Refresh every ``interval`` seconds, until cancelled."""
        while True:
            await anyio.sleep(self._interval)
            await self.refresh()
