"""The durable queue: a state machine over SQLite rows.

The states and where each admin action applies are in :mod:`mailbox_guard.queue.states`.
Delivery leases only due mail (``incoming``, ``deferred``); ``hold`` and ``quarantine``
wait for an admin. A lease carries a deadline; leases of a crashed engine are given
back at start-up (one engine per home, enforced by a lock) and by a periodic sweep.

These functions run inside the store's writer (mutations) or readers (queries); they
take a connection and never commit themselves.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import NamedTuple

from mailbox_guard.model import QueuedMessage, Verdict
from mailbox_guard.queue import states as st
from mailbox_guard.queue.states import sql_list

PENDING, DELIVERED, BOUNCED = "pending", "delivered", "bounced"


# Queue ids are not secrets; they must be unique and sort by time. A random
# per-process start and a counter avoid a system call per message.
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_queue_id(now: float | None = None) -> str:
    """Time-ordered and unique: 11 hex digits of milliseconds + 9 of a counter that
    starts at random in each process."""
    ms = int((now if now is not None else time.time()) * 1000)
    return f"{ms:011X}{next(_ID_COUNTER) & 0xFFFFFFFFF:09X}"


# What the session hands to the queue (one message per group of recipients).
NewMessage = QueuedMessage


def verdict_rows(connection_id: str, message_id: str | None, verdicts: list[Verdict]) -> list[tuple]:
    return [(connection_id, message_id, v.seq, v.at, v.phase, v.subject, v.check, v.symbol,
             v.score, v.action, v.reply, v.detail) for v in verdicts]


_ROWS_PER_STATEMENT = 500       # x 16 columns at most: well under SQLite's 32766 variables


def insert_rows(conn: sqlite3.Connection, head: str, rows: list[tuple]) -> None:
    """``INSERT ... VALUES`` with many rows per statement: a statement per row costs
    the writer thread a trip out of SQLite and back into the interpreter (and the
    GIL) each, and every 250 waits for that thread."""
    if not rows:
        return
    marks = "(" + ",".join("?" * len(rows[0])) + ")"
    for i in range(0, len(rows), _ROWS_PER_STATEMENT):
        part = rows[i:i + _ROWS_PER_STATEMENT]
        conn.execute(f"{head} VALUES {','.join([marks] * len(part))}", [v for row in part for v in row])


def update_rows(conn: sqlite3.Connection, head: str, where: str, rows: list[tuple]) -> None:
    """``UPDATE ... FROM (VALUES ...) AS v WHERE ...``: one statement for many rows
    (as :func:`insert_rows`). ``head`` and ``where`` name the values v.column1, ...;
    ``where`` must find each target row by its key."""
    if not rows:
        return
    marks = "(" + ",".join("?" * len(rows[0])) + ")"
    for i in range(0, len(rows), _ROWS_PER_STATEMENT):
        part = rows[i:i + _ROWS_PER_STATEMENT]
        conn.execute(f"{head} FROM (VALUES {','.join([marks] * len(part))}) AS v {where}",
                     [v for row in part for v in row])


_VERDICTS = ("INSERT INTO verdicts (connection_id, message_id, seq, at, phase, subject, check_name, "
             "symbol, score, action, reply, detail)")
_MESSAGES = ("INSERT INTO messages (id, state, mail_from, message_id, size, received_at, next_attempt, "
             "connection_id, listener, client_ip, reason, helo, tls, auth_user, lease_until, attempts)")


def _message_row(m: NewMessage) -> tuple:
    # A message handed to delivery in memory is stored leased: its first attempt is
    # counted, and a crash before it is done gives the lease back (recover_leases).
    leased = m.lease_until is not None and m.state == st.INCOMING
    return (m.id, st.ACTIVE if leased else m.state, m.mail_from, m.message_id, m.size, m.received_at,
            m.received_at, m.connection_id, m.listener, m.client_ip, m.reason, m.helo, m.tls, m.auth_user,
            m.lease_until if leased else None, 1 if leased else 0)


def message_rows(m: NewMessage) -> tuple:
    """A message as the rows it is stored as: what crosses to the writer process
    (plain tuples pickle several times faster than the dataclasses)."""
    return (_message_row(m), (m.id, m.body), [(m.id, r, d, PENDING) for r, d in m.recipients],
            verdict_rows(m.connection_id or "", m.id, m.verdicts))


def insert_messages(conn: sqlite3.Connection, groups: list[list[tuple]]) -> list[list[str]]:
    """Store the messages (:func:`message_rows`) of several DATA commands, one group
    each, with one statement per table (``Writer.run_many``); returns each group's
    queue ids."""
    msgs = [rows for g in groups for rows in g]
    insert_rows(conn, _MESSAGES, [r[0] for r in msgs])
    insert_rows(conn, "INSERT INTO message_bodies (message_id, data)", [r[1] for r in msgs])
    insert_rows(conn, "INSERT OR IGNORE INTO message_recipients (message_id, recipient, domain, state)",
                [x for r in msgs for x in r[2]])
    insert_rows(conn, _VERDICTS, [x for r in msgs for x in r[3]])
    return [[r[0][0] for r in g] for g in groups]


def record_connection(conn: sqlite3.Connection, row: dict, verdicts: list[tuple]) -> None:
    """``verdicts``: the connection's trace as rows (:func:`verdict_rows`)."""
    conn.execute(
        "INSERT INTO connections (id, listener, peer_ip, peer_port, helo, started_at, ended_at, "
        "messages, rejected, tls_version, tls_cipher, auth_user, auth_mechanism) VALUES (:id, :listener, "
        ":peer_ip, :peer_port, :helo, :started_at, :ended_at, :messages, :rejected, :tls_version, "
        ":tls_cipher, :auth_user, :auth_mechanism) ON CONFLICT(id) DO UPDATE SET helo=excluded.helo, "
        "ended_at=excluded.ended_at, messages=excluded.messages, rejected=excluded.rejected, "
        "tls_version=excluded.tls_version, tls_cipher=excluded.tls_cipher, auth_user=excluded.auth_user, "
        "auth_mechanism=excluded.auth_mechanism",
        {"tls_version": None, "tls_cipher": None, "auth_user": None, "auth_mechanism": None, **row})
    insert_rows(conn, _VERDICTS, verdicts)


