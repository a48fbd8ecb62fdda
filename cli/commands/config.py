"""`mailbox-guard config`: settings one by one, and the whole policy as one TOML
file (export, then import with a diff, applied in one transaction)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Optional

import typer

from cli.common import JSON, emit, emit_json, fail, guarded, store
from mailbox_guard.config import SETTINGS
from mailbox_guard.policyfile import apply_policy, diff_policy, dump_policy, parse_policy, read_policy

app = typer.Typer(help="Settings and the whole policy as one TOML file.\n\n"
                  "Example: mailbox-guard config set queue.retry_schedule 1m,5m,15m,1h,4h",
                  no_args_is_help=True)


@app.command("show")
def config_show(as_json: bool = JSON) -> None:
    """Show every setting with its value, default and meaning.

    Example: mailbox-guard config show --json
    """
    current = guarded(lambda: store().settings())
    rows = [{"key": k, "value": current.get(k, s.default), "default": s.default, "help": s.help}
            for k, s in SETTINGS.items()]
    emit(rows, as_json, ["key", "value", "default"])


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
                                                        help="Write here instead of standard output.")) -> None:
    """Write the whole policy (domains, recipients, networks, listeners, settings) as TOML.

    Example: mailbox-guard config export -o policy.toml
    """
    text = dump_policy(guarded(lambda: read_policy(store())))
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text)
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror}")
        typer.echo(f"policy written to {output}", err=True)


@app.command("import")
def config_import(source: Path = typer.Argument(..., metavar="FILE", help="A TOML policy file ('-' for stdin)."),
                  dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would change."),
                  as_json: bool = JSON) -> None:
    """Replace the policy with a TOML file: shows the diff, applies it in one transaction.

    Example: mailbox-guard config import policy.toml --dry-run
    """
    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text()
    except OSError as exc:
        fail(f"cannot read {source}: {exc.strerror}")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        fail(f"{source}: not valid TOML ({exc})")
    wanted = guarded(lambda: parse_policy(doc))
    st = store()
    changes = diff_policy(guarded(lambda: read_policy(st)), wanted)
    if as_json:
        emit_json({"dry_run": dry_run, "changes": changes})
    elif not changes:
        typer.echo("no changes")
    else:
        for line in changes:
            typer.echo(line)
    if changes and not dry_run:
        guarded(lambda: apply_policy(st, wanted))
        if not as_json:
            typer.echo(f"applied {len(changes)} change(s)", err=True)
