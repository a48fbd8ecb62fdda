"""`mailbox-guard auth`: brute-force bans (client addresses and users)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer

from cli.common import JSON, emit, fail, guarded, state, store
from mailbox_guard.auth.users import UserStore

app = typer.Typer(help="Authentication bans after repeated failures.\n\n"
                  "Example: mailbox-guard auth bans",
                  no_args_is_help=True)


@app.command("bans")
def auth_bans(as_json: bool = JSON) -> None:
    """List the bans in force (client addresses and users).

    Example: mailbox-guard auth bans --json
    """
    rows = guarded(lambda: UserStore(store()).bans())
    if not as_json:
        for r in rows:
            r["until"] = datetime.fromtimestamp(r["until"]).strftime("%Y-%m-%d %H:%M:%S")
    emit(rows, as_json, ["kind", "key", "until", "failures"])


@app.command("unban")
def auth_unban(key: str = typer.Argument(..., help="The client address or user from `auth bans`.")) -> None:
    """End a ban now (a running engine picks it up within a second).

    Example: mailbox-guard auth unban 192.0.2.7
    """
    if not guarded(lambda: UserStore(store()).unban(key)):
        fail(f"no ban for {key}")
    typer.echo(f"unbanned {key}")


@app.command("gssapi")
def auth_gssapi(keytab: Path = typer.Option(..., "--keytab", metavar="FILE", help="Keytab with the service key."),
                principal: str = typer.Option(..., "--principal", metavar="NAME",
                                              help="Service principal, e.g. smtp/mail.example.org@EXAMPLE.ORG.")) -> None:
    """Install a keytab for GSSAPI (Kerberos) authentication; offered once it loads.

    Example: mailbox-guard auth gssapi --keytab /etc/krb5.keytab --principal smtp/mail.example.org
    """
    from mailbox_guard.auth.kerberos import install_keytab
    if not principal.strip() or any(c.isspace() for c in principal):
        fail(f"not a principal: {principal!r}")
    st = store()
    try:
        install_keytab(state.home, keytab)
    except OSError as exc:
        fail(f"cannot install {keytab}: {exc.strerror}")
    except ValueError as exc:
        fail(f"{keytab}: {exc}")
    guarded(lambda: st.set_setting("auth.gssapi_principal", principal))
    typer.echo(f"GSSAPI keytab installed for {principal}; `mailbox-guard status` tells whether it is offered")
