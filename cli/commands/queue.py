"""`mailbox-guard queue`: look at the queue and act on it. Actions go to the running
engine through its control socket; while it is stopped they apply to the store."""

from __future__ import annotations

import time
from datetime import datetime
from typing import List, Optional

import typer

from cli.common import (JSON, control, emit, emit_json, engine_running, fail, guarded, progress, read_store,
                        write_store)
from mailbox_guard import queue as q

app = typer.Typer(help="The mail queue: list, show, retry, hold, release, delete, flush.\n\n"
                  "Example: mailbox-guard queue list --state deferred",
                  no_args_is_help=True)

STATES = ("incoming", "active", "deferred", "hold", "delivered", "bounced")


def _when(ts) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@app.command("list")
def queue_list(state: List[str] = typer.Option([], "--state", help=f"Only these states: {', '.join(STATES)}."),
               search: str = typer.Option("", "--search", help="Queue id, sender, recipient or Message-ID contains this."),
               limit: int = typer.Option(100, "--limit", min=1, max=100000, help="At most this many, newest first."),
               as_json: bool = JSON) -> None:
    """List queued messages (newest first).

    Example: mailbox-guard queue list --state deferred --search example.org --json
    """
    bad = [s for s in state if s not in STATES]
    if bad:
        raise typer.BadParameter(f"unknown state {bad[0]!r} ({', '.join(STATES)})", param_hint="--state")
    rows = read_store(lambda c: q.list_messages(c, states=list(state) or None, search=search, limit=limit))
    if not as_json:
        for r in rows:
            r["received"] = _when(r["received_at"])
    emit(rows, as_json, ["id", "state", "received", "mail_from", "recipients", "size", "attempts", "last_error"])


@app.command("show")
def queue_show(message: str = typer.Argument(..., help="Queue id or Message-ID."), as_json: bool = JSON) -> None:
    """Show one message: envelope, recipients, headers, deliveries and verdict trace.

    Example: mailbox-guard queue show 1A230E0D1D10048A2195
    """
    detail = read_store(lambda c: q.find_detail(c, message))
    if detail is None:
        fail(f"no message {message} in the queue")
    if as_json:
        emit_json(detail)
        return
    typer.echo(f"queue id:    {detail['id']}  ({detail['state']})")
    typer.echo(f"message-id:  {detail['message_id'] or '-'}")
    typer.echo(f"from:        <{detail['mail_from']}>  client {detail['client_ip'] or '-'} via {detail['listener'] or '-'}")
    typer.echo(f"received:    {_when(detail['received_at'])}  size {detail['size']}  attempts {detail['attempts']}")
    if detail["state"] in ("deferred", "incoming"):
        typer.echo(f"next try:    {_when(detail['next_attempt'])}")
    typer.echo("recipients:")
    for r in detail["recipients"]:
        typer.echo(f"  {r['recipient']}  {r['state']}  {r['last_reply'] or ''}".rstrip())
    if detail["headers"]:
        typer.echo("headers:")
        for line in detail["headers"].splitlines():
            typer.echo(f"  {line}")
    _print_trace(detail["trace"])
    if detail["deliveries"]:
        typer.echo("deliveries:")
        for d in detail["deliveries"]:
            typer.echo(f"  {_when(d['at'])}  {d['recipient']}  {d['outcome']}  {d['remote'] or '-'}  {d['reply'] or ''}")


def _print_trace(trace: list[dict]) -> None:
    typer.echo("verdict trace:")
    for v in trace:
        line = f"  {v['phase']:<8} {v['check']:<16} {v['symbol']:<24} {v['action']:<8} {v['subject']}"
        typer.echo(line.rstrip())
        if v.get("reply"):
            typer.echo(f"           reply: {v['reply']}")
        if v.get("detail"):
            typer.echo(f"           detail: {v['detail']}")


def _act(method: str, offline, message: Optional[str] = None) -> dict:
    if engine_running():
        params = {"id": message} if message is not None else {}
        return guarded(lambda: control().call(method, **params))
    return write_store(offline)


@app.command("retry")
def queue_retry(message: str = typer.Argument(..., help="Queue id.")) -> None:
    """Try to deliver a queued or deferred message now.

    Example: mailbox-guard queue retry 1A230E0D1D10048A2195
    """
    _act("queue.retry", lambda c: q.retry_now(c, message.upper(), time.time()), message)
    typer.echo(f"{message.upper()}: will be retried now")


@app.command("hold")
def queue_hold(message: str = typer.Argument(..., help="Queue id.")) -> None:
    """Park a message: it is not delivered until released.

    Example: mailbox-guard queue hold 1A230E0D1D10048A2195
    """
    _act("queue.hold", lambda c: q.hold(c, message.upper()), message)
    typer.echo(f"{message.upper()}: on hold")


@app.command("release")
def queue_release(message: str = typer.Argument(..., help="Queue id.")) -> None:
    """Release a held message for delivery.

    Example: mailbox-guard queue release 1A230E0D1D10048A2195
    """
    _act("queue.release", lambda c: q.release(c, message.upper(), time.time()), message)
    typer.echo(f"{message.upper()}: released")


@app.command("delete")
def queue_delete(messages: List[str] = typer.Argument(..., help="Queue id(s)."),
                 yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")) -> None:
    """Delete messages from the queue (no bounce is sent).

    Example: mailbox-guard queue delete 1A230E0D1D10048A2195 --yes
    """
    if not yes:
        if not typer.confirm(f"delete {len(messages)} message(s) without a bounce?", err=True):
            fail("nothing deleted")
    for m in messages:
        _act("queue.delete", lambda c, m=m: q.delete(c, m.upper()), m)
        typer.echo(f"{m.upper()}: deleted")


@app.command("flush")
def queue_flush(as_json: bool = JSON) -> None:
    """Try every queued and deferred message now.

    Example: mailbox-guard queue flush
    """
    if engine_running():
        n = guarded(lambda: control().call("queue.flush"))["flushed"]
    else:
        n = write_store(lambda c: q.flush(c, time.time()))
    if as_json:
        emit_json({"flushed": n})
    else:
        typer.echo(f"{n} message(s) will be retried now")


@app.command("purge")
def queue_purge(older_than: str = typer.Option("7d", "--older-than", metavar="DURATION",
                                               help="Finished (delivered or bounced) longer ago than this."),
                as_json: bool = JSON) -> None:
    """Forget finished messages and their verdict traces (shows progress on a terminal).

    Example: mailbox-guard queue purge --older-than 30d
    """
    from mailbox_guard.config import parse_duration
    seconds = guarded(lambda: parse_duration(older_than))
    before = time.time() - seconds
    ids = read_store(lambda c: [r[0] for r in c.execute(
        "SELECT id FROM messages WHERE state IN ('delivered', 'bounced') AND done_at < ?", (before,))])
    removed = 0
    chunks = [ids[i:i + 500] for i in range(0, len(ids), 500)]
    with progress(chunks, "purging", length=len(chunks)) as items:
        for chunk in items:
            removed += write_store(lambda c, chunk=chunk: sum(1 for i in chunk if q.delete(c, i)))
    if as_json:
        emit_json({"purged": removed})
    else:
        typer.echo(f"purged {removed} finished message(s)")