def recover_leases(conn: sqlite3.Connection, now: float, *, expired_only: bool) -> int:
    """Give leased messages back to the queue (all of them at start-up)."""
    where = f"state = '{st.ACTIVE}'" + (" AND lease_until < ?" if expired_only else "")
    args: tuple = (now, now) if expired_only else (now,)
    return conn.execute(
        f"UPDATE messages SET state = '{st.DEFERRED}', lease_until = NULL, "
        f"next_attempt = min(next_attempt, ?) WHERE {where}", args).rowcount


# An attempt the operator brings forward (retry, flush, release before the message is
# due) must not use up a step of queue.retry_schedule: ``attempts`` picks the next
# delay. Outside a lease, ``lease_until`` has no use; FORCED there marks such an attempt
# (no column of its own, so no migration), and the lease then leaves ``attempts`` alone.
FORCED = 0.0


def lease_due(conn: sqlite3.Connection, now: float, limit: int, lease_seconds: float) -> list[str]:
    ids = [r[0] for r in conn.execute(
        f"SELECT id FROM messages WHERE state IN ({sql_list(st.DUE)}) AND next_attempt <= ? "
        "ORDER BY next_attempt LIMIT ?", (now, limit))]
    if ids:
        conn.executemany(f"UPDATE messages SET state = '{st.ACTIVE}', lease_until = ?, "
                         "attempts = attempts + (lease_until IS NOT ?) WHERE id = ?",
                         [(now + lease_seconds, FORCED, i) for i in ids])
    return ids


