"""Running a batch's calls to a cache API in lanes, and telling the caller as purges settle.

Calls that spend from one rate-limit bucket go one after another (a lane); lanes run at
once. After each call, ``on_settled`` hears of the purges whose last call that was, before
the lane's next call is sent: the daemon acknowledges them there (see call_acks.py), so a
crash repeats at most the calls in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import anyio

from drainbus.drain.retry import OnSettled, Outcome, merge_outcomes

__all__ = ["run_lanes"]


class _Call(Protocol):
    @property
    def purges(self) -> set[int]:
        """Indices of the batch's purges this call carries items of."""
        ...


C = TypeVar("C", bound=_Call)


async def run_lanes(
    lanes: Iterable[Sequence[C]],
    execute: Callable[[C], Awaitable[dict[int, Outcome]]],
    parts: dict[int, list[Outcome]],
    on_settled: OnSettled | None,
) -> None:
    """Run every lane; each call's outcome per purge is appended to ``parts[purge]``."""
    planned = [list(lane) for lane in lanes]
    calls_left = Counter(i for lane in planned for call in lane for i in call.purges)

    async def run_lane(lane: list[C]) -> None:
        for call in lane:
            settled = {}
            for i, outcome in (await execute(call)).items():
                parts[i].append(outcome)
                calls_left[i] -= 1
                if calls_left[i] == 0:
                    settled[i] = merge_outcomes(parts[i])
            if settled and on_settled is not None:
                await on_settled(settled)

    async with anyio.create_task_group() as group:
        for lane in planned:
            group.start_soon(run_lane, lane)
