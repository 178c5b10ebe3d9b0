"""What one publisher may store: the purge rate limit and the storage quotas, kept in Redis.

Every bus node and worker process shares one Redis, so every limit lives there and is taken
atomically by one script per publish batch; no process keeps a budget of its own.

- **Purge rate** (``drain.max_purges_per_user``): a token bucket per user on the drain topic,
  in that topic's hash slot. The append script (:data:`APPEND`) takes one token per line and
  appends the lines that got one, in the same call: a granted line is stored, a refused line
  costs nothing, and no crash can split the two.
- **Bytes per topic** (``topics.max_bytes``): each entry records in field ``o`` how many bytes
  the stream had taken in before it, and ``{TOPIC}:bytes`` counts the bytes taken in so far.
  What a stream holds is then that count minus the first entry's ``o``: one GET and one
  ``XRANGE - + COUNT 1``, whatever trimmed it. Over the cap, the script trims the oldest
  entries by id (``XTRIM MINID``), reading 2, 4, … 128 at a time to find where to cut, and
  always keeps the newest.
- **Bytes and topics per user** (``server.max_user_bytes``, ``server.max_topics_per_user``):
  a hash per owner (``{OWNER}:usage``, topic -> bytes) in the owner's slot. On one server the
  append script checks and counts it in the same call. On Redis Cluster a topic's stream is
  in another slot than the hash, so a batch first reserves its bytes there (:data:`RESERVE`),
  then appends, then gives back what trimming freed (:data:`CREDIT`). A topic leaves the count
  once nothing of it is stored. A count can drift (a batch cut off between those steps, a
  timeout after a script ran), so before a quota refusal stands the owner's usage is counted
  again from the streams (:func:`recount_usage`), at most once a minute per owner and process.

A size is the message bytes of an entry plus :data:`ENTRY_OVERHEAD` for its other fields, so
tiny entries cannot hide their cost. A message is "owned" by the first segment of its topic
(``alice/deploys`` by ``alice``), case ignored as for user names; the drain topic has the rate
limit instead. Admins are never refused, but what they store still counts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import structlog

from drainbus.bus.connection import RedisClient
from drainbus.bus.streams import Keys, read_rows, text
from drainbus.config import Settings
from drainbus.errors import LimitExceeded
from drainbus.metrics import PUBLISH_REFUSED

__all__ = [
    "APPEND",
    "CREDIT",
    "ENTRY_OVERHEAD",
    "RESERVE",
    "Limits",
    "PublishRefused",
    "RefusalLog",
    "human_bytes",
    "publish_limits",
    "recount_usage",
]

log = structlog.get_logger(__name__)

_REFUSALS_REMEMBERED = 10_000  # (user, topic, reason) whose last log time RefusalLog keeps

ENTRY_OVERHEAD = 64
"""Bytes an entry counts beyond its message: its id, user, message id and time fields."""

# Bytes ``topic``'s owner may still store on it, and the quota that says so: "topics" (none
# at all: it would be a topic over max_topics) or "bytes". quota < 0 counts without refusing
# (an admin).
_ROOM = """
local function room(usage, topic, quota, max_topics)
  if quota < 0 then return math.huge, '' end
  if redis.call('HEXISTS', usage, topic) == 0 and redis.call('HLEN', usage) >= max_topics then
    return -1, 'topics'
  end
  local used = 0
  for _, v in ipairs(redis.call('HVALS', usage)) do used = used + tonumber(v) end
  return quota - used, 'bytes'
end
"""

# KEYS[1] stream, KEYS[2] its byte count, KEYS[3] the publisher's token bucket, and KEYS[4]
# the owner's usage hash when it is in the same server (not Redis Cluster): then the quota
# is checked and counted here, in the same round trip.
# ARGV: MAXLEN (~), byte cap (0: none), tokens per ms (0: no rate limit), burst, MINID (~)
# for time retention ("": not this time), topic, byte quota, topic quota; then per entry:
# its cost in tokens (lines), its size, how many fields, field, value, ...
# Returns {entries stored, bytes trimmed, ms until the next refused entry fits,
# "" | "rate" | "bytes" | "topics", ids...}.
APPEND = (
    _ROOM
    + """
local stream, count_key, bucket, usage = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local cap, rate, burst = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local topic = ARGV[6]

local function offset(row)
  for f = 1, #row[2], 2 do
    if row[2][f] == 'o' then return tonumber(row[2][f + 1]) end
  end
  return nil  -- an entry from before byte counting
end

local function held(total)
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
  if not first then return 0 end
  return total - (offset(first) or 0)
end

