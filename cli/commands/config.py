"""`mailbox-guard config`: settings one by one, and the whole policy as one TOML
file (export as a backup; import with a diff and a confirmation, in one transaction)."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Optional

import typer

from cli.common import JSON, YES, confirm, emit, emit_json, fail, guarded, store
from mailbox_guard.config import SETTINGS, SettingError
from mailbox_guard.store.policyfile import (apply_policy, diff_policy, dump_policy, merge, parse_policy, read_policy,
                                      read_state)

app = typer.Typer(help="Settings and the whole policy as one TOML file.\n\n"
                  "Example: mailbox-guard config set queue.retry_schedule 1m,5m,15m,1h,4h",
                  no_args_is_help=True)


@app.command("show")
def config_show(changed: bool = typer.Option(False, "--changed",
                                             help="Only settings whose value differs from the default "
                                                  "(like postconf -n)."),
                as_json: bool = JSON) -> None:
    """Show every setting with its value, default and meaning.

    Example: mailbox-guard config show --changed
    """
    current = guarded(lambda: store().settings())
    rows = [{"key": k, "value": current.get(k, s.default), "default": s.default, "help": s.help}
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
               value: str = typer.Argument(..., help="New value.")) -> None:
    """Change a setting (validated; a running engine picks it up within a second).

    Example: mailbox-guard config set smtp.max_message_size 20480000
    """
    guarded(lambda: store().set_setting(key, value))
    typer.echo(f"{key} = {value}")


@app.command("unset")
def config_unset(key: str = typer.Argument(..., help="Setting name.")) -> None:
    """Return a setting to its default.

    Example: mailbox-guard config unset smtp.timeout
    """
    guarded(lambda: store().unset_setting(key))
    typer.echo(f"{key} = {SETTINGS[key].default} (default)")


@app.command("export")
def config_export(output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE",
                                                        help="Write here (mode 0600) instead of standard output.")) -> None:
    """Write the whole policy as TOML: a backup that `config import` restores.

    It holds settings, the password policy, domains with every option (next hop,
    anti-impersonation, mechanisms, password policy), recipients, networks, listeners,
    and users with their aliases, password hashes and derived SASL secrets (CRAM-MD5
    and DIGEST-MD5 secrets are password-equivalent): the file is written 0600; keep it
    as safe as the store.

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
    recipients, networks, listeners, users) replaces the store's; sections it lacks are
    left alone unless --replace. Shows the diff, asks on a terminal, applies it in one
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
    wanted = guarded(lambda: merge(current, parse_policy(doc), replace=replace, force=force))
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
