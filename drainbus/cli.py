"""The local command line: ``drainbus serve``, ``drainbus keys …``.

Every failure a person can cause or fix ends as one line on stderr and a sysexits code;
tracebacks are for bugs only.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import click
import structlog

from drainbus.config import Settings, load_settings
from drainbus.errors import ConfigError, DrainbusError, UsageError
from drainbus.identity import (
    UserKeys,
    load_or_create_host_key,
    parse_authorized_keys,
    valid_user_name,
)
from drainbus.log import configure_logging

__all__ = ["main"]

log = structlog.get_logger(__name__)


def _fail(exc: DrainbusError) -> None:
    click.echo(f"drainbus: {exc.message}", err=True)
    sys.exit(int(exc.exit_code))


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    config = ctx.obj.get("config")
    try:
        return load_settings(Path(config) if config else None, overrides)
    except ConfigError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


config_option = click.option(
    "--config",
    "config",
    envvar="DRAINBUS_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML config file (env DRAINBUS_CONFIG).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-json/--log-console",
    default=None,
    help="Log format; default: console on a terminal, JSON lines otherwise.",
)
@click.version_option(package_name="drainbus")
@click.pass_context
def cli(ctx: click.Context, config: str | None, log_level: str, log_json: bool | None) -> None:
    """drainbus: a cache-invalidation bus over SSH and Redis streams."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    configure_logging(log_level, json=log_json)


@cli.command()
@config_option
@click.option("--listen", metavar="HOST:PORT", help="SSH address (default 0.0.0.0:2222).")
@click.option(
    "--redis-url",
    metavar="URL",
    help="Redis URL (env DRAINBUS_REDIS_URL); default: start an embedded server in the data dir.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Where the embedded server keeps its files (default ./data).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    config: str | None,
    listen: str | None,
    redis_url: str | None,
    data_dir: str | None,
) -> None:
    """Run the SSH bus in the foreground until SIGINT or SIGTERM."""
    if config:
        ctx.obj["config"] = config
    settings = _settings(ctx, redis_url=redis_url, data_dir=data_dir, server={"listen": listen})
    _run(lambda: _serve(settings))


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        anyio.run(main)
    except* DrainbusError as group:
        # Task groups wrap what passes through them; the person at the terminal needs only
        # the first error drainbus raised on purpose.
        _fail(_first_leaf(group))
    except* KeyboardInterrupt:  # a second Ctrl-C during shutdown
        sys.exit(130)


def _first_leaf(group: BaseExceptionGroup[DrainbusError]) -> DrainbusError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _serve(settings: Settings) -> None:
    # Imported here so `drainbus keys …` starts without loading the server stack.
    from drainbus.bus import Bus
    from drainbus.ssh.server import FrontDoor

    host_key = load_or_create_host_key(settings.server.host_keys_dir)
    log.info(
        "host_key", fingerprint=host_key.get_fingerprint(), path=str(settings.server.host_keys_dir)
    )
    users = UserKeys(settings.server.users_dir, settings.server.admins)
    users.load()
    async with Bus(settings) as bus, FrontDoor(settings, bus, users, host_key) as door:
        _notify_systemd("READY=1")
        log.info("serving", port=door.port, pid=os.getpid())
        async with anyio.create_task_group() as tg:
            tg.start_soon(_reload_users_periodically, users, settings.server.users_reload_interval)
            with anyio.open_signal_receiver(
                signal.SIGINT, signal.SIGTERM, signal.SIGHUP
            ) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("reload", reason="SIGHUP")
                        users.reload()
                        continue
                    log.info("shutting_down", signal=signal.Signals(signum).name)
                    _notify_systemd("STOPPING=1")
                    break
            tg.cancel_scope.cancel()
    log.info("stopped")


async def _reload_users_periodically(users: UserKeys, interval: float) -> None:
    while True:
        await anyio.sleep(interval)
        if users.reload_if_changed():
            log.info("reload", reason="users folder changed")


def _notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify) about our state, if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), target)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))


# --- keys ------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Manage users: keys/users/NAME.pub files, one per user."""


