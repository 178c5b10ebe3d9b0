"""``[hooks]``: how this machine reaches a bus, and what its hooks publish.

One section serves ``drainbus pub`` and both hooks, because they share the one thing that
matters most: the bus address, the key and the host-key check. In the config file::

    [hooks]
    host = "bus.example"
    port = 2222
    key = "/etc/drainbus/deploy_ed25519"     # unset: ssh-agent, then ~/.ssh/id_*
    known_hosts = "~/.ssh/known_hosts"       # "none" turns host-key checking off (insecure)
    topic = "cache-drain"
    key_from = "{0}-{1}"                     # hook watch: site key from the path
    debounce = "2s"
    branches = { "refs/heads/main" = "acme-blog", staging = "acme-staging" }

or ``DRAINBUS_HOOKS__HOST=bus.example`` and so on. This module imports nothing from
:mod:`drainbus.config` at import time, so that module can import it.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from drainbus.acl import check_topic_name
from drainbus.errors import ConfigError, UsageError
from drainbus.hooks.keys import KeyTemplate
from drainbus.values import Duration

__all__ = ["HooksSettings", "default_spool_path"]


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry and no $USER
        return "drainbus"


def default_spool_path() -> Path:
    """``$XDG_STATE_HOME/drainbus/spool``, else ``~/.local/state/drainbus/spool``.

    Raises :class:`ConfigError` when there is no home directory to put it in.
    """
    state = os.environ.get("XDG_STATE_HOME")
    if state:
        return Path(state) / "drainbus" / "spool"
    try:
        return Path.home() / ".local" / "state" / "drainbus" / "spool"
    except RuntimeError:  # no $HOME and no passwd entry
        raise ConfigError("there is no home directory for the spool: set hooks.spool") from None


def _expand(path: Path) -> Path:
    try:
        return path.expanduser()
    except RuntimeError:  # no $HOME and no passwd entry
        raise ValueError(f"{path} starts with '~' but there is no home directory") from None


class HooksSettings(BaseModel):
    """The ``[hooks]`` section: the bus to publish to and what ``hook watch``/``hook git`` send.

    ``user`` is the SSH login name (the bus ignores it: the key says who you are). ``key``
    is the private key file (None: ssh-agent, then the usual ``~/.ssh/id_*`` files);
    ``known_hosts`` the OpenSSH known_hosts file checked against the bus's host key (``~``
    expanded when it is read), None (``"none"`` in the file) to accept any host key, which
    lets anyone on the path pose as the bus. ``connect_timeout``, ``debounce`` and
    ``max_wait`` are seconds; ``wait`` (seconds, None: off) makes ``drainbus pub`` and
    ``hook git`` wait that long for the purge receipts (``pub --wait``); ``spool`` None means
    :func:`default_spool_path`. ``branches`` maps a ref (``main`` is short for
    ``refs/heads/main``) to the purge lines published when it is pushed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("localhost", min_length=1)
    port: int = Field(2222, ge=1, le=65535)
    user: str = Field(default_factory=_login_name, min_length=1)
    key: Path | None = None
    known_hosts: Path | None = Path("~/.ssh/known_hosts")
    connect_timeout: Duration = 10.0
    topic: str = "cache-drain"
    key_from: str = "{0}-{1}"
    debounce: Duration = 2.0
    max_wait: Duration = 60.0
    wait: Duration | None = None
    spool: Path | None = None
    branches: dict[str, tuple[str, ...]] = Field(default_factory=dict)

    @field_validator("key", "spool", mode="after")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return _expand(value) if value is not None else None

    @field_validator("known_hosts", mode="before")
    @classmethod
    def _known_hosts(cls, value: Any) -> Any:
        # '~' is expanded only when the file is read: loading settings (for `drainbus serve`
        # too) must not need a home directory.
        if isinstance(value, str) and value.strip().lower() == "none":
            return None
        return value

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        try:
            return check_topic_name(value)
        except UsageError as exc:
            raise ValueError(exc.message) from None

    @field_validator("key_from")
    @classmethod
    def _check_key_from(cls, value: str) -> str:
        try:
            KeyTemplate(value)
        except UsageError as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("branches", mode="before")
    @classmethod
    def _check_branches(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        branches: dict[str, tuple[str, ...]] = {}
        for ref, lines in value.items():
            name = str(ref).strip()
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"branch {ref!r} is not a branch name or ref")
            full = name if name.startswith("refs/") else f"refs/heads/{name}"
            listed = (lines,) if isinstance(lines, str) else tuple(lines)
            for line in listed:
                if not isinstance(line, str) or not line.strip() or not line.isprintable():
                    raise ValueError(
                        f"branch {name!r}: {line!r} is not one purge line (like 'acme-blog')"
                    )
            branches[full] = branches.get(full, ()) + tuple(line.strip() for line in listed)
        return branches

    @property
    def spool_path(self) -> Path:
        """Where ``hook watch`` keeps purges not yet confirmed by the bus."""
        return self.spool if self.spool is not None else default_spool_path()

    @property
    def address(self) -> str:
        """``host:port`` as people write it (``[::1]:2222`` for IPv6)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
