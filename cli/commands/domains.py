"""`mailbox-guard domains`: the domains we guard and their next hops."""

from __future__ import annotations

import json
from typing import Optional

import typer

from cli.common import JSON, emit, fail, guarded, store

app = typer.Typer(help="Domains we guard (accept mail for) and their next hops.\n\n"
                  "Example: mailbox-guard domains add example.org --next-hop 10.0.0.5:25",
                  no_args_is_help=True)


@app.command("add")
def domains_add(
    name: str = typer.Argument(..., help="Domain name, e.g. example.org."),
    next_hop: Optional[str] = typer.Option(None, "--next-hop", metavar="HOST:PORT",
                                           help="Relay accepted mail here (default: by MX)."),
    as_json: bool = JSON,
) -> None:
    """Guard a domain (or change its next hop).

    Example: mailbox-guard domains add example.org --next-hop mail.internal:25
    """
    row = guarded(lambda: store().add_domain(name, next_hop))
    if as_json:
        typer.echo(json.dumps({"name": row.name, "next_hop": row.next_hop}))
    else:
        typer.echo(f"guarding {row.name}, next hop {row.next_hop or 'by MX'}")


@app.command("list")
def domains_list(as_json: bool = JSON) -> None:
    """List guarded domains.

    Example: mailbox-guard domains list --json
    """
    rows = [{"name": d.name, "next_hop": d.next_hop} for d in guarded(lambda: store().domains())]
    emit(rows, as_json, ["name", "next_hop"])


@app.command("remove")
def domains_remove(name: str = typer.Argument(..., help="Domain name.")) -> None:
    """Stop guarding a domain (its recipient list goes with it).

    Example: mailbox-guard domains remove example.org
    """
    if not guarded(lambda: store().remove_domain(name)):
        fail(f"{name} is not a guarded domain")
    typer.echo(f"no longer guarding {name}")


@app.command("set")
def domains_set(name: str = typer.Argument(..., help="Domain name."),
                anti_impersonation: Optional[str] = typer.Option(
                    None, "--anti-impersonation", metavar="on|off",
                    help="Whether its authenticated users may send only as themselves (default on).")) -> None:
    """Change a guarded domain's options.

    Example: mailbox-guard domains set example.org --anti-impersonation off
    """
    if anti_impersonation not in ("on", "off"):
        raise typer.BadParameter("use on or off", param_hint="--anti-impersonation")
    guarded(lambda: store().set_domain_option(name, "anti_impersonation", anti_impersonation == "on"))
    typer.echo(f"{name}: anti-impersonation {anti_impersonation}")
