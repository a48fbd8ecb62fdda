"""`mailbox-guard policy`: what the current policy would do with a session, without
sending or storing anything (the same protocol-free session code the engine runs)."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import List, Optional

import typer

from cli.common import JSON, emit_json, fail, read_store

app = typer.Typer(help="What-if on the current policy.\n\n"
                  "Example: mailbox-guard policy test --ip 192.0.2.7 --helo mx.example.net "
                  "--from a@example.net --to bob@example.org",
                  no_args_is_help=True)


@app.command("test")
def policy_test(ip: str = typer.Option(..., "--ip", help="The client's address."),
                helo: str = typer.Option(..., "--helo", help="The name it gives in EHLO."),
                mail_from: str = typer.Option(..., "--from", metavar="ADDRESS",
                                              help="Envelope sender (empty for the null sender <>)."),
                to: List[str] = typer.Option(..., "--to", metavar="ADDRESS", help="A recipient (repeat for more)."),
                auth: Optional[str] = typer.Option(None, "--auth", metavar="USER",
                                                   help="As if this user had authenticated."),
                tls: bool = typer.Option(False, "--tls", help="As if the session were over TLS."),
                listener: str = typer.Option("inbound", "--listener", metavar="NAME",
                                             help="The listener it arrives on (inbound, submission, ...)."),
                message: Optional[Path] = typer.Argument(None, metavar="[MESSAGE.eml]",
                                                         help="The message (default: a small test message)."),
                as_json: bool = JSON) -> None:
    """Run a session through the current policy: every phase's results, each
    recipient's outcome and the replies, exactly as the engine would decide them.
    Nothing is sent and nothing is stored.

    Example: mailbox-guard policy test --ip 192.0.2.7 --helo mx.example.net --from a@example.net --to bob@example.org message.eml --json
    """
    from mailbox_guard.auth.users import load_account
    from mailbox_guard.engine import load_policy
    from mailbox_guard.session import whatif

    try:
        ip = str(ipaddress.ip_address(ip.strip()))
    except ValueError:
        raise typer.BadParameter(f"not an IP address: {ip!r}", param_hint="--ip") from None
    body = None
    if message is not None:
        try:
            body = message.read_bytes()
        except OSError as exc:
            fail(f"cannot read {message}: {exc.strerror or exc}")
        # A file saved on a mail client has LF line ends; SMTP carries CRLF.
        body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def load(conn):
        listeners = {r[0]: r[1] for r in conn.execute("SELECT name, kind FROM listeners")}
        return load_policy(conn), listeners, load_account(conn, auth) if auth else None
    policy, listeners, account = read_store(load)
    if auth and account is None:
        fail(f"no such user: {auth}")
    kind = listeners.get(listener) or {"inbound": "inbound", "submission": "submission",
                                       "smtps": "smtps"}.get(listener)
    if kind is None:
        fail(f"no such listener: {listener} (mailbox-guard listeners list)")
    w = whatif.WhatIf(ip=ip, helo=helo, mail_from=mail_from, recipients=to, listener=listener,
                      listener_kind=kind, auth_user=account.name if account else None,
                      auth_addresses=account.addresses if account else frozenset(), tls=tls, message=body)
    report = asyncio.run(whatif.run(w, policy))
    trace = [{"phase": v.phase, "subject": v.subject, "check": v.check, "symbol": v.symbol,
              "score": v.score, "action": v.action, "reply": v.reply, "detail": v.detail} for v in report.trace]
    if as_json:
        emit_json({"policy_version": policy.version, "steps": report.steps, "results": trace,
                   "recipients": report.outcomes, "final": report.final})
        return
    typer.echo(f"policy version {policy.version}")
    for s in report.steps:
        typer.echo(f"  {s['command']:<40} -> {s['reply']}")
    typer.echo("results:")
    for t in trace:
        score = f" {t['score']:+g}" if t["score"] else ""
        detail = f"  {t['detail']}" if t["detail"] else ""
        typer.echo(f"  {t['phase']:<8} {t['check']}/{t['symbol']} {t['action']}{score}{detail}")
    if report.outcomes:
        typer.echo("recipients:")
        for o in report.outcomes:
            typer.echo(f"  {o['recipient']}: {o['outcome']} (score {o['score']:g}, {o['level']}) {o['reason']}")
