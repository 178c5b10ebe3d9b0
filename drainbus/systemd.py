"""Telling systemd how a ``Type=notify`` service is doing (``sd_notify``'s protocol).

systemd passes the address of a datagram socket in ``NOTIFY_SOCKET`` (``@name`` for an
abstract one); the service sends ``READY=1`` once it serves and ``STOPPING=1`` as it stops.
Outside systemd the variable is unset and :func:`notify` does nothing.
"""

from __future__ import annotations

import os
import socket

import structlog

__all__ = ["notify"]

log = structlog.get_logger(__name__)


def notify(state: str) -> None:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd if it listens; never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), target)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))