local total = tonumber(redis.call('GET', count_key) or '0')
local before = held(total)
local free, quota_name = math.huge, ''
if usage then free, quota_name = room(usage, topic, tonumber(ARGV[7]), tonumber(ARGV[8])) end
local tokens, now = -1, 0
if rate > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local state = redis.call('HMGET', bucket, 'tokens', 'ms')
  tokens = tonumber(state[1]) or burst
  tokens = math.min(burst, tokens + math.max(0, now - (tonumber(state[2]) or now)) * rate)
end

local ids, added, wait, refused, i = {}, 0, 0, '', 9
while i <= #ARGV do
  local cost, size, fields = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if added + size > free then refused = quota_name break end
  if tokens >= 0 and tokens < cost then
    refused, wait = 'rate', math.ceil((cost - tokens) / rate)
    break
  end
  if tokens >= 0 then tokens = tokens - cost end
  local xadd = {'XADD', stream, 'MAXLEN', '~', ARGV[1], '*', 'o', total + added}
  for f = i + 3, i + 2 + 2 * fields do xadd[#xadd + 1] = ARGV[f] end
  ids[#ids + 1] = redis.call(unpack(xadd))
  added = added + size
  i = i + 3 + 2 * fields
end
if added > 0 then
  total = total + added
  redis.call('SET', count_key, total)
end
if rate > 0 then
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'ms', now)
  redis.call('PEXPIRE', bucket, math.ceil((burst - tokens) / rate) + 1000)
end

if ARGV[5] ~= '' then redis.call('XTRIM', stream, 'MINID', '~', ARGV[5]) end
local after = held(total)
if cap > 0 and after > cap then
  -- The first entry kept is the oldest whose offset leaves at most cap bytes after it.
  -- Rows come with their messages (up to 64 KiB each): read few first, as usually only one
  -- or two entries go, then more each time.
  local need, start, cut, count = total - cap, '-', nil, 2
  while not cut do
    local rows = redis.call('XRANGE', stream, start, '+', 'COUNT', count)
    count = math.min(count * 2, 128)
    if #rows == 0 then break end
    for _, row in ipairs(rows) do
      local o = offset(row)
      if o and o >= need then cut = row[1] break end
    end
    start = '(' .. rows[#rows][1]
  end
  cut = cut or redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1][1]
  redis.call('XTRIM', stream, 'MINID', cut)
  after = held(total)
end

local trimmed = before + added - after
if usage and added ~= trimmed then
  if redis.call('HINCRBY', usage, topic, added - trimmed) <= 0 then
    redis.call('HDEL', usage, topic)
  end
end
local reply = {#ids, trimmed, wait, refused}
for _, id in ipairs(ids) do reply[#reply + 1] = id end
return reply
"""
)

# Redis Cluster, where the usage hash is in another slot than the stream: reserve first.
# KEYS[1]: the owner's usage hash. ARGV: topic, byte quota, topic quota, then each entry's
# size. Reserves the longest prefix that fits.
# Returns {entries granted, "" | "bytes" | "topics"}.
RESERVE = (
    _ROOM
    + """
local usage, topic = KEYS[1], ARGV[1]
local free, quota_name = room(usage, topic, tonumber(ARGV[2]), tonumber(ARGV[3]))
local granted, bytes, refused = 0, 0, ''
for i = 4, #ARGV do
  local size = tonumber(ARGV[i])
  if bytes + size > free then refused = quota_name break end
  granted, bytes = granted + 1, bytes + size
end
if granted > 0 then redis.call('HINCRBY', usage, topic, bytes) end
return {granted, refused}
"""
)

# KEYS[1]: the owner's usage hash. ARGV: topic, bytes no longer stored (trimmed, or reserved
# and then not appended). Allowed when out of memory: it only ever frees.
CREDIT = """#!lua flags=allow-oom
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return left
"""


def human_bytes(size: int) -> str:
    """``67108864`` -> ``"64 MiB"``: sizes as an operator writes them, for messages."""
    units = ("B", "KiB", "MiB", "GiB")
    value, unit = float(size), 0
    while value >= 1024 and unit < len(units) - 1:
        value, unit = value / 1024, unit + 1
    return f"{round(value, 1):g} {units[unit]}"


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits a :class:`~drainbus.bus.publisher.Publisher` applies, from the settings.

    ``purges_per_minute`` 0 turns the rate limit off; ``max_user_bytes`` 0 turns the storage
    quotas off; ``max_topic_bytes`` 0 leaves a stream only ``max_len``. ``admins`` are user
    keys (casefolded), never refused.
    """

    drain_topic: str = "cache-drain"
    purges_per_minute: int = 0
    purge_burst: int = 1
    max_user_bytes: int = 0
    max_topics_per_user: int = 100
    max_topic_bytes: int = 0
    admins: frozenset[str] = frozenset()

    def rate_for(self, topic: str, user: str) -> tuple[float, int]:
        """(tokens per ms, burst) for ``user`` publishing to ``topic``; (0, 0): unlimited."""
        if topic != self.drain_topic or not self.purges_per_minute or self.exempt(user):
            return 0.0, 0
        return self.purges_per_minute / 60_000, self.purge_burst

    def owner_of(self, topic: str) -> str | None:
        """The account ``topic``'s bytes count against; None when no quota applies."""
        if topic == self.drain_topic or not self.max_user_bytes:
            return None
        return topic.partition("/")[0].casefold()

    def exempt(self, user: str) -> bool:
        """True for an admin: never refused (what they store still counts)."""
        return user.casefold() in self.admins


async def recount_usage(redis: RedisClient, keys: Keys, owner: str) -> None:
    """Set ``owner``'s usage hash to what their topics' streams hold now.

    Not atomic across slots: a batch reserved but not yet appended while this runs is left
    out, so the hash may then be short by the batches in flight at that moment.
    """
    usage = keys.usage(owner)
    for raw in await redis.hkeys(usage):
        topic = text(raw)
        total = int(await redis.get(keys.stream_bytes(topic)) or 0)
        first = await read_rows(redis, keys.stream(topic), count=1)
        held = total - int(first[0][1].get(b"o", 0)) if first else 0
        if held > 0:
            await redis.hset(usage, topic, held)
        else:
            await redis.hdel(usage, topic)


def publish_limits(settings: Settings) -> Limits:
    """The :class:`Limits` that ``settings`` configure."""
    return Limits(
        drain_topic=settings.drain.topic,
        purges_per_minute=settings.drain.max_purges_per_user,
        purge_burst=settings.drain.purge_burst_per_user,
        max_user_bytes=settings.server.max_user_bytes,
        max_topics_per_user=settings.server.max_topics_per_user,
        max_topic_bytes=settings.topics.max_bytes,
        admins=frozenset(name.casefold() for name in settings.server.admins),
    )


class PublishRefused(LimitExceeded):
    """Part of a batch was over a limit: the first ``stored`` messages were stored (``ids``),
    the other ``refused`` were not. ``reason`` is ``rate``, ``bytes``, ``topics`` or
    ``memory``; ``retry_after`` the seconds until a retry can succeed (None: unknown), and
    ``per_minute`` how many lines the rate limit lets through a minute (rate refusals)."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        user: str,
        topic: str,
        stored: int,
        refused: int,
        ids: list[tuple[int, int]],
        retry_after: float | None = None,
        per_minute: int | None = None,
    ) -> None:
        super().__init__(message, topic=topic, user=user)
        self.reason = reason
        self.stored = stored
        self.refused = refused
        self.ids = ids
        self.retry_after = retry_after
        self.per_minute = per_minute

    def summary(self, stored: int, refused: int) -> str:
        """One line for the publisher: ``stored``/``refused`` counted over the whole session."""
        retry = ""
        if self.retry_after is not None:
            retry = f"; retry the refused ones in {math.ceil(self.retry_after)}s or later"
        if self.per_minute and refused > 1:  # a retry of all of them at once would be cut again
            minutes = math.ceil(refused / self.per_minute)
            retry += f" (all {refused} fit in about {minutes} min at {self.per_minute} a minute)"
        return (
            f"drainbus: {stored} message(s) stored, {refused} refused (every line from the "
            f"first refused one on): {self.message}{retry}"
        )


class RefusalLog:
    """Refusals, logged per user, topic and reason at most once per ``interval`` seconds.

    The first refusal is logged at once; the ones after it within the interval are added up
    and logged, with their count, with the first refusal after the interval or at close.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._pending: dict[tuple[str, str, str], int] = {}
        self._last: dict[tuple[str, str, str], float] = {}

    def add(self, refusal: PublishRefused, count: int) -> None:
        """Count ``count`` messages refused for ``refusal``'s reason, in the log and metrics."""
        PUBLISH_REFUSED.labels(refusal.reason).inc(count)
        key = (refusal.user or "", refusal.topic or "", refusal.reason)
        self._pending[key] = self._pending.get(key, 0) + count
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) >= self._interval:
            if len(self._last) > _REFUSALS_REMEMBERED:  # forget the quiet ones: bounded
                self._last = {k: t for k, t in self._last.items() if now - t < self._interval}
            self._last[key] = now
            self._log(key)

    def close(self) -> None:
        """Log every count not logged yet."""
        for key in list(self._pending):
            self._log(key)
        self._last.clear()

    def _log(self, key: tuple[str, str, str]) -> None:
        user, topic, reason = key
        refused = self._pending.pop(key)
        log.warning("publish_refused", user=user, topic=topic, reason=reason, refused=refused)
