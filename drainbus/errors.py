"""drainbus's exception tree and the exit codes it maps to.

Every error a person or a script can see derives from :class:`DrainbusError` and carries a
message that names the bad input and what was expected, plus the sysexits(3) code that a
command ends with when the error reaches it::

    DrainbusError
    ├── UsageError            64  EX_USAGE      bad command line, bad topic name
    ├── DataError             65  EX_DATAERR    a message that breaks a rule (too long, bad purge)
    ├── PermissionDenied      77  EX_NOPERM     topic or purge outside the user's rights
    ├── ConfigError           78  EX_CONFIG     bad config file, key file or setting
    ├── LimitExceeded         75  EX_TEMPFAIL   too many sessions: try again later
    │   └── PublishRefused                      over a rate limit, quota or maxmemory
    │                                           (drainbus.bus.limits: says what was stored)
    ├── StartupError          71  EX_OSERR      cannot bind, cannot start the embedded server
    └── BackendError          69  EX_UNAVAILABLE
        ├── BackendUnavailable                  Redis cannot be reached (retryable)
        └── NotDurable        75  EX_TEMPFAIL   Redis took a write it could not persist

Retryable errors are the ``BackendError`` branch; everything else is permanent for the input
that caused it. Errors about one topic, user or zone carry it as an attribute so log lines can
bind it without parsing the message.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "DataError",
    "DrainbusError",
    "ExitCode",
    "LimitExceeded",
    "NotDurable",
    "PermissionDenied",
    "StartupError",
    "UsageError",
    "quote_input",
]


class ExitCode(IntEnum):
    """sysexits.h codes: scripts and hooks branch on these."""

    OK = 0
    USAGE = 64
    DATAERR = 65
    UNAVAILABLE = 69
    SOFTWARE = 70
    OSERR = 71
    TEMPFAIL = 75
    NOPERM = 77
    CONFIG = 78


class DrainbusError(Exception):
    """Root of every error drainbus raises on purpose."""

    exit_code: ExitCode = ExitCode.SOFTWARE

    def __init__(self, message: str, *, topic: str | None = None, user: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.topic = topic
        self.user = user

    def __str__(self) -> str:
        return self.message


class UsageError(DrainbusError):
    """The command line was wrong: unknown command, bad option, invalid topic name."""

    exit_code = ExitCode.USAGE


class DataError(DrainbusError):
    """Input data broke a rule: a line over the size limit, a malformed purge."""

    exit_code = ExitCode.DATAERR


class PermissionDenied(DrainbusError):
    """The user may not do this: publish or subscribe to a topic, purge another's site."""

    exit_code = ExitCode.NOPERM


class ConfigError(DrainbusError):
    """A setting, config file or key file is invalid; raised before anything starts."""

    exit_code = ExitCode.CONFIG


class LimitExceeded(DrainbusError):
    """A configured limit (connections, sessions, purge rate, storage) was reached; retry
    later."""

    exit_code = ExitCode.TEMPFAIL


class StartupError(DrainbusError):
    """The process cannot start: port in use, embedded server missing or failing."""

    exit_code = ExitCode.OSERR


class BackendError(DrainbusError):
    """Redis (or another backend) failed; the operation may succeed if retried."""

    exit_code = ExitCode.UNAVAILABLE


class BackendUnavailable(BackendError):
    """Redis cannot be reached at all (connection refused, timed out, went away)."""


class NotDurable(BackendError):
    """Redis answered, but could not make a write durable as configured: its disk failed
    (``aof_last_write_status:err``, ``MISCONF``), or no fsync / replica confirmed in time.
    Retry once the server's persistence works again."""

    exit_code = ExitCode.TEMPFAIL


def quote_input(value: str) -> str:
    """Quote user input for a message: escaped, and cut short when long."""
    return repr(value) if len(value) <= 80 else repr(value[:77]) + "..."
