"""`mailbox-guard users`: accounts that may authenticate (AUTH), their aliases and
the password strength policy."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from cli.common import JSON, emit, fail, guarded, require_home, store
from mailbox_guard.auth.users import UserStore

app = typer.Typer(help="Users who may authenticate to send mail, their aliases, the password policy.\n\n"
                  "Example: mailbox-guard users add alice@example.org",
                  no_args_is_help=True)


def users() -> UserStore:
    return UserStore(store())


def read_password(from_stdin: bool, user: str) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt(f"password for {user}", hide_input=True, confirmation_prompt=True, err=True)
    if not password:
        fail("empty password")
    return password


STDIN = typer.Option(False, "--password-stdin", help="Read the password from the first line of standard input.")


@app.command("add")
def users_add(name: str = typer.Argument(..., help="The user's own address (the login)."),
              password_stdin: bool = STDIN) -> None:
    """Add a user (the password must pass the policy; it is stored as an argon2id hash).

    Example: printf '%s\\n' "$PW" | mailbox-guard users add alice@example.org --password-stdin
    """
    us = users()                # no home: said before a password is asked for
    password = read_password(password_stdin, name)
    typer.echo(f"added {guarded(lambda: us.add(name, password))}")


@app.command("passwd")
def users_passwd(name: str = typer.Argument(..., help="The login."), password_stdin: bool = STDIN) -> None:
    """Set a new password (checked against the policy).

    Example: mailbox-guard users passwd alice@example.org
    """
    us = users()
    password = read_password(password_stdin, name)
    typer.echo(f"password of {guarded(lambda: us.passwd(name, password))} changed")


@app.command("disable")
def users_disable(name: str = typer.Argument(..., help="The login.")) -> None:
    """Stop a user from authenticating (keeps the account).

    Example: mailbox-guard users disable alice@example.org
    """
    typer.echo(f"{guarded(lambda: users().set_disabled(name, True))} disabled")


@app.command("enable")
def users_enable(name: str = typer.Argument(..., help="The login.")) -> None:
    """Let a disabled user authenticate again.

    Example: mailbox-guard users enable alice@example.org
    """
    typer.echo(f"{guarded(lambda: users().set_disabled(name, False))} enabled")


@app.command("remove")
def users_remove(name: str = typer.Argument(..., help="The login.")) -> None:
    """Remove a user and its aliases.

    Example: mailbox-guard users remove alice@example.org
    """
    if not guarded(lambda: users().remove(name)):
        fail(f"no user {name}")
    typer.echo(f"removed {name}")


@app.command("list")
def users_list(as_json: bool = JSON) -> None:
    """List users, whether they are disabled, and their aliases.

    Example: mailbox-guard users list --json
    """
    emit(guarded(lambda: users().list()), as_json, ["name", "disabled", "aliases"])


@app.command("alias")
def users_alias(name: str = typer.Argument(..., help="The login."),
                address: str = typer.Argument(..., help="Another address the user may send as.")) -> None:
    """Let a user send as another address too.

    Example: mailbox-guard users alias alice@example.org sales@example.org
    """
    typer.echo(f"{name} may send as {guarded(lambda: users().add_alias(name, address))}")


@app.command("unalias")
def users_unalias(address: str = typer.Argument(..., help="The alias address.")) -> None:
    """Remove an alias.

    Example: mailbox-guard users unalias sales@example.org
    """
    if not guarded(lambda: users().remove_alias(address)):
        fail(f"no alias {address}")
    typer.echo(f"removed alias {address}")


@app.command("policy")
def users_policy(domain: Optional[str] = typer.Option(None, "--domain", help="For this domain (default: server)."),
                 min_length: Optional[int] = typer.Option(None, "--min-length", help="Minimum length."),
                 min_classes: Optional[int] = typer.Option(None, "--min-classes",
                                                           help="Of lower, upper, digits, other (1-4)."),
                 reject_common: Optional[bool] = typer.Option(None, "--reject-common/--allow-common",
                                                              help="Refuse the shipped list of common passwords."),
                 reject_name: Optional[bool] = typer.Option(None, "--reject-name/--allow-name",
                                                            help="Refuse passwords containing the user name."),
                 as_json: bool = JSON) -> None:
    """Show the password policies, or change one (server-wide or for a domain).

    Example: mailbox-guard users policy --domain example.org --min-length 14 --min-classes 3
    """
    if domain is not None or all(v is None for v in (min_length, min_classes, reject_common, reject_name)):
        require_home()          # only showing, or a domain's: a typo in --home must not make a new home
    us = users()
    if domain is not None and not guarded(lambda: us.store.is_guarded(domain)):
        fail(f"{domain} is not a guarded domain")
    if any(v is not None for v in (min_length, min_classes, reject_common, reject_name)):
        current = {p["scope"]: p for p in guarded(lambda: us.policies())}
        base = current.get(domain or "*", current["*"])
        guarded(lambda: us.set_policy(domain or "*",
                                      min_length=min_length if min_length is not None else base["min_length"],
                                      min_classes=min_classes if min_classes is not None else base["min_classes"],
                                      reject_common=bool(base["reject_common"]) if reject_common is None else reject_common,
                                      reject_name=bool(base["reject_name"]) if reject_name is None else reject_name))
    emit(guarded(lambda: us.policies()), as_json, ["scope", "min_length", "min_classes", "reject_common",
                                                    "reject_name"])


@app.command("mechanism")
def users_mechanism(domain: str = typer.Argument(..., help="A guarded domain."),
                    mechanism: str = typer.Argument(..., help="DIGEST-MD5."),
                    state: str = typer.Argument(..., metavar="on|off", help="Switch it on or off.")) -> None:
    """Switch a legacy SASL mechanism on or off for a domain's users.

    It needs a password-equivalent secret, so it is off by default; once on, each user's
    secret is made at their next password set (`users passwd`). Off deletes the secrets.

    Example: mailbox-guard users mechanism example.org DIGEST-MD5 on
    """
    if state not in ("on", "off"):
        raise typer.BadParameter("use on or off", param_hint="STATE")
    guarded(lambda: users().set_mechanism(domain, mechanism, state == "on"))
    typer.echo(f"{mechanism.upper()} {state} for {domain}")
