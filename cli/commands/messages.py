"""`mailbox-guard messages`: why a message was accepted, held, rejected or bounced."""

from __future__ import annotations

import typer

from cli.common import JSON, emit_json, fail, read_store
from cli.commands.queue import _print_trace, _when
from mailbox_guard.queue import ops as q
from mailbox_guard.queue import states as st

app = typer.Typer(help="Questions about messages.\n\n"
                  "Example: mailbox-guard messages why '<abc@example.org>'",
                  no_args_is_help=True)

OUTCOMES = st.WORDS


def _outcome(detail: dict) -> str:
    """The state in words; a quarantined message with its reason."""
    outcome = OUTCOMES.get(detail["state"], detail["state"])
    if detail["state"] == st.QUARANTINE and detail.get("reason"):
        outcome += f" ({detail['reason']})"
    return outcome


@app.command("why")
def messages_why(key: str = typer.Argument(..., metavar="KEY",
                                           help="Queue id, Message-ID, connection id (C...), or a sender "
                                                "or recipient address."),
                 as_json: bool = JSON) -> None:
    """The verdict trace: every phase, every check, every result, the outcome.

    For an address, the most recent message or refused command that names it as
    sender or recipient (and how many matched); for a connection id, its whole session,
    refused transactions included.

    Example: mailbox-guard messages why bob@example.org
    """
    found = read_store(lambda c: q.explain(c, key))
    if found is None:
        fail(f"nothing is known about {key} (finished messages are kept for queue.keep_done)")
    detail = found["detail"]
    if found["kind"] == "message":
        outcome = _outcome(detail)
        if as_json:
            emit_json({"kind": "message", "matched": found["matched"], "reject": found.get("reject"),
                       "id": detail["id"],
                       "message_id": detail["message_id"], "state": detail["state"], "outcome": outcome,
                       "reason": detail.get("reason"),
                       "connection_id": detail["connection_id"], "trace": detail["trace"],
                       "deliveries": detail["deliveries"]})
            return
        reject = found.get("reject")
        _matches(found, f"the refusal at {_when(reject['at'])} in the transaction of message {detail['id']}"
                 if reject else f"message {detail['id']}")
        typer.echo(f"{detail['id']} {detail['message_id'] or ''}".rstrip())
        typer.echo(f"from <{detail['mail_from']}> at {_when(detail['received_at'])}: {outcome}")
        _print_trace(detail["trace"])
        for d in detail["deliveries"]:
            typer.echo(f"  delivery {_when(d['at'])} {d['recipient']}: {d['outcome']} ({d['reply']})")
        return
    if as_json:
        emit_json({"kind": "connection", "matched": found["matched"], "reject": found.get("reject"), **detail})
        return
    reject = found.get("reject")
    _matches(found, f"the refusal at {_when(reject['at'])} on connection {detail['id']}" if reject else "")
    typer.echo(f"connection {detail['id']} from {detail['peer_ip']} (HELO {detail['helo'] or '-'}) "
               f"via {detail['listener']}, {_when(detail['started_at'])} to {_when(detail['ended_at'])}: "
               f"{len(detail['queued'])} message(s) queued, {detail['rejected']} command(s) refused")
    _print_trace(detail["trace"])
    for m in detail["queued"]:
        typer.echo(f"  queued {m['id']} from <{m['mail_from']}>: {OUTCOMES.get(m['state'], m['state'])}")


def _matches(found: dict, shown: str) -> None:
    """For an address: how many things matched and which one follows."""
    if "messages" in found:
        typer.echo(f"{found['matched']} match(es): {found['messages']} message(s), {found['refused']} refused "
                   f"command(s); showing the most recent, {shown}")
