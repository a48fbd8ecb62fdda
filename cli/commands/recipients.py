"""`mailbox-guard recipients`: recipient lists of guarded domains."""

from __future__ import annotations

import json
from typing import Optional

import typer

from cli.common import JSON, emit, fail, guarded, store

app = typer.Typer(help="Recipient lists: once a domain has one, unknown users get 550.\n\n"
                  "Example: mailbox-guard recipients add alice@example.org",
                  no_args_is_help=True)


@app.command("add")
def recipients_add(address: str = typer.Argument(..., help="Full address of a local user.")) -> None:
    """Add a known recipient of a guarded domain.

    Example: mailbox-guard recipients add alice@example.org
    """
    addr = guarded(lambda: store().add_recipient(address))
    typer.echo(f"added {addr}")


@app.command("list")
def recipients_list(domain: Optional[str] = typer.Option(None, "--domain", help="Only this domain."),
                    as_json: bool = JSON) -> None:
    """List known recipients.

    Example: mailbox-guard recipients list --domain example.org --json
    """
    rows = [{"address": a} for a in guarded(lambda: store().recipients(domain))]
    emit(rows, as_json, ["address"])


@app.command("remove")
def recipients_remove(address: str = typer.Argument(..., help="Full address.")) -> None:
    """Remove a known recipient.

    Example: mailbox-guard recipients remove alice@example.org
    """
    if not guarded(lambda: store().remove_recipient(address)):
        fail(f"{address} is not in a recipient list")
    typer.echo(f"removed {address}")
