"""The ``mailbox-guard`` command line: one Typer sub-app per noun, verbs inside.

Policy edits go straight to the store (they work while the engine is stopped; a
running engine picks them up within a second). Every listing takes ``--json``.
Exit codes: 0 ok, 1 the operation failed, 2 usage error. Errors are one line on
stderr, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from mailbox_guard.config import SETTINGS, SettingError, parse_hostport
from mailbox_guard.store import DB_NAME, PolicyStore, StoreError, ensure_home

HOME_ENV = "MAILBOX_GUARD_HOME"
DEFAULT_HOME = "./mailbox-guard-data"

app = typer.Typer(
    help="mailbox_guard: a mail security gateway.\n\nExample: mailbox-guard serve",
    no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False)


class State:
    home: Path = Path(DEFAULT_HOME)


state = State()


@app.callback()
def main_options(
    home: Optional[Path] = typer.Option(
        None, "--home", envvar=HOME_ENV, metavar="DIR",
        help=f"State folder (store, keys, control socket). Default {DEFAULT_HOME}; "
             "the service uses /var/lib/mailbox-guard."),
) -> None:
    """mailbox_guard: a mail security gateway."""
    state.home = home or Path(DEFAULT_HOME)


def fail(message: str) -> None:
    typer.echo(f"mailbox-guard: {message}", err=True)
    raise typer.Exit(1)


def store() -> PolicyStore:
    try:
        return PolicyStore(ensure_home(state.home))
    except StoreError as exc:
        fail(str(exc))
        raise  # unreachable


def guarded(fn: Callable[[], Any]) -> Any:
    """Run an operation; turn the errors an admin can cause into one line, exit 1."""
    try:
        return fn()
    except (SettingError, StoreError) as exc:
        fail(str(exc))


def emit(rows: list[dict], as_json: bool, columns: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        return
    widths = [max(len(c), *(len(str(r.get(c) if r.get(c) is not None else "-")) for r in rows))
              for c in columns]
    typer.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in rows:
        typer.echo("  ".join(str(r.get(c) if r.get(c) is not None else "-").ljust(w)
                             for c, w in zip(columns, widths)).rstrip())


JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


# ---------------------------------------------------------------------- serve
def _listener_args(values: List[str], kind: str) -> list:
    from mailbox_guard.engine import ListenerSpec
    out = []
    for i, text in enumerate(values):
        try:
            host, port = parse_hostport(text)
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
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    listeners = _listener_args(inbound, "inbound") + _listener_args(submission, "submission")
    code = run_engine(state.home, listeners or None)
    raise typer.Exit(code)


# ---------------------------------------------------------------------- domains
domains_app = typer.Typer(help="Domains we guard (accept mail for) and their next hops.\n\n"
                               "Example: mailbox-guard domains add example.org --next-hop 10.0.0.5:25",
                          no_args_is_help=True)
app.add_typer(domains_app, name="domains")


@domains_app.command("add")
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


@domains_app.command("list")
def domains_list(as_json: bool = JSON) -> None:
    """List guarded domains.

    Example: mailbox-guard domains list --json
    """
    rows = [{"name": d.name, "next_hop": d.next_hop} for d in guarded(lambda: store().domains())]
    emit(rows, as_json, ["name", "next_hop"])


@domains_app.command("remove")
def domains_remove(name: str = typer.Argument(..., help="Domain name.")) -> None:
    """Stop guarding a domain (its recipient list goes with it).

    Example: mailbox-guard domains remove example.org
    """
    if not guarded(lambda: store().remove_domain(name)):
        fail(f"{name} is not a guarded domain")
    typer.echo(f"no longer guarding {name}")


# ---------------------------------------------------------------------- recipients
recipients_app = typer.Typer(help="Recipient lists: once a domain has one, unknown users get 550.\n\n"
                                  "Example: mailbox-guard recipients add alice@example.org",
                             no_args_is_help=True)
app.add_typer(recipients_app, name="recipients")


@recipients_app.command("add")
def recipients_add(address: str = typer.Argument(..., help="Full address of a local user.")) -> None:
    """Add a known recipient of a guarded domain.

    Example: mailbox-guard recipients add alice@example.org
    """
    addr = guarded(lambda: store().add_recipient(address))
    typer.echo(f"added {addr}")


@recipients_app.command("list")
def recipients_list(domain: Optional[str] = typer.Option(None, "--domain", help="Only this domain."),
                    as_json: bool = JSON) -> None:
    """List known recipients.

    Example: mailbox-guard recipients list --domain example.org --json
    """
    rows = [{"address": a} for a in guarded(lambda: store().recipients(domain))]
    emit(rows, as_json, ["address"])


@recipients_app.command("remove")
def recipients_remove(address: str = typer.Argument(..., help="Full address.")) -> None:
    """Remove a known recipient.

    Example: mailbox-guard recipients remove alice@example.org
    """
    if not guarded(lambda: store().remove_recipient(address)):
        fail(f"{address} is not in a recipient list")
    typer.echo(f"removed {address}")


# ---------------------------------------------------------------------- networks
networks_app = typer.Typer(help="Trusted networks: clients there may relay outward without AUTH.\n\n"
                                "Example: mailbox-guard networks add 10.0.0.0/8",
                           no_args_is_help=True)
app.add_typer(networks_app, name="networks")


@networks_app.command("add")
def networks_add(cidr: str = typer.Argument(..., help="Network, e.g. 10.0.0.0/8 or 2001:db8::/32."),
                 comment: str = typer.Option("", "--comment", help="Why it is trusted.")) -> None:
    """Trust a network to relay.

    Example: mailbox-guard networks add 192.0.2.0/24 --comment "office"
    """
    net = guarded(lambda: store().add_network(cidr, comment))
    typer.echo(f"trusting {net}")


@networks_app.command("list")
def networks_list(as_json: bool = JSON) -> None:
    """List trusted networks (none by default).

    Example: mailbox-guard networks list --json
    """
    emit(guarded(lambda: store().networks()), as_json, ["cidr", "comment"])


@networks_app.command("remove")
def networks_remove(cidr: str = typer.Argument(..., help="Network as listed.")) -> None:
    """Stop trusting a network.

    Example: mailbox-guard networks remove 192.0.2.0/24
    """
    if not guarded(lambda: store().remove_network(cidr)):
        fail(f"{cidr} is not a trusted network")
    typer.echo(f"no longer trusting {cidr}")


# ---------------------------------------------------------------------- listeners
listeners_app = typer.Typer(help="SMTP listeners kept in the store (serve flags override them).\n\n"
                                 "Example: mailbox-guard listeners add mx inbound 0.0.0.0:25",
                            no_args_is_help=True)
app.add_typer(listeners_app, name="listeners")


@listeners_app.command("add")
def listeners_add(name: str = typer.Argument(..., help="A short name, e.g. mx."),
                  kind: str = typer.Argument(..., help="inbound or submission."),
                  address: str = typer.Argument(..., help="HOST:PORT to listen on.")) -> None:
    """Add or change a listener (takes effect at the next start).

    Example: mailbox-guard listeners add submission submission 0.0.0.0:587
    """
    row = guarded(lambda: store().add_listener(name, kind, address))
    typer.echo(f"listener {row['name']}: {row['kind']} on {row['host']}:{row['port']}")


@listeners_app.command("list")
def listeners_list(as_json: bool = JSON) -> None:
    """List listeners (the embedded defaults when none are set).

    Example: mailbox-guard listeners list --json
    """
    from mailbox_guard.engine import DEFAULT_LISTENERS
    rows = guarded(lambda: store().listeners())
    if not rows:
        rows = [{"name": n, "kind": k, "host": h, "port": p, "default": True}
                for n, k, h, p in DEFAULT_LISTENERS]
    emit(rows, as_json, ["name", "kind", "host", "port"])


@listeners_app.command("remove")
def listeners_remove(name: str = typer.Argument(..., help="Listener name.")) -> None:
    """Remove a listener.

    Example: mailbox-guard listeners remove submission
    """
    if not guarded(lambda: store().remove_listener(name)):
        fail(f"no listener named {name}")
    typer.echo(f"removed listener {name}")


# ---------------------------------------------------------------------- config
config_app = typer.Typer(help="Settings: limits, timeouts, retry schedule, DNS.\n\n"
                              "Example: mailbox-guard config set queue.retry_schedule 1m,5m,15m,1h,4h",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("list")
def config_list(as_json: bool = JSON) -> None:
    """Show every setting with its value, default and meaning.

    Example: mailbox-guard config list
    """
    current = guarded(lambda: store().settings())
    rows = [{"key": k, "value": current.get(k, s.default), "default": s.default, "help": s.help}
            for k, s in SETTINGS.items()]
    emit(rows, as_json, ["key", "value", "default"])


@config_app.command("get")
def config_get(key: str = typer.Argument(..., help="Setting name.")) -> None:
    """Print one setting's value.

    Example: mailbox-guard config get smtp.max_message_size
    """
    if key not in SETTINGS:
        fail(f"unknown setting {key!r}; `mailbox-guard config list` shows them")
    typer.echo(guarded(lambda: store().settings()).get(key, SETTINGS[key].default))


@config_app.command("set")
def config_set(key: str = typer.Argument(..., help="Setting name."),
               value: str = typer.Argument(..., help="New value.")) -> None:
    """Change a setting (validated; a running engine picks it up within a second).

    Example: mailbox-guard config set smtp.max_message_size 20480000
    """
    guarded(lambda: store().set_setting(key, value))
    typer.echo(f"{key} = {value}")


@config_app.command("unset")
def config_unset(key: str = typer.Argument(..., help="Setting name.")) -> None:
    """Return a setting to its default.

    Example: mailbox-guard config unset smtp.timeout
    """
    guarded(lambda: store().unset_setting(key))
    typer.echo(f"{key} = {SETTINGS[key].default} (default)")


def main() -> None:
    app(prog_name="mailbox-guard")


if __name__ == "__main__":   # pragma: no cover
    main()