def next_due(conn: sqlite3.Connection) -> float | None:
    row = conn.execute(f"SELECT min(next_attempt) FROM messages WHERE state IN ({sql_list(st.DUE)})").fetchone()
    return row[0]


@dataclass
class Leased:
    id: str
    mail_from: str
    received_at: float
    attempts: int
    body: bytes
    recipients: list[tuple[str, str]]        # pending (address, domain)
    fresh: bool = False      # just committed, never tried: these are all its recipients
    wire_ready: bool = False     # CRLF only, no line begins with a dot (known on receipt)


def load_leased(conn: sqlite3.Connection, message_id: str) -> Leased | None:
    row = conn.execute("SELECT m.id, m.mail_from, m.received_at, m.attempts, b.data "
                       "FROM messages m JOIN message_bodies b ON b.message_id = m.id "
                       f"WHERE m.id = ? AND m.state = '{st.ACTIVE}'", (message_id,)).fetchone()
    if row is None:
        return None
    rcpts = [(r[0], r[1]) for r in conn.execute(
        "SELECT recipient, domain FROM message_recipients WHERE message_id = ? AND state = 'pending' "
        "ORDER BY domain, recipient", (message_id,))]
    return Leased(row[0], row[1], row[2], row[3], bytes(row[4]), rcpts)


@dataclass
class RcptOutcome:
    recipient: str
    outcome: str             # delivered | deferred | bounced
    reply: str
    remote: str | None


class Attempt(NamedTuple):
    """The end of one delivery attempt of one message (see :func:`finish_attempts`);
    plain data, as it crosses to the writer process."""
    message_id: str
    outcomes: list[tuple[str, str, str, str | None]]    # (recipient, outcome, reply, remote)
    now: float
    next_attempt: float | None
    last_error: str | None
    dsn: tuple | None = None           # the bounce, as message_rows()
    fresh: bool = False


_RCPT_STATE = {"delivered": DELIVERED, "bounced": BOUNCED}


def finish_attempts(conn: sqlite3.Connection, attempts: list[Attempt]) -> list[str]:
    """Record delivery attempts and move each message to its next state (its new
    state is returned, in order); one statement per table for all of them
    (``Writer.run_many``).

    ``fresh``: the message's first attempt, and ``outcomes`` name every recipient it
    has (its state follows from them, without asking the store). A bounce (if any)
    is queued in the same transaction, so a crash can neither lose it nor send it
    twice.
    """
    rcpt_rows, log_rows = [], []
    for a in attempts:
        for recipient, outcome, reply, remote in a.outcomes:
            reply = reply[:1000]
            rcpt_rows.append((_RCPT_STATE.get(outcome, PENDING), a.now, reply, remote, a.message_id, recipient))
            log_rows.append((a.message_id, recipient, a.now, outcome, remote, reply))
    update_rows(conn, "UPDATE message_recipients SET state = v.column1, attempts = attempts + 1, "
                "last_attempt = v.column2, last_reply = v.column3, remote = v.column4",
                "WHERE message_recipients.message_id = v.column5 AND message_recipients.recipient = v.column6",
                rcpt_rows)
    insert_rows(conn, "INSERT INTO delivery_log (message_id, recipient, at, outcome, remote, reply)", log_rows)
    states, deferred, done = [], [], []
    for a in attempts:
        if a.fresh:
            mine = {_RCPT_STATE.get(o[1], PENDING) for o in a.outcomes}
            pending, bounced = PENDING in mine, BOUNCED in mine
        else:
            counts = dict(conn.execute("SELECT state, count(*) FROM message_recipients "
                                       "WHERE message_id = ? GROUP BY state", (a.message_id,)).fetchall())
            pending, bounced = bool(counts.get(PENDING)), bool(counts.get(BOUNCED))
        if pending:
            states.append(st.DEFERRED)
            deferred.append((a.next_attempt if a.next_attempt is not None else a.now, a.last_error,
                             a.message_id))
        else:
            state = st.BOUNCED if bounced else st.DELIVERED
            states.append(state)
            done.append((state, a.now, a.last_error, a.message_id))
    update_rows(conn, f"UPDATE messages SET state = '{st.DEFERRED}', lease_until = NULL, "
                "next_attempt = v.column1, last_error = v.column2",
                f"WHERE messages.id = v.column3 AND messages.state = '{st.ACTIVE}'", deferred)
    update_rows(conn, "UPDATE messages SET state = v.column1, lease_until = NULL, done_at = v.column2, "
                "last_error = v.column3", f"WHERE messages.id = v.column4 AND messages.state = '{st.ACTIVE}'",
                done)
    # A finished message's body is not needed any more; the record and its verdict
    # trace stay until queue.keep_done has passed.
    for i in range(0, len(done), _ROWS_PER_STATEMENT):
        part = [row[3] for row in done[i:i + _ROWS_PER_STATEMENT]]
        conn.execute(f"DELETE FROM message_bodies WHERE message_id IN ({','.join('?' * len(part))})", part)
    bounces = [a.dsn for a in attempts if a.dsn is not None
               # (a retried attempt must not queue its bounce twice)
               and conn.execute("SELECT 1 FROM messages WHERE id = ?", (a.dsn[0][0],)).fetchone() is None]
    if bounces:
        insert_messages(conn, [bounces])
    return states


