"""`mailbox-guard connections`: the running engine's live SMTP sessions."""

from __future__ import annotations

import typer

from cli.common import JSON, control, emit, guarded

app = typer.Typer(help="Live SMTP connections of the running engine.\n\n"
                  "Example: mailbox-guard connections list",
                  no_args_is_help=True)


@app.command("list")
def connections_list(as_json: bool = JSON) -> None:
    """List live connections: client, HELO, user, phase, TLS, age.

    Example: mailbox-guard connections list --json
    """
    rows = guarded(lambda: control().call("connections"))
    for r in rows:
        r["tls"] = (r.get("tls") or {}).get("version") if isinstance(r.get("tls"), dict) else r.get("tls")
    emit(rows, as_json, ["id", "listener", "peer_ip", "peer_port", "helo", "user", "phase", "tls", "age",
                         "messages"])


@app.command("kill")
def connections_kill(connection: str = typer.Argument(..., help="Connection id (from `connections list`).")) -> None:
    """End a live connection (the client gets 421).

    Example: mailbox-guard connections kill C1A230E0D1D000001
    """
    guarded(lambda: control().call("connections.kill", id=connection))
    typer.echo(f"{connection}: closed")
