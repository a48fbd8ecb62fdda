"""What every CLI command shares: the home folder, one-line errors and exit codes
(0 ok, 1 failed, 2 usage), table or ``--json`` output, the store and the control
socket of the running engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

import typer

from mailbox_guard.config import SettingError
from mailbox_guard.store.db import PolicyStore, StoreError, ensure_home

HOME_ENV = "MAILBOX_GUARD_HOME"
DEFAULT_HOME = "./mailbox-guard-data"


class State:
    home: Path = Path(DEFAULT_HOME)


state = State()

JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


def fail(message: str) -> NoReturn:
    typer.echo(f"mailbox-guard: {message}", err=True)
    raise typer.Exit(1)


def guarded(fn: Callable[[], Any]) -> Any:
    """Run an operation; turn the errors an admin can cause into one line, exit 1."""
    from mailbox_guard.control.client import ControlCallError, EngineNotRunning
    from mailbox_guard.queue.ops import QueueActionError
    try:
        return fn()
    except (SettingError, StoreError, QueueActionError, EngineNotRunning) as exc:
        fail(str(exc))
    except ControlCallError as exc:
        fail(exc.message)


# Commands that only look: on a home that does not exist they say so instead of
# creating an empty store (a typo in --home must not look like an empty configuration).
# Only `serve` and policy edits create a home.
READ_ONLY_COMMANDS = frozenset({
    "status", "rejects", "domains list", "domains show", "recipients list", "networks list", "listeners list",
    "config show", "config get", "config export", "queue list", "queue show", "queue summary",
    "messages why", "users list", "auth bans", "tls show", "policy test", "checks list"})

# Edits that can only change what is already there: removals, unsets, unbans, resets,
# and changes to a guarded domain, its recipients and its users. On a home that does
# not exist they cannot succeed, so they refuse as read-only commands do instead of
# creating an empty store to fail in. (`config set`, `checks mode` and `users policy`
# are such edits with --domain or --user: they ask `require_home` themselves.)
EXISTING_ONLY_COMMANDS = frozenset({
    "domains remove", "domains set", "recipients add", "recipients import", "recipients remove",
    "networks remove", "listeners remove", "config unset", "checks reset", "auth unban",
    "users add", "users passwd", "users disable", "users enable", "users remove", "users alias",
    "users unalias", "users mechanism"})


def _command() -> str:
    """The command being run, e.g. "domains list"."""
    try:        # Typer 0.2x carries its own copy of click; older ones use click itself
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context
    ctx, names = get_current_context(silent=True), []
    while ctx is not None and ctx.parent is not None:     # the root's name is the program's
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(reversed(names))


def require_home() -> Path:
    """The store's path; one line and exit 1 when there is no home yet."""
    from mailbox_guard.store.db import DB_NAME
    path = state.home / DB_NAME
    if not path.exists():
        fail(f"no mailbox-guard home at {state.home} (use --home, or start it with `serve`)")
    try:
        ensure_home(state.home)     # it is there: check it is ours (and of this schema version)
    except StoreError as exc:
        fail(str(exc))
    return path


def store() -> PolicyStore:
    command = _command()
    if command in READ_ONLY_COMMANDS or command in EXISTING_ONLY_COMMANDS:
        return PolicyStore(require_home())
    try:
        return PolicyStore(ensure_home(state.home))
    except StoreError as exc:
        fail(str(exc))


def scope_of(domain: str | None, user: str | None) -> str:
    """The scope --domain / --user name ('' for the server), checked against the store."""
    if domain is not None and user is not None:
        raise typer.BadParameter("give --domain or --user, not both", param_hint="--user")
    if domain is not None or user is not None:
        require_home()          # a domain or user of a home that does not exist: nothing to change
    return guarded(lambda: store().scope_of(domain=domain, user=user))


def control():
    from mailbox_guard.control.client import ControlClient
    return ControlClient(state.home)


def engine_running() -> bool:
    from mailbox_guard.control.client import ControlClient, EngineNotRunning
    try:
        ControlClient(state.home, timeout=3).call("hello")
        return True
    except EngineNotRunning:
        return False


def read_store(fn: Callable[[Any], Any]) -> Any:
    """A read of the store (works whether the engine runs or not)."""
    from mailbox_guard.store.db import connect
    path = require_home()

    def run():
        conn = connect(path, readonly=True)
        try:
            return fn(conn)
        finally:
            conn.close()
    return guarded(run)


def transaction(fn: Callable[[Any], Any]) -> Any:
    """One transaction on the store (for queue actions while the engine is stopped:
    they need a home that exists); its errors are the caller's to report."""
    import sqlite3
    from mailbox_guard.store.db import connect
    path = require_home()
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result
    except sqlite3.OperationalError as exc:
        raise StoreError(f"store {path}: {exc}") from None
    finally:
        conn.close()


def write_store(fn: Callable[[Any], Any]) -> Any:
    """`transaction`, with its errors as one line and exit 1."""
    return guarded(lambda: transaction(fn))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def emit(rows: list[dict], as_json: bool, columns: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        return
    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in rows:
        typer.echo("  ".join(cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)).rstrip())


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def progress(items: Iterable, label: str, length: int | None = None):
    """A progress bar on a terminal; silent when piped."""
    if sys.stderr.isatty():
        return typer.progressbar(items, label=label, length=length, file=sys.stderr)
    import contextlib
    return contextlib.nullcontext(items)


YES = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")


def asks(yes: bool) -> bool:
    """Whether `confirm` would ask: a person at a terminal, and no --yes."""
    return not yes and sys.stdin.isatty() and sys.stderr.isatty()


def confirm(question: str, yes: bool) -> None:
    """Ask before a destructive change when a person is at a terminal (the prompt
    goes to stderr, the answer comes from stdin); scripts and --yes go ahead."""
    if not asks(yes):
        return
    if not typer.confirm(question, err=True):
        fail("nothing changed")
