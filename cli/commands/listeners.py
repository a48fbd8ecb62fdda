"""`mailbox-guard listeners`: SMTP listeners kept in the store."""

from __future__ import annotations

import typer

from cli.common import JSON, emit, fail, guarded, store

app = typer.Typer(help="SMTP listeners kept in the store (serve flags override them).\n\n"
                  "Example: mailbox-guard listeners add mx inbound 0.0.0.0:25",
                  no_args_is_help=True)


@app.command("add")
def listeners_add(name: str = typer.Argument(..., help="A short name, e.g. mx."),
                  kind: str = typer.Argument(..., help="inbound, submission or smtps."),
                  address: str = typer.Argument(..., help="HOST:PORT to listen on (an IP address or host name; [v6]:port)."),
                  require_auth: bool = typer.Option(False, "--require-auth",
                                                    help="Accept only authenticated clients (offers AUTH)."),
                  plaintext_auth: bool = typer.Option(False, "--plaintext-auth",
                                                      help="Allow PLAIN/LOGIN before TLS (loopback only).")) -> None:
    """Add or change a listener (takes effect at the next start).

    Example: mailbox-guard listeners add submission submission 0.0.0.0:587
    """
    row = guarded(lambda: store().add_listener(name, kind, address, require_auth=require_auth,
                                               plaintext_auth=plaintext_auth))
    typer.echo(f"listener {row['name']}: {row['kind']} on {row['host']}:{row['port']}")


@app.command("list")
def listeners_list(as_json: bool = JSON) -> None:
    """List listeners (the embedded defaults when none are set).

    Example: mailbox-guard listeners list --json
    """
    from mailbox_guard.engine import DEFAULT_LISTENERS
    rows = guarded(lambda: store().listeners())
    if not rows:
        rows = [{"name": n, "kind": k, "host": h, "port": p, "default": True}
                for n, k, h, p in DEFAULT_LISTENERS]
    emit(rows, as_json, ["name", "kind", "host", "port"])


@app.command("remove")
def listeners_remove(name: str = typer.Argument(..., help="Listener name.")) -> None:
    """Remove a listener.

    Example: mailbox-guard listeners remove submission
    """
    if not guarded(lambda: store().remove_listener(name)):
        fail(f"no listener named {name}")
    typer.echo(f"removed listener {name}")
