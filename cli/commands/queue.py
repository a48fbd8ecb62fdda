"""`mailbox-guard queue`: look at the queue and act on it. Actions go to the running
engine through its control socket; while it is stopped they apply to the store."""

from __future__ import annotations

import time
from datetime import datetime
from typing import List, Optional

import typer

from cli.common import (JSON, YES, asks, confirm, control, emit, emit_json, engine_running, fail, guarded,
                        progress, read_store, transaction, write_store)
from mailbox_guard.mail.dsn import human_duration
from mailbox_guard.queue import ops as q
from mailbox_guard.queue import states as st

app = typer.Typer(help="The mail queue: list, show, summary, retry, hold, release, delete, flush, purge.\n\n"
                  "Quarantined mail is in the queue too (state quarantine, with its reason): "
                  "`queue release` delivers it, `queue delete` drops it.\n\n"
                  "Example: mailbox-guard queue list --state quarantine",
                  no_args_is_help=True)

STATES = st.ALL


def _when(ts) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


@app.command("list")
def queue_list(state: List[str] = typer.Option([], "--state", help=f"Only these states: {', '.join(STATES)}."),
               search: str = typer.Option("", "--search", help="Queue id, sender, recipient or Message-ID contains this."),
               limit: int = typer.Option(100, "--limit", min=1, max=100000, help="At most this many, newest first."),
               as_json: bool = JSON) -> None:
    """List queued messages (newest first); quarantined ones with the reason.

    Example: mailbox-guard queue list --state quarantine --json
    """
    states = _states(state)
    rows = read_store(lambda c: q.list_messages(c, states=states or None, search=search, limit=limit))
    if not as_json:
        for r in rows:
            r["received"] = _when(r["received_at"])
    columns = ["id", "state", "received", "mail_from", "recipients", "size", "attempts", "last_error"]
    if any(r["state"] == st.QUARANTINE for r in rows):
        columns.append("reason")
    emit(rows, as_json, columns)


@app.command("show")
def queue_show(message: str = typer.Argument(..., help="Queue id or Message-ID."),
               raw: bool = typer.Option(False, "--raw", help="Print the message as stored (like postcat -q)."),
               body: bool = typer.Option(False, "--body", help="Print only its body (after the headers)."),
               as_json: bool = JSON) -> None:
    """Show one message: envelope, recipients, headers, deliveries and verdict trace.

    With --raw the message itself, as stored (our Received: header first); with --body
    its body only. Delivered and bounced messages keep their record, not their content.

    Example: mailbox-guard queue show 1A230E0D1D10048A2195 --raw | less
    """
    if raw or body:
        if as_json:
            raise typer.BadParameter("--raw and --body print the message itself, not JSON", param_hint="--json")
        found, data = read_store(lambda c: (lambda i: (i, i and q.raw_message(c, i)))(q.find_message(c, message)))
        if found is None:
            fail(f"no message {message} in the queue")
        if data is None:
            fail(f"{found}: the content is no longer kept (delivered or bounced)")
        if body:
            data = _body_of(data)
        out = typer.get_binary_stream("stdout")
        out.write(data)
        out.flush()
        return
    detail = read_store(lambda c: q.find_detail(c, message))
    if detail is None:
        fail(f"no message {message} in the queue")
    if as_json:
        emit_json(detail)
        return
    typer.echo(f"queue id:    {detail['id']}  ({detail['state']}: {st.WORDS.get(detail['state'], '?')})")
    if detail.get("reason"):
        typer.echo(f"quarantined: {detail['reason']}"
                   + ("" if detail["state"] == st.QUARANTINE else "  (released since)"))
    typer.echo(f"message-id:  {detail['message_id'] or '-'}")
    typer.echo(f"from:        <{detail['mail_from']}>  client {detail['client_ip'] or '-'} via {detail['listener'] or '-'}")
    typer.echo(f"session:     {_session(detail)}")
    typer.echo(f"received:    {_when(detail['received_at'])}  size {detail['size']}  attempts {detail['attempts']}")
    if detail["state"] in st.DUE:
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


