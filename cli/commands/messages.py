"""`mailbox-guard messages`: why a message was accepted, held, rejected or bounced."""

from __future__ import annotations

import typer

from cli.common import JSON, emit_json, fail, read_store
from cli.commands.queue import _print_trace, _when
from mailbox_guard import queue as q

app = typer.Typer(help="Questions about messages.\n\n"
                  "Example: mailbox-guard messages why '<abc@example.org>'",
                  no_args_is_help=True)


@app.command("why")
def messages_why(message: str = typer.Argument(..., help="Queue id or Message-ID."), as_json: bool = JSON) -> None:
    """The verdict trace of a message: every phase, every check, every result, the outcome.

    Example: mailbox-guard messages why 1A230E0D1D10048A2195
    """
    detail = read_store(lambda c: q.find_detail(c, message))
    if detail is None:
        fail(f"no message {message} is known (finished messages are kept for queue.keep_done)")
    outcome = {"delivered": "delivered", "bounced": "returned to the sender", "hold": "on hold",
               "deferred": "waiting for another delivery attempt", "incoming": "queued",
               "active": "being delivered"}[detail["state"]]
    if as_json:
        emit_json({"id": detail["id"], "message_id": detail["message_id"], "state": detail["state"],
                   "outcome": outcome, "trace": detail["trace"], "deliveries": detail["deliveries"]})
        return
    typer.echo(f"{detail['id']} {detail['message_id'] or ''}".rstrip())
    typer.echo(f"from <{detail['mail_from']}> at {_when(detail['received_at'])}: {outcome}")
    _print_trace(detail["trace"])
    for d in detail["deliveries"]:
        typer.echo(f"  delivery {_when(d['at'])} {d['recipient']}: {d['outcome']} ({d['reply']})")