@keys.command("add")
@config_option
@click.argument("name")
@click.argument("pubkey_file", type=click.File("r"))
@click.pass_context
def keys_add(ctx: click.Context, config: str | None, name: str, pubkey_file: Any) -> None:
    """Give user NAME the key(s) in PUBKEY_FILE ('-' for stdin)."""
    if config:
        ctx.obj["config"] = config
    settings = _settings(ctx)
    try:
        if not valid_user_name(name):
            raise UsageError(
                f"user name '{name}' is invalid: use 1-64 letters, digits, '.', '_', '-'"
            )
        text = pubkey_file.read()
        new_keys = parse_authorized_keys(text, source=pubkey_file.name)
        if not new_keys:
            raise ConfigError(f"{pubkey_file.name} holds no public key")
        users = UserKeys(settings.server.users_dir, settings.server.admins)
        users.reload()
        users_dir = settings.server.users_dir
        users_dir.mkdir(parents=True, exist_ok=True)
        path = users_dir / f"{name}.pub"
        existing = {k.public_data for k in users.users.get(name, [])}
        # Refuse before echoing anything, or 'added' would show for keys that are never written.
        for key in new_keys:
            owner = users.lookup(key)
            if owner is not None and owner.user != name:
                raise ConfigError(
                    f"key {key.get_fingerprint()} already belongs to user '{owner.user}'"
                )
        lines = []
        for key, line in zip(new_keys, _key_lines(text), strict=True):
            if key.public_data in existing:
                click.echo(f"{name}: {key.get_fingerprint()} already present")
                continue
            existing.add(key.public_data)
            lines.append(line)
            click.echo(f"{name}: added {key.get_fingerprint()}")
        if lines:
            # A hand-edited file may lack its final newline: don't glue our key onto its last line.
            current = path.read_text() if path.exists() else ""
            separator = "\n" if current and not current.endswith("\n") else ""
            with path.open("a") as handle:
                handle.write(separator + "".join(f"{line}\n" for line in lines))
    except DrainbusError as exc:
        _fail(exc)


def _key_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


@keys.command("ls")
@config_option
@click.pass_context
def keys_ls(ctx: click.Context, config: str | None) -> None:
    """List users, their key fingerprints, and who is admin."""
    if config:
        ctx.obj["config"] = config
    settings = _settings(ctx)
    users = UserKeys(settings.server.users_dir, settings.server.admins)
    users.reload()
    for name, user_keys in sorted(users.users.items()):
        role = " (admin)" if name in settings.server.admins else ""
        for key in user_keys:
            comment = key.get_comment() or ""
            click.echo(f"{name}{role}\t{key.get_fingerprint()}\t{key.get_algorithm()}\t{comment}")


@keys.command("rm")
@config_option
@click.argument("name")
@click.argument("fingerprint", required=False)
@click.pass_context
def keys_rm(ctx: click.Context, config: str | None, name: str, fingerprint: str | None) -> None:
    """Remove user NAME, or only their key with FINGERPRINT (SHA256:…)."""
    if config:
        ctx.obj["config"] = config
    settings = _settings(ctx)
    path = settings.server.users_dir / f"{name}.pub"
    try:
        if not valid_user_name(name) or not path.exists():
            raise UsageError(f"no user '{name}' in {settings.server.users_dir}")
        if fingerprint is None:
            path.unlink()
            click.echo(f"{name}: removed")
            return
        kept, removed = [], 0
        for line in path.read_text().splitlines():
            parsed = parse_authorized_keys(line, source=str(path)) if line.strip() else []
            if parsed and parsed[0].get_fingerprint() == fingerprint:
                removed += 1
                continue
            kept.append(line)
        if not removed:
            raise UsageError(f"user '{name}' has no key {fingerprint}")
        path.write_text("".join(f"{line}\n" for line in kept))
        click.echo(f"{name}: removed {fingerprint}")
    except DrainbusError as exc:
        _fail(exc)


def main() -> None:
    """Console-script entry point."""
    cli(obj={})
