"""Logging: drainbus's own events and the libraries' records come out as one stream."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from drainbus.log import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_logging")
def test_library_warnings_are_json_lines_like_ours(capsys: pytest.CaptureFixture[str]) -> None:
    """asyncssh's and redis's warnings are rendered like drainbus's events; their INFO is not."""
    configure_logging("info", json=True)
    configure_logging("info", json=True)  # configuring again replaces, never doubles, output
    structlog.get_logger("drainbus.test").info("ours", n=1)
    logging.getLogger("asyncssh").warning("connection lost: %s", "reset")
    logging.getLogger("asyncssh").info("opened session")
    logging.getLogger("redis.asyncio").error("pool closed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["event"], r["level"]) for r in lines] == [
        ("ours", "info"),
        ("connection lost: reset", "warning"),
        ("pool closed", "error"),
    ]
    assert [r.get("logger") for r in lines[1:]] == ["asyncssh", "redis.asyncio"]
    assert all("timestamp" in r for r in lines)


@pytest.mark.usefixtures("restore_logging")
def test_library_records_start_at_warning_or_the_configured_level_if_higher(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """At debug, library INFO still stays out (asyncssh logs lines per connection); at error,
    library warnings do too."""
    configure_logging("debug", json=True)
    logging.getLogger("asyncssh").info("opened session")
    logging.getLogger("asyncssh").warning("kept")
    configure_logging("error", json=True)
    logging.getLogger("httpx").warning("retrying")
    logging.getLogger("httpx").error("gave up")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [r["event"] for r in lines] == ["kept", "gave up"]