def purge_done(conn: sqlite3.Connection, before: float) -> int:
    ids = [r[0] for r in conn.execute(
        f"SELECT id FROM messages WHERE state IN ({sql_list(st.DONE)}) AND done_at < ? LIMIT 5000",
        (before,))]
    for i in ids:
        conn.execute("DELETE FROM verdicts WHERE message_id = ?", (i,))
        conn.execute("DELETE FROM delivery_log WHERE message_id = ?", (i,))
        conn.execute("DELETE FROM messages WHERE id = ?", (i,))
    conn.execute("DELETE FROM connections WHERE ended_at < ? AND id NOT IN "
                 "(SELECT connection_id FROM messages WHERE connection_id IS NOT NULL)", (before,))
    conn.execute("DELETE FROM verdicts WHERE message_id IS NULL AND at < ?", (before,))
    return len(ids)


# ---------------------------------------------------------------------- admin actions
class QueueActionError(Exception):
    """An admin action that cannot apply (unknown id, wrong state); one clear line."""


# Where each action applies (`--all` without --state: ``ACTIONS[a].bulk``).
ACTIONS = st.ACTIONS
BULK_STATES = st.BULK_STATES


def _state_of(conn: sqlite3.Connection, message_id: str, action: str) -> str:
    row = conn.execute("SELECT state FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        raise QueueActionError(f"no message {message_id} in the queue")
    state = row[0]
    if state not in ACTIONS[action].states:
        raise QueueActionError(f"{message_id} is {st.WORDS.get(state, state)}; {ACTIONS[action].what}")
    return state


def retry_now(conn: sqlite3.Connection, message_id: str, now: float) -> str:
    state = _state_of(conn, message_id, "retry")
    conn.execute("UPDATE messages SET next_attempt = ?, lease_until = CASE WHEN next_attempt > ? "
                 "THEN ? ELSE lease_until END WHERE id = ?", (now, now, FORCED, message_id))
    return state


def flush(conn: sqlite3.Connection, now: float) -> int:
    return conn.execute(f"UPDATE messages SET next_attempt = ?, lease_until = ? "
                        f"WHERE state IN ({sql_list(st.DUE)}) AND next_attempt > ?",
                        (now, FORCED, now)).rowcount


def hold(conn: sqlite3.Connection, message_id: str) -> str:
    row = conn.execute("SELECT state FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is not None and row[0] == st.HOLD:
        return st.HOLD
    state = _state_of(conn, message_id, "hold")
    conn.execute(f"UPDATE messages SET state = '{st.HOLD}' WHERE id = ?", (message_id,))
    return state


def release(conn: sqlite3.Connection, message_id: str, now: float) -> str:
    """Give a held or quarantined message to delivery, due now. Releasing from
    quarantine overrides the policy's decision: it is written into the message's
    verdict trace (the quarantine reason stays on the message)."""
    state = _state_of(conn, message_id, "release")
    conn.execute(f"UPDATE messages SET state = '{st.DEFERRED}', next_attempt = ?, lease_until = CASE "
                 "WHEN next_attempt > ? THEN ? ELSE lease_until END WHERE id = ?",
                 (now, now, FORCED, message_id))
    if state == st.QUARANTINE:
        conn.execute(
            "INSERT INTO verdicts (connection_id, message_id, seq, at, phase, subject, check_name, symbol, "
            "score, action, reply, detail) SELECT coalesce(m.connection_id, ''), m.id, "
            "coalesce((SELECT max(seq) FROM verdicts WHERE message_id = m.id OR connection_id = m.connection_id), 0) "
            "+ 1, ?, 'queue', '', "
            "'admin', 'RELEASED_FROM_QUARANTINE', 0, 'accept', NULL, "
            "'released for delivery by an admin; quarantined for: ' || coalesce(m.reason, '-') "
            "FROM messages m WHERE m.id = ?", (now, message_id))
    return state


def delete(conn: sqlite3.Connection, message_id: str) -> str:
    state = _state_of(conn, message_id, "delete")
    conn.execute("DELETE FROM message_bodies WHERE message_id = ?", (message_id,))
    conn.execute("DELETE FROM message_recipients WHERE message_id = ?", (message_id,))
    conn.execute("DELETE FROM delivery_log WHERE message_id = ?", (message_id,))
    conn.execute("DELETE FROM verdicts WHERE message_id = ?", (message_id,))
    conn.execute("DELETE FROM messages WHERE id = ?", (message_id,))
    return state


def bulk_ids(conn: sqlite3.Connection, action: str, states: list[str] | None = None,
             to_domain: str | None = None) -> list[str]:
    """The messages `--all` means: in ``states`` (default: ``ACTIONS[action].bulk``),
    with a pending recipient in ``to_domain`` if given; oldest first."""
    allowed = BULK_STATES[action]
    states = list(states or ACTIONS[action].bulk)
    bad = [s for s in states if s not in allowed]
    if bad:
        raise QueueActionError(f"{action} applies to {' or '.join(allowed)} messages, not {bad[0]} ones")
    sql = f"SELECT id FROM messages m WHERE state IN ({','.join('?' * len(states))})"
    args: list = list(states)
    if to_domain:
        sql += (" AND EXISTS (SELECT 1 FROM message_recipients r WHERE r.message_id = m.id "
                "AND r.state = 'pending' AND r.domain = ? COLLATE NOCASE)")
        args.append(to_domain.strip().rstrip("."))
    return [r[0] for r in conn.execute(sql + " ORDER BY received_at", args)]


def bulk(conn: sqlite3.Connection, action: str, *, now: float, states: list[str] | None = None,
         to_domain: str | None = None) -> list[str]:
    """One action on every message of `bulk_ids`, in one transaction; the ids acted on."""
    ids = bulk_ids(conn, action, states, to_domain)
    apply = {"delete": lambda i: delete(conn, i), "hold": lambda i: hold(conn, i),
             "release": lambda i: release(conn, i, now), "retry": lambda i: retry_now(conn, i, now)}[action]
    for i in ids:
        apply(i)
    return ids


# ---------------------------------------------------------------------- inspection
def counts_by_state(conn: sqlite3.Connection) -> dict[str, int]:
    out = {s: 0 for s in st.ALL}
    out.update(dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall()))
    return out


def states_of(conn: sqlite3.Connection, ids: list[str]) -> dict[str, str]:
    """The state of each of these messages that exists (id -> state)."""
    if not ids:
        return {}
    return dict(conn.execute(f"SELECT id, state FROM messages WHERE id IN ({','.join('?' * len(ids))})",
                             ids).fetchall())


def list_messages(conn: sqlite3.Connection, *, states: list[str] | None = None, search: str = "",
                  limit: int = 100) -> list[dict]:
    sql = ("SELECT m.id, m.state, m.mail_from, m.message_id, m.size, m.received_at, m.next_attempt, "
           "m.attempts, m.last_error, m.reason, (SELECT group_concat(recipient, ', ') FROM message_recipients r "
           "WHERE r.message_id = m.id) AS recipients FROM messages m")
    where, args = [], []
    if states:
        where.append(f"m.state IN ({','.join('?' * len(states))})")
        args += states
    if search:
        where.append("(m.id LIKE ? OR m.mail_from LIKE ? OR m.message_id LIKE ? OR EXISTS (SELECT 1 FROM "
                     "message_recipients r WHERE r.message_id = m.id AND r.recipient LIKE ?))")
        like = f"%{search}%"
        args += [like, like, like, like]
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY m.received_at DESC LIMIT ?"
    args.append(limit)
    cur = conn.execute(sql, args)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur]


