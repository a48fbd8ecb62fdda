"""`mailbox-guard networks`: trusted networks that may relay without AUTH."""

from __future__ import annotations

import typer

from cli.common import JSON, emit, fail, guarded, store

app = typer.Typer(help="Trusted networks: clients there may relay outward without AUTH.\n\n"
                  "Example: mailbox-guard networks add 10.0.0.0/8",
                  no_args_is_help=True)


@app.command("add")
def networks_add(cidr: str = typer.Argument(..., help="Network, e.g. 10.0.0.0/8 or 2001:db8::/32."),
                 comment: str = typer.Option("", "--comment", help="Why it is trusted."),
                 force: bool = typer.Option(False, "--force",
                                            help="Trust even a public network of /8 (IPv4) or /16 (IPv6) "
                                                 "or wider, such as 0.0.0.0/0: an open relay.")) -> None:
    """Trust a network to relay.

    A public network of prefix /8 or shorter (IPv6: /16 or shorter), such as 0.0.0.0/0
    or ::/0, would let much of the Internet relay through the gateway: it is refused
    unless --force is given. Private, loopback and reserved ranges (10.0.0.0/8, fc00::/7)
    are always accepted.

    Example: mailbox-guard networks add 192.0.2.0/24 --comment "office"
    """
    net = guarded(lambda: store().add_network(cidr, comment, force=force))
    typer.echo(f"trusting {net}")


@app.command("list")
def networks_list(as_json: bool = JSON) -> None:
    """List trusted networks (none by default).

    Example: mailbox-guard networks list --json
    """
    emit(guarded(lambda: store().networks()), as_json, ["cidr", "comment"])


@app.command("remove")
def networks_remove(cidr: str = typer.Argument(..., help="Network as listed.")) -> None:
    """Stop trusting a network.

    Example: mailbox-guard networks remove 192.0.2.0/24
    """
    if not guarded(lambda: store().remove_network(cidr)):
        fail(f"{cidr} is not a trusted network")
    typer.echo(f"no longer trusting {cidr}")
