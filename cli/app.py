"""The ``mailbox-guard`` command line: one Typer sub-app per noun (``cli/commands/``),
verbs inside, plus ``serve``, ``status`` and ``tui``.

Policy edits go straight to the store (they work while the engine is stopped; a
running engine picks them up within a second); actions on the live engine go through
its control socket. Every listing takes ``--json``. Exit codes: 0 ok, 1 the operation
failed, 2 usage error. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cli.commands import (auth, checks, config, connections, domains, listeners, messages, networks, policy,
                          queue, recipients, rejects, tls, users)
from cli.common import DEFAULT_HOME, HOME_ENV, JSON, control, emit_json, guarded, read_store, state
from mailbox_guard.config import SettingError, parse_endpoint, parse_hostport

app = typer.Typer(
    help="mailbox_guard: a mail security gateway.\n\nExample: mailbox-guard serve",
    no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False)

for module, name in ((domains, "domains"), (recipients, "recipients"), (networks, "networks"),
                     (listeners, "listeners"), (config, "config"), (queue, "queue"),
                     (connections, "connections"), (messages, "messages"), (tls, "tls"),
                     (users, "users"), (auth, "auth"), (policy, "policy"), (checks, "checks")):
    app.add_typer(module.app, name=name)
app.command("rejects")(rejects.rejects)


def _version(value: bool) -> None:
    if value:
        from mailbox_guard import __version__
        typer.echo(f"mailbox-guard {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    home: Optional[Path] = typer.Option(
        None, "--home", envvar=HOME_ENV, metavar="DIR",
        help=f"State folder (store, keys, control socket). Default {DEFAULT_HOME}; "
             "the service uses /var/lib/mailbox-guard."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """mailbox_guard: a mail security gateway."""
    state.home = home or Path(DEFAULT_HOME)


def _listener_args(values: List[str], kind: str) -> list:
    from mailbox_guard.engine import ListenerSpec
    out = []
    for i, text in enumerate(values):
        try:
            host, port = parse_endpoint(text)
        except SettingError as exc:
            raise typer.BadParameter(str(exc), param_hint=f"--{kind}") from None
        out.append(ListenerSpec(kind if i == 0 else f"{kind}{i + 1}", kind, host, port))
    return out


@app.command()
def serve(
    inbound: List[str] = typer.Option([], "--inbound", metavar="HOST:PORT",
                                      help="Inbound (MX) listener; repeatable. Overrides the store."),
    submission: List[str] = typer.Option([], "--submission", metavar="HOST:PORT",
                                         help="Submission listener; repeatable. Overrides the store."),
    smtps: List[str] = typer.Option([], "--smtps", metavar="HOST:PORT",
                                    help="Implicit-TLS submission listener; repeatable. Overrides the store."),
    metrics: Optional[str] = typer.Option(None, "--metrics", metavar="HOST:PORT",
                                          help="Serve Prometheus metrics here (off by default)."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
) -> None:
    """Run the gateway in the foreground until SIGTERM (drain) or SIGINT.

    With no configuration it listens for inbound mail on 127.0.0.1:2525 and for
    submission on 127.0.0.1:2587. SIGHUP reloads the policy.

    Example: mailbox-guard --home /var/lib/mailbox-guard serve --inbound 0.0.0.0:25
    """
    from mailbox_guard.engine import run_engine
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    metrics_at = None
    if metrics:
        try:
            metrics_at = parse_hostport(metrics)
        except SettingError as exc:
            raise typer.BadParameter(str(exc), param_hint="--metrics") from None
    # Log lines are written by a thread of their own: a write (and its flush) per
    # line would otherwise be paid on the event loop, for every message.
    from mailbox_guard.logs import LineWriter, lean_records
    lean_records()
    writer = LineWriter(sys.stderr)
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(writer)
    listeners = (_listener_args(inbound, "inbound") + _listener_args(submission, "submission")
                 + _listener_args(smtps, "smtps"))
    writer.start()
    try:
        code = run_engine(state.home, listeners or None, metrics=metrics_at)
    finally:
        writer.stop()          # every line queued so far is written before exit
    raise typer.Exit(code)


@app.command()
def status(as_json: bool = JSON) -> None:
    """Is the engine running, where does it listen, what is in the queue.

    Exit code 0 when the engine runs, 1 when it does not (the queue is then read
    from the store).

    Example: mailbox-guard status --json
    """
    from mailbox_guard.queue import ops as q
    from mailbox_guard.control.client import EngineNotRunning
    from mailbox_guard.store.db import open_relay_networks
    try:
        info = control().call("status")
        info["running"] = True
    except EngineNotRunning:
        info = {"running": False, "home": str(state.home), "queue": read_store(q.counts_by_state)}
    except Exception:
        info = guarded(lambda: control().call("status"))
    wide = open_relay_networks(read_store(lambda c: [r[0] for r in c.execute("SELECT cidr FROM networks")]))
    info["warnings"] = [f"trusted network {n} lets much of the Internet relay through this gateway "
                        f"(an open relay): `networks remove {n}`" for n in wide]
    if as_json:
        emit_json(info)
    elif info["running"]:
        typer.echo(f"engine running, pid {info['pid']}, up {info['uptime']:.0f}s, policy version "
                   f"{info['policy_version']}{' (draining)' if info['draining'] else ''}")
        for lst in info["listeners"]:
            typer.echo(f"  {lst['name']:<12} {lst['kind']:<11} {lst['host']}:{lst['port']}")
        typer.echo(f"  connections now: {info['connections']}")
        typer.echo(f"  GSSAPI: {info['gssapi']['reason']}")
    else:
        typer.echo(f"engine not running (home {state.home})")
    if not as_json:
        typer.echo("  queue: " + ", ".join(f"{k} {v}" for k, v in info["queue"].items()))
        for warning in info["warnings"]:
            typer.echo(f"  WARNING: {warning}")
    if not info["running"]:
        raise typer.Exit(1)


@app.command()
def tui() -> None:
    """The live dashboard: connections, queue, quarantine, events (keyboard only; ? for help).

    Example: mailbox-guard --home /var/lib/mailbox-guard tui
    """
    from tui.app import run
    raise typer.Exit(run(state.home))


def main() -> None:
    os.umask(0o027)      # what the CLI creates in the home folder is the gateway's own
    try:
        app(prog_name="mailbox-guard")
    except Exception as exc:     # a bug: one line for the admin, the details on request
        if os.environ.get("MAILBOX_GUARD_DEBUG"):
            raise
        typer.echo(f"mailbox-guard: internal error: {type(exc).__name__}: {exc} "
                   "(set MAILBOX_GUARD_DEBUG=1 for the details)", err=True)
        sys.exit(1)


if __name__ == "__main__":   # pragma: no cover
    main()