def find_message(conn: sqlite3.Connection, key: str) -> str | None:
    """A queue id, or a Message-ID (with or without angle brackets)."""
    row = conn.execute("SELECT id FROM messages WHERE id = ?", (key.upper(),)).fetchone()
    if row:
        return row[0]
    for candidate in (key, f"<{key.strip('<>')}>"):
        row = conn.execute("SELECT id FROM messages WHERE message_id = ? ORDER BY received_at DESC",
                           (candidate,)).fetchone()
        if row:
            return row[0]
    return None


def message_detail(conn: sqlite3.Connection, message_id: str) -> dict | None:
    cur = conn.execute("SELECT * FROM messages WHERE id = ?", (message_id,))
    row = cur.fetchone()
    if row is None:
        return None
    detail = dict(zip([d[0] for d in cur.description], row))
    detail["recipients"] = [dict(zip(("recipient", "domain", "state", "attempts", "last_reply", "remote"), r))
                            for r in conn.execute(
        "SELECT recipient, domain, state, attempts, last_reply, remote FROM message_recipients "
        "WHERE message_id = ? ORDER BY recipient", (message_id,))]
    body = conn.execute("SELECT data FROM message_bodies WHERE message_id = ?", (message_id,)).fetchone()
    if body is not None:
        data = bytes(body[0])
        end = data.find(b"\r\n\r\n")
        detail["headers"] = (data if end < 0 else data[:end]).decode("utf-8", "replace")[:65536]
    else:
        detail["headers"] = None
    detail["deliveries"] = [dict(zip(("at", "recipient", "outcome", "remote", "reply"), r))
                            for r in conn.execute(
        "SELECT at, recipient, outcome, remote, reply FROM delivery_log WHERE message_id = ? ORDER BY id",
        (message_id,))]
    detail["trace"] = verdict_trace(conn, message_id, detail.get("connection_id"))
    return detail


