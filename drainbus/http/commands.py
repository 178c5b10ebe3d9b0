"""``drainbus tokens add|ls|rm``: API tokens for the HTTP purge endpoint."""

from __future__ import annotations

import click

from drainbus.click_common import config_option, fail, load_cli_settings
from drainbus.config import Settings
from drainbus.errors import DrainbusError
from drainbus.http.tokens import TokenStore
from drainbus.identity import user_key
from drainbus.sysexits_click import SysexitsCommand, SysexitsGroup

__all__ = ["http_listen_option", "tokens"]

http_listen_option = click.option(
    "--http-listen",
    metavar="HOST:PORT",
    help="Serve the Cloudflare-compatible purge API here (env DRAINBUS_HTTP__LISTEN; off by "
    "default); plain HTTP on loopback only, unless [http] has TLS files.",
)
"""``serve --http-listen``, defined here to keep the HTTP endpoint's surface in one package."""


def _store(ctx: click.Context, config: str | None) -> tuple[Settings, TokenStore]:
    settings = load_cli_settings(ctx, config)
    return settings, TokenStore(settings.server.users_dir, settings.server.admins)


@click.group(cls=SysexitsGroup)
def tokens() -> None:
    """API tokens for the HTTP purge endpoint: users_dir/NAME.tokens, hashes only."""


@tokens.command("add", cls=SysexitsCommand)
@config_option
@click.argument("name")
@click.pass_context
def tokens_add(ctx: click.Context, config: str | None, name: str) -> None:
    """Make a token for user NAME and print it (once: only its hash is kept)."""
    settings, store = _store(ctx, config)
    try:
        token = store.add(
            name,
            acl_topics=[t for rule in settings.acl for t in rule.topics] + [settings.drain.topic],
            owner_separator=settings.drain.owner_separator,
        )
    except DrainbusError as exc:
        fail(exc)
    click.echo(token)
    click.echo(
        f"{name}: token added; it is shown only now, keep it as a secret (Authorization: Bearer …)",
        err=True,
    )


@tokens.command("ls", cls=SysexitsCommand)
@config_option
@click.pass_context
def tokens_ls(ctx: click.Context, config: str | None) -> None:
    """List each user's tokens: id and creation time (never the token)."""
    _, store = _store(ctx, config)
    store.reload()
    for token in store.tokens:
        role = " (admin)" if user_key(token.user) in store.admins else ""
        click.echo(f"{token.user}{role}\t{token.id}\t{token.created}")


@tokens.command("rm", cls=SysexitsCommand)
@config_option
@click.argument("name")
@click.argument("token_id", required=False)
@click.pass_context
def tokens_rm(ctx: click.Context, config: str | None, name: str, token_id: str | None) -> None:
    """Remove every token of user NAME, or only the one with TOKEN_ID (sha256:…)."""
    _, store = _store(ctx, config)
    try:
        count = store.remove(name, token_id)
    except DrainbusError as exc:
        fail(exc)
    click.echo(f"{name}: removed {count} token(s)" + (f" ({token_id})" if token_id else ""))
