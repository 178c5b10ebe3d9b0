"""The signals a long-running drainbus process answers, in one place.

``serve`` (one process, or each worker), ``drain`` and the supervisor all wait here:

- SIGINT, SIGTERM: stop (the caller then shuts down in order);
- SIGHUP: re-read the users folder (``reload``);
- SIGUSR1: log the state of the process as structured lines (``dump``; see
  :mod:`drainbus.state_dump`); the supervisor passes it on to its workers;
- SIGUSR2, SIGPIPE: ignored. Their default action ends the process, and a stray one (a
  log-rotation script sending USR2, a closed pipe) must not take the bus down. A write to a
  closed socket or pipe still fails with EPIPE where the code handles it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio
import structlog

from drainbus.systemd import notify as notify_systemd

__all__ = ["IGNORED", "ignore_stray_signals", "wait_for_stop"]

log = structlog.get_logger(__name__)

IGNORED = (signal.SIGUSR2, signal.SIGPIPE)
"""Signals whose default action (end the process) drainbus turns off."""


def ignore_stray_signals() -> None:
    """Ignore :data:`IGNORED` in this process (and the processes it starts, for SIGUSR2).

    Call from the main thread. SIG_IGN, not a handler: a handler would be removed again
    (back to the deadly default) when a signal receiver closes.
    """
    for signum in IGNORED:
        signal.signal(signum, signal.SIG_IGN)


async def wait_for_stop(
    *,
    reload: Callable[[], None] | None = None,
    dump: Callable[[], None] | None = None,
    ready: Callable[[], None] | None = None,
) -> signal.Signals:
    """Return the signal (SIGINT or SIGTERM) that asks to stop; meanwhile answer the others.

    ``reload`` runs on SIGHUP, ``dump`` on SIGUSR1 (without one, SIGHUP and SIGUSR1 are
    logged and otherwise ignored). ``ready`` is called once the signals are ours: a signal
    sent in answer to READY must not meet the default action, which ends the process.
    """
    ignore_stray_signals()
    with anyio.open_signal_receiver(
        signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1
    ) as signals:
        if ready is not None:
            ready()
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("reload", reason="SIGHUP")
                if reload is not None:
                    reload()
            elif signum == signal.SIGUSR1:
                log.info("state_dump", reason="SIGUSR1")
                if dump is not None:
                    dump()
            else:
                log.info("shutting_down", signal=signal.Signals(signum).name)
                notify_systemd("STOPPING=1")
                return signal.Signals(signum)
    raise AssertionError("the signal receiver never ends")  # pragma: no cover
