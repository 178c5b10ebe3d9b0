"""Run a floor program with redis-py's former default of no socket timeout.

    python bench/floor_shim.py FLOOR_SCRIPT [ARGS...]

The floors block on ``XREAD BLOCK 0`` with clients made by ``Redis.from_url(url)``. Up to
redis-py 5 that meant "wait forever"; redis-py 6 and later default ``socket_timeout`` to
5 s, so a floor reader that sees no message for 5 s dies with a TimeoutError in a task
nobody awaits, and every subscriber waits forever. floor_fanout.py hits that whenever
connecting its subscribers takes more than a few seconds (about 1,500 and more on a 2-core
machine). This shim restores the old default for clients that do not set one, and changes
nothing else: the floor's own code runs as it is.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any

import redis.asyncio as aioredis

_original_from_url = aioredis.Redis.from_url.__func__  # type: ignore[attr-defined]


def _from_url(cls: type[aioredis.Redis], url: str, /, **kwargs: Any) -> aioredis.Redis:
    kwargs.setdefault("socket_timeout", None)
    client: aioredis.Redis = _original_from_url(cls, url, **kwargs)
    return client


if __name__ == "__main__":
    aioredis.Redis.from_url = classmethod(_from_url)  # type: ignore[assignment,method-assign]
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
