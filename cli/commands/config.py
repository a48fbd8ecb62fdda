"""`mailbox-guard config`: settings one by one (the server's, or a domain's or a
user's own value of a scoped setting), and the whole policy as one TOML file (export
as a backup; import with a diff and a confirmation, in one transaction)."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Optional

import typer

from cli.common import JSON, YES, confirm, emit, emit_json, fail, guarded, scope_of, store
from mailbox_guard.config import SETTINGS, SettingError
from mailbox_guard.store.policyfile import (apply_policy, diff_policy, dump_policy, merge, parse_policy, read_policy,
                                      read_state)

app = typer.Typer(help="Settings and the whole policy as one TOML file.\n\n"
                  "Scoped settings (actions.*) may also be set per domain or per user: "
                  "user > domain > server.\n\n"
                  "Example: mailbox-guard config set queue.retry_schedule 1m,5m,15m,1h,4h",
                  no_args_is_help=True)

DOMAIN = typer.Option(None, "--domain", metavar="DOMAIN",
                      help="A guarded domain's own value (scoped settings only).")
USER = typer.Option(None, "--user", metavar="ADDRESS",
                    help="One address's own value (a user, or any address of a guarded domain).")


def _label(scope: str) -> str:
    return "server" if not scope else f"user {scope}" if "@" in scope else f"domain {scope}"


def effective(st, scope: str) -> list[dict]:
    """Every scoped setting as it applies at ``scope``: value and where it comes from
    (default, server, the domain, the user), the most specific winning."""
    server = st.settings()
    chain = [scope.rpartition("@")[2], scope] if "@" in scope else [scope]
    own = {s: {r["key"]: r["value"] for r in st.scoped_settings(s)} for s in dict.fromkeys(chain)}
    rows = []
    for key, setting in SETTINGS.items():
        if not setting.scoped:
            continue
        value, source = setting.default, "default"
        if key in server:
            value, source = server[key], "server"
        for s in own:
            if key in own[s]:
                value, source = own[s][key], _label(s)
        rows.append({"key": key, "value": value, "from": source, "default": setting.default, "help": setting.help})
    return rows


@app.command("show")
def config_show(changed: bool = typer.Option(False, "--changed",
                                             help="Only settings whose value differs from the default "
                                                  "(like postconf -n)."),
                domain: Optional[str] = DOMAIN, user: Optional[str] = USER,
                as_json: bool = JSON) -> None:
    """Show every setting with its value, default and meaning.

    With --domain or --user: the scoped settings as they apply there, and where each
    value comes from (default, server, domain, user).

    Example: mailbox-guard config show --user bob@example.org
    """
    scope = scope_of(domain, user)
    st = store()
    if scope:
        rows = guarded(lambda: effective(st, scope))
        if changed:
            rows = [r for r in rows if r["from"] != "default" and _differs(r["key"], r["value"])]
        emit(rows, as_json, ["key", "value", "from", "default", "help"])
        return
    current = guarded(lambda: st.settings())
    overrides: dict[str, list[dict]] = {}
    for r in guarded(lambda: st.scoped_settings()):
        overrides.setdefault(r["key"], []).append({"scope": r["scope"], "value": r["value"]})
    rows = [{"key": k, "value": current.get(k, s.default), "default": s.default, "help": s.help,
             "scoped": s.scoped, **({"overrides": overrides.get(k, [])} if s.scoped else {})}
            for k, s in SETTINGS.items()]
    if changed:
        rows = [r for r in rows if r["key"] in current and _differs(r["key"], r["value"])]
    emit(rows, as_json, ["key", "value", "default", "help"])


def _differs(key: str, value: str) -> bool:
    """Compared as parsed ("300" is "300s"); a value the parser refuses differs."""
    setting = SETTINGS[key]
    try:
        return setting.parse(value) != setting.parse(setting.default)
    except SettingError:
        return True


@app.command("get")
def config_get(key: str = typer.Argument(..., help="Setting name.")) -> None:
    """Print one setting's value.

    Example: mailbox-guard config get smtp.max_message_size
    """
    if key not in SETTINGS:
        fail(f"unknown setting {key!r}; `mailbox-guard config show` lists them")
    typer.echo(guarded(lambda: store().settings()).get(key, SETTINGS[key].default))


@app.command("set")
def config_set(key: str = typer.Argument(..., help="Setting name."),
               value: str = typer.Argument(..., help="New value."),
               domain: Optional[str] = DOMAIN, user: Optional[str] = USER) -> None:
    """Change a setting (validated; a running engine picks it up within a second).

    With --domain or --user, that domain's or address's own value of a scoped
    setting (actions.*), which wins over the server's (a user's over its domain's).

    Example: mailbox-guard config set actions.reject 10 --domain example.org
    """
    scope = scope_of(domain, user)
    st = store()
    guarded(lambda: st.set_scoped_setting(scope, key, value))
    typer.echo(f"{key} = {value}" + (f" ({_label(scope)})" if scope else ""))


@app.command("unset")
def config_unset(key: str = typer.Argument(..., help="Setting name."),
                 domain: Optional[str] = DOMAIN, user: Optional[str] = USER) -> None:
    """Return a setting to its default (with --domain or --user: remove that scope's
    own value; the next level's then applies).

    Example: mailbox-guard config unset actions.reject --domain example.org
    """
    scope = scope_of(domain, user)
    st = store()
    guarded(lambda: st.unset_scoped_setting(scope, key))
    if not scope:
        typer.echo(f"{key} = {SETTINGS[key].default} (default)")
        return
    row = next(r for r in guarded(lambda: effective(st, scope)) if r["key"] == key)
    typer.echo(f"{key} = {row['value']} ({row['from']}) at {_label(scope)}")


@app.command("export")
def config_export(output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE",
                                                        help="Write here (mode 0600) instead of standard output.")) -> None:
    """Write the whole policy as TOML: a backup that `config import` restores.

    It holds settings, the password policy, domains with every option (next hop,
    anti-impersonation, mechanisms, password policy), recipients, networks, listeners,
    users with their aliases, password hashes and derived SASL secrets (CRAM-MD5 and
    DIGEST-MD5 secrets are password-equivalent), the settings of domains and users
    (scoped_settings) and the check modes (check_modes): the file is written 0600;
    keep it as safe as the store.

    Example: mailbox-guard config export -o policy.toml
    """
    text = dump_policy(guarded(lambda: read_policy(store())))
    if output is None:
        sys.stdout.write(text)
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)     # an existing file keeps its mode otherwise
            f.write(text)
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}")
    typer.echo(f"policy written to {output}", err=True)


@app.command("import")
def config_import(source: Path = typer.Argument(..., metavar="FILE", help="A TOML policy file ('-' for stdin)."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would change."),
                  replace: bool = typer.Option(False, "--replace",
                                               help="Empty the sections the file does not have (default: "
                                                    "leave them alone)."),
                  yes: bool = YES,
                  force: bool = typer.Option(False, "--force", help="Accept networks that make an open relay."),
                  as_json: bool = JSON) -> None:
    """Apply a TOML policy file: each section in it (settings, password_policy, domains,
    recipients, networks, listeners, users, scoped_settings, check_modes) replaces the
    store's; sections it lacks are left alone unless --replace. Shows the diff, asks on a terminal, applies it in one
    transaction. A file without `format = 1` is refused.

    Example: mailbox-guard config import policy.toml --dry-run
    """
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        fail(f"{source}: not valid TOML ({exc})")
    st = store()
    current = guarded(lambda: read_state(st))
    from mailbox_guard.checks import default_checks
    from mailbox_guard.model import check_attr
    checks = {c.name: bool(check_attr(c, "fixed_mode")) for c in default_checks()}
    wanted = guarded(lambda: merge(current, parse_policy(doc, checks=checks), replace=replace, force=force))
    changes = diff_policy(current, wanted)
    if as_json:
        emit_json({"dry_run": dry_run, "changes": changes, "applied": bool(changes) and not dry_run})
    elif not changes:
        typer.echo("no changes")
    else:
        for line in changes:
            typer.echo(line)
    if changes and not dry_run:
        confirm(f"apply these {len(changes)} change(s)?", yes)
        guarded(lambda: apply_policy(st, current, wanted))
        if not as_json:
            typer.echo(f"applied {len(changes)} change(s)", err=True)
