"""What every SSH command runs with: the session's identity, process and node services."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import asyncssh

from drainbus.acl import Access
from drainbus.bus import Bus
from drainbus.config import Settings
from drainbus.identity import Identity

__all__ = ["LineCheck", "Process", "SessionContext"]

Process = asyncssh.SSHServerProcess[bytes]
LineCheck = Callable[[Identity, bytes], None]
"""Validates one message for a topic; raises DataError or PermissionDenied to reject it."""


@dataclass
class SessionContext:
    """What a command needs: who runs it, the process to talk to, and the node's services."""

    identity: Identity
    process: Process
    settings: Settings
    bus: Bus
    access: Access
    line_checks: dict[str, LineCheck] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    topic: str | None = None

    def stderr(self, text: str) -> None:
        """Write one line to the client's stderr."""
        self.process.stderr.write((text.rstrip("\n") + "\n").encode("utf-8", "replace"))

    def write(self, data: bytes) -> None:
        """Write to the client's stdout without waiting (the channel buffers what it must)."""
        self.process.stdout.write(data)
        self.bytes_out += len(data)

    async def stdout(self, data: bytes) -> None:
        """Write to the client's stdout and wait until the channel can take more."""
        self.write(data)
        await self.process.stdout.drain()
