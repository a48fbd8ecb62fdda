"""`mailbox-guard checks`: the checks every message passes, in order, and their modes
(enforce, warn: traced as "would ...", off: not run) at the server and per domain or
user (user > domain > server)."""

from __future__ import annotations

from typing import Optional

import typer

from cli.common import JSON, emit, emit_json, fail, guarded, scope_of, store
from mailbox_guard.checks import default_checks
from mailbox_guard.model import Phase, check_attr
from mailbox_guard.store.db import MODES

app = typer.Typer(help="The checks, in the order they run, and their modes: enforce, warn (log what it "
                  "would do) or off; per domain or user too.\n\n"
                  "Example: mailbox-guard checks mode rcpt_recipients warn --domain example.org",
                  no_args_is_help=True)

DOMAIN = typer.Option(None, "--domain", metavar="DOMAIN", help="A guarded domain's own mode.")
USER = typer.Option(None, "--user", metavar="ADDRESS",
                    help="One address's own mode (a user, or any address of a guarded domain).")
PHASES = [p.value for p in Phase]


def _label(scope: str) -> str:
    return "the server" if not scope else f"user {scope}" if "@" in scope else f"domain {scope}"


def _check(name: str):
    found = {c.name: c for c in default_checks()}
    if name not in found:
        fail(f"unknown check {name!r}; `mailbox-guard checks list` shows them ({', '.join(found)})")
    return found[name]


def _modes() -> dict[str, dict[str, str]]:
    """check -> scope -> mode, as stored."""
    out: dict[str, dict[str, str]] = {}
    for r in guarded(lambda: store().check_modes()):
        out.setdefault(r["check"], {})[r["scope"].lower()] = r["mode"]
    return out


def _effective(check, own: dict[str, str], scope: str) -> tuple[str, str]:
    """(mode, where it comes from) of a check at a scope: user > domain > server > default."""
    if check_attr(check, "fixed_mode"):
        return "enforce", "fixed"
    chain = ["", scope.rpartition("@")[2], scope] if "@" in scope else ["", scope] if scope else [""]
    mode, source = check_attr(check, "default_mode").value, "default"
    for s in dict.fromkeys(chain):
        if s in own:
            mode, source = own[s], ("server" if not s else _label(s))
    return mode, source


def _row(order: int, check, own: dict[str, str], scope: str) -> dict:
    server, server_from = _effective(check, own, "")
    row = {"order": order, "name": check.name,
           "phases": sorted((p.value for p in check.phases), key=PHASES.index),
           "kind": "gate" if check_attr(check, "gate") else "scoring",
           "default_mode": check_attr(check, "default_mode").value, "fixed": bool(check_attr(check, "fixed_mode")),
           "server": server, "server_from": server_from,
           "overrides": [{"scope": s, "level": "user" if "@" in s else "domain", "mode": m}
                         for s, m in sorted(own.items()) if s],
           "description": check_attr(check, "description")}
    if scope:
        row["scope"] = scope
        row["mode"], row["from"] = _effective(check, own, scope)
    return row


@app.command("list")
def checks_list(domain: Optional[str] = DOMAIN, user: Optional[str] = USER, as_json: bool = JSON) -> None:
    """Every check in the order it runs: phases, gate or scoring, its mode at the server
    and the domains and users that have their own, and what it does.

    A gate's refusal answers the command it judges; a scoring check's findings add up
    to the actions.* thresholds (and connect/HELO/MAIL refusals wait for RCPT). With
    --domain or --user: the mode that applies there, and where it comes from.

    Example: mailbox-guard checks list --domain example.org --json
    """
    scope = scope_of(domain, user)
    modes = _modes()
    rows = [_row(i, c, modes.get(c.name, {}), scope) for i, c in enumerate(default_checks(), 1)]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        r["phases"] = ",".join(r["phases"])
        r["server"] = r["server"] + ("" if r["server_from"] in ("default", "server") else f" ({r['server_from']})")
        r["overrides"] = ", ".join(f"{o['scope']}={o['mode']}" for o in r["overrides"]) or None
    columns = ["order", "name", "phases", "kind", "server"]
    columns += ["mode", "from"] if scope else ["overrides"]
    emit(rows, False, columns + ["description"])


@app.command("mode")
def checks_mode(name: str = typer.Argument(..., help="A check's name (see `checks list`)."),
                mode: str = typer.Argument(..., metavar="MODE", help="enforce, warn or off."),
                domain: Optional[str] = DOMAIN, user: Optional[str] = USER) -> None:
    """Set a check's mode at the server, or for one domain or user: enforce (its results
    act), warn (traced as "would ..." and do not act), off (it does not run).

    Relay control (rcpt_relay) is always enforced: it cannot be set to warn or off.

    Example: mailbox-guard checks mode rcpt_recipients warn --user bob@example.org
    """
    check = _check(name)
    value = mode.strip().lower()
    if value not in MODES:
        fail(f"unknown mode {mode!r} (enforce, warn or off)")
    if check_attr(check, "fixed_mode"):
        if value != "enforce":
            fail(f"{name} is always enforced and cannot be set to {value}: its mode is fixed, "
                 "as nothing may weaken relay control")
        typer.echo(f"{name} is always enforced")
        return
    scope = scope_of(domain, user)
    guarded(lambda: store().set_check_mode(name, value, scope))
    typer.echo(f"{name} = {value} at {_label(scope)}")


@app.command("reset")
def checks_reset(name: str = typer.Argument(..., help="A check's name (see `checks list`)."),
                 domain: Optional[str] = DOMAIN, user: Optional[str] = USER) -> None:
    """Remove the server's, a domain's or a user's own mode for a check: the next
    level's (in the end the check's default) applies again.

    Example: mailbox-guard checks reset rcpt_recipients --domain example.org
    """
    check = _check(name)
    scope = scope_of(domain, user)
    removed = guarded(lambda: store().reset_check_mode(name, scope))
    mode, source = _effective(check, _modes().get(name, {}), scope)
    if removed:
        typer.echo(f"{name} at {_label(scope)}: now {mode} ({source})")
    else:
        typer.echo(f"{name} had no mode of its own at {_label(scope)}; it is {mode} ({source})")
