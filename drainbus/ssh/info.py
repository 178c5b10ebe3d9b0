"""The read-only commands: ``ls`` (topics), ``whoami`` (this session), ``stats`` (drain health)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from drainbus.bus.catalog import describe_topics, known_topics
from drainbus.drain.status import drain_health
from drainbus.errors import PermissionDenied
from drainbus.ssh.context import SessionContext
from drainbus.ssh.durable import durable_listing, durable_table

__all__ = ["run_ls", "run_stats", "run_whoami"]


async def run_ls(ctx: SessionContext, args: argparse.Namespace) -> int:
    """``ls [PREFIX]``: the topics the user may read, as a table or JSON lines."""
    bus = ctx.bus
    topics = [
        t
        for t in await known_topics(bus.redis, bus.keys)
        if t.startswith(args.prefix or "") and ctx.access.allows(ctx.identity, "subscribe", t)
    ]
    summaries = await describe_topics(bus.redis, bus.keys, topics, await bus.presence.subscribers())
    durables = await durable_listing(ctx, [s.topic for s in summaries])
    if args.json:
        await ctx.stdout(b"".join(json.dumps({**asdict(s), "durable": durables.get(s.topic, [])})
                                  .encode() + b"\n" for s in summaries))  # fmt: skip
        return 0
    rows = [("TOPIC", "ENTRIES", "LAST MESSAGE", "SUBSCRIBERS", "DEAD", "GROUPS")]
    for s in summaries:
        groups = ", ".join(
            f"{g.name} (lag {'?' if g.lag is None else g.lag}, pending {g.pending})"
            for g in s.groups
        )
        rows.append(
            (
                s.topic,
                str(s.entries),
                s.last_time or "-",
                str(s.subscribers),
                str(s.dead_letters),
                groups or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
        for r in rows
    ] + durable_table(durables)
    await ctx.stdout(("\n".join(lines) + "\n").encode())
    return 0


async def run_whoami(ctx: SessionContext, args: argparse.Namespace) -> int:
    """``whoami``: the user name, key fingerprint and admin flag this session runs as."""
    ident = ctx.identity
    admin = "yes" if ident.is_admin else "no"
    text = f"user: {ident.user}\nkey: {ident.fingerprint}\nadmin: {admin}\n"
    if args.json:
        text = json.dumps(asdict(ident)) + "\n"
    await ctx.stdout(text.encode())
    return 0


async def run_stats(ctx: SessionContext, args: argparse.Namespace) -> int:
    """``stats`` (admins): the drain's health: lag, pending, dead letters, per node."""
    if not ctx.identity.is_admin:
        raise PermissionDenied("stats is for admins (server.admins)", user=ctx.identity.user)
    health = await drain_health(ctx.bus.redis, ctx.bus.keys, ctx.settings.drain.topic)
    persistence = await ctx.bus.persistence.refresh()
    if args.json:
        health["persistence"] = persistence.as_dict()
        await ctx.stdout(json.dumps(health).encode() + b"\n")
        return 0
    lines = [
        f"persistence: {persistence.summary()}",
        f"topic {health['topic']}: {health['messages']} message(s), last "
        f"{health['last_message'] or '-'}, dead letters {health['dead_letters']}",
        "",
        "GROUP                LAG    PENDING  CONSUMERS",
    ]
    for g in health["groups"]:
        lag = "?" if g["lag"] is None else str(g["lag"])
        lines.append(f"{g['group']:<20} {lag:<6} {g['pending']:<8} {g['consumers']}")
    lines += ["", "NODE         LAST PURGE                PURGES  DEAD  LAST ERROR"]
    for node in health["nodes"]:
        lines.append(
            f"{node['node']:<12} {node['last_purge'] or '-':<25} {node['purges_done']:<7} "
            f"{node['dead_lettered']:<5} {node['last_error'] or '-'}"
        )
        for target, figures in node["targets"].items():
            shown = ", ".join(f"{k} {v}" for k, v in figures.items() if v not in (None, {}))
            lines.append(f"  {target}: {shown}")
    if not health["nodes"]:
        lines.append("(no drain node has reported in the last 2 minutes)")
    await ctx.stdout(("\n".join(lines) + "\n").encode())
    return 0