def _session(detail: dict) -> str:
    """The facts of the session a message came in (what a replay needs)."""
    return ", ".join((f"HELO {detail.get('helo') or '-'}",
                      f"TLS {detail['tls']}" if detail.get("tls") else "no TLS",
                      f"authenticated as {detail['auth_user']}" if detail.get("auth_user") else "not authenticated"))


def _body_of(data: bytes) -> bytes:
    for end in (b"\r\n\r\n", b"\n\n"):
        at = data.find(end)
        if at >= 0:
            return data[at + len(end):]
    return b""


@app.command("summary")
def queue_summary(state: List[str] = typer.Option([], "--state",
                                                  help="Only these states (default: deferred); "
                                                       "e.g. --state quarantine."),
                  as_json: bool = JSON) -> None:
    """Per destination domain (like qshape): messages, recipients, age of the oldest.

    Example: mailbox-guard queue summary --state deferred --state quarantine --json
    """
    states = _states(state) or ["deferred"]
    rows = read_store(lambda c: q.summary(c, states, time.time()))
    if not as_json:
        for r in rows:
            r["oldest"] = human_duration(r["oldest_age_seconds"])
        if not rows:
            typer.echo(f"no {' or '.join(states)} mail", err=True)
    emit(rows, as_json, ["domain", "messages", "recipients", "oldest"])


def _states(values: List[str], hint: str = "--state") -> list[str]:
    bad = [s for s in values if s not in STATES]
    if bad:
        raise typer.BadParameter(f"unknown state {bad[0]!r} ({', '.join(STATES)})", param_hint=hint)
    return list(values)


def _print_trace(trace: list[dict]) -> None:
    typer.echo("verdict trace:")
    for v in trace:
        line = f"  {v['phase']:<8} {v['check']:<16} {v['symbol']:<24} {v['action']:<8} {v['subject']}"
        typer.echo(line.rstrip())
        if v.get("reply"):
            typer.echo(f"           reply: {v['reply']}")
        if v.get("detail"):
            typer.echo(f"           detail: {v['detail']}")


# action -> (control method, the same on the store, what the operator is told)
ACTIONS = {
    "retry": ("queue.retry", lambda c, i: q.retry_now(c, i, time.time()), "will be retried now"),
    "hold": ("queue.hold", q.hold, "on hold"),
    "release": ("queue.release", lambda c, i: q.release(c, i, time.time()), "released"),
    "delete": ("queue.delete", q.delete, "deleted"),
}
IDS = typer.Argument(None, metavar="[ID]...", help="Queue id(s).", show_default=False)
ALL = typer.Option(False, "--all", help="Every message where the action applies (narrow with --state, --to-domain).")
STATE = typer.Option([], "--state", help="With --all: only messages in this state (repeatable).")
TO_DOMAIN = typer.Option(None, "--to-domain", metavar="DOMAIN",
                         help="With --all: only messages with a pending recipient in this domain.")


def _one(running: bool, action: str, message: str) -> Optional[str]:
    """Apply an action to one message; the reason when it cannot apply."""
    from mailbox_guard.control.client import ControlCallError
    method, offline, _ = ACTIONS[action]
    try:
        if running:
            control().call(method, id=message)
        else:
            transaction(lambda c: offline(c, message))
    except q.QueueActionError as exc:
        return str(exc)
    except ControlCallError as exc:
        return exc.message
    return None


