"""`mailbox-guard rejects`: the commands the gateway refused (5xx and 4xx), newest
first, from the verdicts kept in the store (a refused transaction is stored with its
connection when the connection closes)."""

from __future__ import annotations

import ipaddress
import time
from typing import Optional

import typer

from cli.common import JSON, emit, guarded, read_store
from cli.commands.queue import _when
from mailbox_guard.queue import ops as q


def rejects(since: Optional[str] = typer.Option(None, "--since", metavar="DURATION",
                                                help="Only the last DURATION (e.g. 30m, 1h, 2d)."),
            client: Optional[str] = typer.Option(None, "--client", metavar="IP", help="Only from this address."),
            sender: Optional[str] = typer.Option(None, "--sender", metavar="ADDRESS",
                                                 help="Only this envelope sender (@domain: any of the domain)."),
            recipient: Optional[str] = typer.Option(None, "--recipient", metavar="ADDRESS",
                                                    help="Only this recipient (@domain: any of the domain)."),
            check: Optional[str] = typer.Option(None, "--check", metavar="NAME",
                                                help="Only this check or symbol (rcpt_relay, RELAY_DENIED, ...)."),
            limit: int = typer.Option(100, "--limit", min=1, max=100000, help="At most this many, newest first."),
            as_json: bool = JSON) -> None:
    """Refused commands: time, client, sender, recipient, check, reply.

    The sender of a refused RCPT is that of its transaction; `messages why CONNECTION`
    shows the whole session.

    Example: mailbox-guard rejects --since 1h --check RELAY_DENIED --json
    """
    from mailbox_guard.config import parse_duration
    after = time.time() - guarded(lambda: parse_duration(since)) if since else None
    if client:
        try:
            client = str(ipaddress.ip_address(client.strip()))
        except ValueError:
            raise typer.BadParameter(f"not an IP address: {client!r}", param_hint="--client") from None
    rows = read_store(lambda c: q.rejects(c, since=after, client=client, sender=sender, recipient=recipient,
                                          check=check, limit=limit))
    if not as_json:
        for r in rows:
            r["time"] = _when(r["at"])
            r["check"] = f"{r['check']}/{r['symbol']}"
    emit(rows, as_json, ["time", "connection", "client", "sender", "recipient", "check", "reply"])
