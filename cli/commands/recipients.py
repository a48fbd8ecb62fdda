"""`mailbox-guard recipients`: recipient lists of guarded domains."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from cli.common import JSON, emit, fail, guarded, progress, store
from mailbox_guard.config import SettingError

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


@app.command("import")
def recipients_import(source: Path = typer.Argument(..., metavar="FILE",
                                                    help="One address per line ('-' for stdin); # starts a comment.")) -> None:
    """Add many known recipients at once, in one transaction: a bad line is named by
    its number and nothing is stored (shows progress on a terminal).

    Example: mailbox-guard recipients import users.txt
    """
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}")
    numbered = [(n, line.split("#", 1)[0].strip()) for n, line in enumerate(text.splitlines(), 1)]
    numbered = [(n, a) for n, a in numbered if a]
    st = store()
    with progress(range(len(numbered)), "checking recipients", length=len(numbered)) as bar:
        step = getattr(bar, "update", None)
        added = guarded(lambda: _import(st, numbered, source, step))
    typer.echo(f"imported {len(added)} recipient(s)")


def _import(st, numbered, source, step):
    try:
        return st.add_recipients([a for _, a in numbered], lines=[n for n, _ in numbered], progress=step)
    except SettingError as exc:
        raise SettingError(f"{source} {exc}; nothing imported") from None