def _act(action: str, messages: Optional[List[str]], all_: bool, state: List[str], to_domain: Optional[str],
         yes: bool = True) -> None:
    """Every named message (each failure reported, exit 1 if any), or with --all every
    message that matches, in one transaction."""
    messages = [m.upper() for m in messages or []]
    if all_ == bool(messages):
        raise typer.BadParameter("queue id(s) and --all do not go together" if all_ else
                                 "give queue id(s) or --all", param_hint="ID")
    if (state or to_domain) and not all_:
        raise typer.BadParameter("--state and --to-domain go with --all", param_hint="--all")
    states = _states(state) or None
    _, _, done = ACTIONS[action]
    running = engine_running()
    if all_:
        if asks(yes):
            found = read_store(lambda c: q.states_of(c, q.bulk_ids(c, action, states, to_domain)))
            if found:
                _ask(action, found, len(found), yes)
        if running:
            ids = guarded(lambda: control().call("queue.bulk", action=action, states=states,
                                                 to_domain=to_domain))["ids"]
        else:
            ids = write_store(lambda c: q.bulk(c, action, now=time.time(), states=states, to_domain=to_domain))
        typer.echo(f"{len(ids)} message(s) {done}")
        return
    if asks(yes):
        _ask(action, read_store(lambda c: q.states_of(c, messages)), len(messages), yes)
    failed = 0
    for m in messages:
        error = guarded(lambda m=m: _one(running, action, m))
        if error:
            failed += 1
            typer.echo(f"mailbox-guard: {error}", err=True)
        else:
            typer.echo(f"{m}: {done}")
    if failed:
        raise typer.Exit(1)


def _ask(action: str, found: dict[str, str], n: int, yes: bool) -> None:
    """Ask before what cannot be undone: a delete (no bounce is sent), a release from
    quarantine (the policy kept that mail back)."""
    if action == "delete":
        confirm(f"delete {n} message(s) without a bounce?", yes)
    elif action == "release":
        kept = sum(1 for s in found.values() if s == st.QUARANTINE)
        if kept:
            confirm(f"release {kept} quarantined message(s) for delivery? The policy kept them back.", yes)


@app.command("retry")
def queue_retry(messages: Optional[List[str]] = IDS, all_: bool = ALL, state: List[str] = STATE,
                to_domain: Optional[str] = TO_DOMAIN) -> None:
    """Try to deliver queued or deferred messages now (the retry schedule is not used up).

    Example: mailbox-guard queue retry --all --to-domain example.org
    """
    _act("retry", messages, all_, state, to_domain)


@app.command("hold")
def queue_hold(messages: Optional[List[str]] = IDS, all_: bool = ALL, state: List[str] = STATE,
               to_domain: Optional[str] = TO_DOMAIN) -> None:
    """Park messages: they are not delivered until released.

    Example: mailbox-guard queue hold 1A230E0D1D10048A2195
    """
    _act("hold", messages, all_, state, to_domain)


@app.command("release")
def queue_release(messages: Optional[List[str]] = IDS, all_: bool = ALL, state: List[str] = STATE,
                  to_domain: Optional[str] = TO_DOMAIN, yes: bool = YES) -> None:
    """Release held or quarantined messages for delivery (due at once).

    A quarantined message is delivered although the policy kept it back: on a
    terminal this asks first (--yes skips); the release is written into its verdict
    trace. `--all` takes held mail only unless `--state quarantine` is given.

    Example: mailbox-guard queue release --all --state quarantine --to-domain example.org --yes
    """
    _act("release", messages, all_, state, to_domain, yes)


@app.command("delete")
def queue_delete(messages: Optional[List[str]] = IDS, all_: bool = ALL, state: List[str] = STATE,
                 to_domain: Optional[str] = TO_DOMAIN, yes: bool = YES) -> None:
    """Delete messages from the queue (no bounce is sent); asks first unless --yes.

    Works on queued, deferred, held and quarantined mail (`--all`: all of those).
    Each unknown id is reported; the others are deleted all the same (exit 1).

    Example: mailbox-guard queue delete --all --state deferred --to-domain example.org --yes
    """
    _act("delete", messages, all_, state, to_domain, yes)


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
        f"SELECT id FROM messages WHERE state IN ({st.sql_list(st.DONE)}) AND done_at < ?", (before,))])
    removed = 0
    chunks = [ids[i:i + 500] for i in range(0, len(ids), 500)]
    with progress(chunks, "purging", length=len(chunks)) as items:
        for chunk in items:
            removed += write_store(lambda c, chunk=chunk: sum(1 for i in chunk if q.delete(c, i)))
    if as_json:
        emit_json({"purged": removed})
    else:
        typer.echo(f"purged {removed} finished message(s)")
