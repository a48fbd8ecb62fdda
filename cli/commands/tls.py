"""`mailbox-guard tls`: the certificates of the listeners (reloaded without restart)."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from cli.common import JSON, emit, emit_json, fail, guarded, require_home, state, store
from mailbox_guard.store.db import ensure_home

app = typer.Typer(help="TLS certificates of the listeners.\n\n"
                  "Example: mailbox-guard tls install --cert fullchain.pem --key privkey.pem",
                  no_args_is_help=True)


@app.command("install")
def tls_install(cert: Path = typer.Option(..., "--cert", metavar="FILE", help="Certificate chain (PEM)."),
                key: Path = typer.Option(..., "--key", metavar="FILE", help="Private key (PEM)."),
                listener: Optional[str] = typer.Option(None, "--listener", metavar="NAME",
                                                       help="Only for this listener (default: all)."),
                as_json: bool = JSON) -> None:
    """Install a certificate and key; a running engine uses them for the next connection.

    Example: mailbox-guard tls install --cert fullchain.pem --key privkey.pem --listener submission
    """
    from mailbox_guard.tls import TlsError, install
    guarded(lambda: ensure_home(state.home))
    if listener is not None:
        _known_listener(listener)
    try:
        info = install(state.home, cert, key, listener)
    except TlsError as exc:
        fail(str(exc))
    if as_json:
        emit_json(asdict(info))
    else:
        typer.echo(f"installed for {info.name}: {info.subject}, valid until {info.not_after}")


def _known_listener(name: str) -> None:
    """A certificate for a name no listener has would never be served: refuse it."""
    from mailbox_guard.engine import DEFAULT_LISTENERS
    names = {r["name"] for r in guarded(lambda: store().listeners())} | {n for n, *_ in DEFAULT_LISTENERS}
    # `serve --inbound/--submission/--smtps` name their listeners KIND, KIND2, KIND3...
    if name not in names and not re.fullmatch(r"(inbound|submission|smtps)([2-9]|[1-9][0-9]+)?", name):
        fail(f"no listener named {name} (known: {', '.join(sorted(names | {'smtps'}))}; "
             "see `mailbox-guard listeners list`)")


@app.command("show")
def tls_show(as_json: bool = JSON) -> None:
    """Show the installed certificates (a self-signed one is made on first start).

    Example: mailbox-guard tls show --json
    """
    from mailbox_guard.tls import TLS_DIR, describe
    require_home()              # a typo in --home is one line, not an empty listing
    folder = state.home / TLS_DIR
    rows = []
    for cert in sorted(folder.glob("*.crt")) if folder.exists() else []:
        try:
            rows.append(asdict(describe(cert.stem, cert)))
        except (OSError, ValueError) as exc:
            rows.append({"name": cert.stem, "path": str(cert), "subject": f"unreadable: {exc}"})
    if not rows and not as_json:
        typer.echo("no certificate yet: the engine makes a self-signed one on its first start", err=True)
    emit(rows, as_json, ["name", "subject", "not_after", "self_signed"])