def find_detail(conn: sqlite3.Connection, key: str) -> dict | None:
    """`message_detail` of a message named by queue id or Message-ID."""
    found = find_message(conn, key)
    return message_detail(conn, found) if found else None


def verdict_trace(conn: sqlite3.Connection, message_id: str, connection_id: str | None) -> list[dict]:
    """Every result of every phase for one message: the connection's own results
    (connect, HELO) first, then the transaction's, in the order they happened."""
    rows = conn.execute(
        "SELECT seq, at, phase, subject, check_name, symbol, score, action, reply, detail FROM verdicts "
        "WHERE message_id = ? OR (message_id IS NULL AND connection_id = ? AND phase IN ('connect', 'tls', 'helo')) "
        "ORDER BY seq", (message_id, connection_id or ""))
    cols = ("seq", "at", "phase", "subject", "check", "symbol", "score", "action", "reply", "detail")
    return [dict(zip(cols, r)) for r in rows]


def raw_message(conn: sqlite3.Connection, message_id: str) -> bytes | None:
    """The message as stored (our Received: first); None once delivered or bounced."""
    row = conn.execute("SELECT data FROM message_bodies WHERE message_id = ?", (message_id,)).fetchone()
    return bytes(row[0]) if row is not None else None


def summary(conn: sqlite3.Connection, states: list[str], now: float) -> list[dict]:
    """Per destination domain (like qshape): messages and recipients still pending, and
    how old the oldest is; the busiest first."""
    rows = conn.execute(
        "SELECT lower(r.domain), count(DISTINCT m.id), count(*), min(m.received_at) FROM messages m "
        "JOIN message_recipients r ON r.message_id = m.id AND r.state = 'pending' "
        f"WHERE m.state IN ({','.join('?' * len(states))}) GROUP BY lower(r.domain) "
        "ORDER BY count(DISTINCT m.id) DESC, lower(r.domain)", states)
    return [{"domain": d, "messages": n, "recipients": k, "oldest_received_at": t,
             "oldest_age_seconds": max(0.0, now - t)} for d, n, k, t in rows]


