"""`mailbox-guard domains`: the domains we guard, their next hops and options."""

from __future__ import annotations

import json
from typing import Optional

import typer

from cli.common import JSON, YES, confirm, emit, emit_json, fail, guarded, store
from mailbox_guard.store.db import domain_unicode

app = typer.Typer(help="Domains we guard (accept mail for) and their next hops.\n\n"
                  "Example: mailbox-guard domains add example.org --next-hop 10.0.0.5:25",
                  no_args_is_help=True)

@app.command("add")
def domains_add(
    name: str = typer.Argument(..., help="Domain name, e.g. example.org (or an IDN: exämple.org)."),
    next_hop: Optional[str] = typer.Option(None, "--next-hop", metavar="HOST:PORT",
                                           help="Relay accepted mail here (default: by MX)."),
    as_json: bool = JSON,
) -> None:
    """Guard a domain (or change its next hop). An IDN is kept as its A-label (xn--...).

    Example: mailbox-guard domains add example.org --next-hop mail.internal:25
    """
    row = guarded(lambda: store().add_domain(name, next_hop))
    if as_json:
        typer.echo(json.dumps({"name": row.name, "next_hop": row.next_hop}))
    else:
        shown = row.name if domain_unicode(row.name) == row.name else f"{row.name} ({domain_unicode(row.name)})"
        typer.echo(f"guarding {shown}, next hop {row.next_hop or 'by MX'}")


@app.command("list")
def domains_list(as_json: bool = JSON) -> None:
    """List guarded domains (IDNs with their Unicode form).

    Example: mailbox-guard domains list --json
    """
    rows = [{"name": d.name, "next_hop": d.next_hop} for d in guarded(lambda: store().domains())]
    if as_json:
        emit_json(rows)
        return
    idn = any(domain_unicode(r["name"]) != r["name"] for r in rows)
    for r in rows:
        r["unicode"] = domain_unicode(r["name"])
    emit(rows, False, ["name", "next_hop"] + (["unicode"] if idn else []))


@app.command("show")
def domains_show(name: str = typer.Argument(..., help="Domain name."), as_json: bool = JSON) -> None:
    """Show every option of a guarded domain: next hop, anti-impersonation, SASL
    mechanisms, password policy, its own settings (`config set --domain`) and check
    modes (`checks mode --domain`), how many recipients and users it has.

    Example: mailbox-guard domains show example.org
    """
    from dataclasses import asdict
    from mailbox_guard.auth.users import DEFAULT_POLICY
    info = guarded(lambda: store().domain(name))
    info["password_policy"] = info["password_policy"] or asdict(DEFAULT_POLICY)
    if as_json:
        emit_json(info)
        return
    policy = info["password_policy"]
    lines = [("domain", info["name"] + (f" ({info['unicode']})" if info["unicode"] != info["name"] else "")),
             ("next hop", info["next_hop"] or "by MX"),
             ("anti-impersonation", "on" if info["anti_impersonation"] else "off"),
             ("legacy mechanisms", ", ".join(info["mechanisms"]) or "none (CRAM-MD5, DIGEST-MD5 off)"),
             ("password policy", _policy_text(policy, info["name"])),
             ("settings", _own(info["settings"], "the server's values apply")),
             ("check modes", _own(info["check_modes"], "the server's modes apply")),
             ("recipients", f"{info['recipients']}" + ("" if info["recipients"] else " (no list: every local part accepted)")),
             ("users", str(info["users"]))]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        typer.echo(f"{key.ljust(width)}  {value}")


def _own(values: dict, otherwise: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or f"none of its own ({otherwise})"


def _policy_text(policy: dict, domain: str) -> str:
    scope = "this domain's" if policy["scope"] == domain else "server's"
    return (f"{scope}: at least {policy['min_length']} characters, {policy['min_classes']} classes, "
            f"common passwords {'refused' if policy['reject_common'] else 'allowed'}, "
            f"user name {'refused' if policy['reject_name'] else 'allowed'}")


@app.command("remove")
def domains_remove(name: str = typer.Argument(..., help="Domain name."), yes: bool = YES) -> None:
    """Stop guarding a domain; its recipient list, users, mechanisms and password
    policy go with it (asks first on a terminal, saying how many).

    Example: mailbox-guard domains remove example.org --yes
    """
    st = store()
    info = guarded(lambda: st.domain(name))
    confirm(f"stop guarding {info['name']} and delete its {info['recipients']} recipient(s) "
            f"and {info['users']} user(s)?", yes)
    gone = guarded(lambda: st.remove_domain(name))
    if gone is None:
        fail(f"{name} is not a guarded domain")
    typer.echo(f"no longer guarding {info['name']}; {gone[0]} recipient(s) and {gone[1]} user(s) removed with it")


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
