"""structlog, configured once: readable lines on a terminal, JSON lines otherwise.

Logs go to stderr. Per-session context (``user``, ``topic``, ``session``) is bound with
``structlog.contextvars`` by the SSH layer, so every line a session causes carries it.
Message contents and secrets are never passed to a logger.

The libraries drainbus runs on (asyncssh, redis, httpx) log through the standard library;
their records go through the same processors and renderer, so they come out as the same JSON
lines (with ``logger`` naming the library). They are shown from WARNING up (or from the
configured level, if higher): asyncssh alone logs several INFO lines per connection.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging"]


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Set up structlog for the process. ``json=None`` picks JSON unless stderr is a tty."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    exceptions: structlog.typing.Processor = (
        structlog.processors.format_exc_info
        if json
        else structlog.processors.ExceptionPrettyPrinter()
    )
    threshold = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        # One write per line (print() writes the newline separately): the worker processes of
        # `serve --workers N` share stderr, and another's line must not land inside ours.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(shared, exceptions, renderer, max(threshold, logging.WARNING))


def _route_standard_logging(
    shared: list[structlog.typing.Processor],
    exceptions: structlog.typing.Processor,
    renderer: structlog.typing.Processor,
    threshold: int,
) -> None:
    """Render the standard library's log records (asyncssh, redis, httpx) as drainbus does."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exceptions,
            renderer,
        ],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        if isinstance(old, _StderrHandler):  # configured before: replace, never stack
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes each record with one write() to whatever ``sys.stderr`` is when it is emitted."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always sys.stderr