def _address_filter(column: str, value: str) -> tuple[str, list]:
    """An address, or every address of a domain when the value starts with '@'."""
    value = value.strip().strip("<>")
    if value.startswith("@"):
        escaped = value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return f"lower({column}) LIKE ? ESCAPE '\\'", ["%" + escaped]
    return f"{column} = ? COLLATE NOCASE", [value]


def rejects(conn: sqlite3.Connection, *, since: float | None = None, client: str | None = None,
            sender: str | None = None, recipient: str | None = None, check: str | None = None,
            limit: int = 100) -> list[dict]:
    """Refused commands (reject and tempfail verdicts), newest first, with the client and
    the transaction's sender: a queued message's envelope sender, else the MAIL verdict
    that came last before the refusal on the same connection. A recipient refused in a
    transaction that queued mail for others is kept with the connection; its
    ``queue_id`` is then that of the message its MAIL verdict went with."""
    last_mail = ("(SELECT {col} FROM verdicts s WHERE s.connection_id = v.connection_id "
                 "AND s.phase = 'mail' AND s.seq < v.seq ORDER BY s.seq DESC LIMIT 1)")
    inner = (
        "SELECT v.at, v.connection_id AS connection, coalesce(c.peer_ip, m.client_ip) AS client, "
        "c.helo, coalesce(c.listener, m.listener) AS listener, v.phase, "
        "CASE WHEN v.phase = 'mail' THEN v.subject "
        "WHEN m.id IS NOT NULL THEN CASE m.mail_from WHEN '' THEN '<>' ELSE m.mail_from END "
        f"ELSE {last_mail.format(col='s.subject')} "
        "END AS sender, CASE WHEN v.phase = 'rcpt' THEN v.subject END AS recipient, "
        "v.check_name AS \"check\", v.symbol, v.action, v.reply, v.detail, "
        "coalesce(v.message_id, CASE WHEN v.phase = 'rcpt' THEN "
        f"{last_mail.format(col='s.message_id')} END) AS queue_id "
        "FROM verdicts v LEFT JOIN connections c ON c.id = v.connection_id "
        "LEFT JOIN messages m ON m.id = v.message_id WHERE v.action IN ('reject', 'tempfail')")
    args: list = []
    if since is not None:
        inner += " AND v.at >= ?"
        args.append(since)
    where = []
    if client:
        where.append("client = ?")
        args.append(client)
    for column, value in (("sender", sender), ("recipient", recipient)):
        if value:
            sql, more = _address_filter(column, value)
            where.append(sql)
            args += more
    if check:
        where.append("(\"check\" = ? COLLATE NOCASE OR symbol = ? COLLATE NOCASE)")
        args += [check, check]
    sql = f"SELECT * FROM ({inner})" + (" WHERE " + " AND ".join(where) if where else "")
    cur = conn.execute(sql + " ORDER BY at DESC LIMIT ?", args + [limit])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur]


def connection_detail(conn: sqlite3.Connection, connection_id: str) -> dict | None:
    """A connection as recorded when it closed, its whole verdict trace (refused
    transactions included) and the messages it queued."""
    cur = conn.execute("SELECT * FROM connections WHERE id = ?", (connection_id,))
    row = cur.fetchone()
    if row is None:
        return None
    detail = dict(zip([d[0] for d in cur.description], row))
    cols = ("seq", "at", "phase", "subject", "check", "symbol", "score", "action", "reply", "detail",
            "queue_id")
    detail["trace"] = [dict(zip(cols, r)) for r in conn.execute(
        "SELECT seq, at, phase, subject, check_name, symbol, score, action, reply, detail, message_id "
        "FROM verdicts WHERE connection_id = ? ORDER BY seq", (connection_id,))]
    detail["queued"] = [dict(zip(("id", "state", "mail_from"), r)) for r in conn.execute(
        "SELECT id, state, mail_from FROM messages WHERE connection_id = ? ORDER BY received_at",
        (connection_id,))]
    return detail


def explain(conn: sqlite3.Connection, key: str) -> dict | None:
    """What `messages why KEY` shows. KEY is a queue id, a Message-ID, a connection id,
    or a sender or recipient address (then the most recent of its messages and refused
    commands). ``{"kind": "message"|"connection", "matched": n, "detail": {...}}``; for
    an address also ``messages`` and ``refused`` (how many of each matched) and, when a
    refusal is shown, ``reject`` (that refusal)."""
    key = key.strip()
    found = find_message(conn, key)
    if found:
        return {"kind": "message", "matched": 1, "detail": message_detail(conn, found)}
    connection = connection_detail(conn, key.upper()) if key[:1] in ("C", "c") else None
    if connection is not None:
        return {"kind": "connection", "matched": 1, "detail": connection}
    address = key.strip("<>")
    if "@" not in address:
        return None
    sql_from, a1 = _address_filter("mail_from", address)
    sql_to, a2 = _address_filter("recipient", address)
    messages = conn.execute(
        f"SELECT id, received_at FROM messages WHERE {sql_from} OR id IN "
        f"(SELECT message_id FROM message_recipients WHERE {sql_to}) ORDER BY received_at DESC",
        a1 + a2).fetchall()
    refused = {(r["connection"], r["at"], r["phase"], r["recipient"]): r
               for r in rejects(conn, sender=address, limit=10000) + rejects(conn, recipient=address, limit=10000)}
    ids = {m[0] for m in messages}
    refused_only = [r for r in refused.values() if r["queue_id"] not in ids]   # else counted as a message
    newest = max(refused_only, key=lambda r: r["at"], default=None)
    counts = {"matched": len(messages) + len(refused_only), "messages": len(messages),
              "refused": len(refused_only)}
    if messages and (newest is None or messages[0][1] >= newest["at"]):
        return {"kind": "message", **counts, "detail": message_detail(conn, messages[0][0])}
    if newest is None:
        return None
    if newest["queue_id"]:       # refused within a transaction that queued mail for others
        detail = message_detail(conn, newest["queue_id"])
        return {"kind": "message", **counts, "detail": detail, "reject": newest} if detail else None
    detail = connection_detail(conn, newest["connection"])
    return {"kind": "connection", **counts, "detail": detail, "reject": newest} if detail else None
