"""The durable queue: a state machine over SQLite rows.

States: ``incoming`` (just committed) -> ``active`` (leased by a delivery worker) ->
``delivered`` | ``deferred`` (due again later) | ``bounced``; ``hold`` parks a message
until released. A lease carries a deadline; leases of a crashed engine are given back
at start-up (one engine per home, enforced by a lock) and by a periodic sweep.

These functions run inside the store's writer (mutations) or readers (queries); they
take a connection and never commit themselves.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import time
from dataclasses import dataclass, field

PENDING, DELIVERED, BOUNCED = "pending", "delivered", "bounced"


# Queue ids are not secrets; they must be unique and sort by time. A random
# per-process start and a counter avoid a system call per message.
_ID_COUNTER = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_queue_id(now: float | None = None) -> str:
    """Time-ordered and unique: 11 hex digits of milliseconds + 9 of a counter that
    starts at random in each process."""
    ms = int((now if now is not None else time.time()) * 1000)
    return f"{ms:011X}{next(_ID_COUNTER) & 0xFFFFFFFFF:09X}"


@dataclass
class Verdict:
    seq: int
    at: float
    phase: str
    subject: str
    check: str
    symbol: str
    score: float
    action: str
    reply: str | None
    detail: str


@dataclass
class NewMessage:
    id: str
    mail_from: str
    recipients: list[tuple[str, str]]        # (address, lower-case domain)
    body: bytes
    received_at: float
    message_id: str | None = None
    connection_id: str | None = None
    listener: str | None = None
    client_ip: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.body)


def _verdict_rows(connection_id: str, message_id: str | None, verdicts: list[Verdict]):
    return [(connection_id, message_id, v.seq, v.at, v.phase, v.subject, v.check, v.symbol,
             v.score, v.action, v.reply, v.detail) for v in verdicts]


def insert_message(conn: sqlite3.Connection, m: NewMessage) -> str:
    conn.execute(
        "INSERT INTO messages (id, state, mail_from, message_id, size, received_at, next_attempt, "
        "connection_id, listener, client_ip) VALUES (?, 'incoming', ?, ?, ?, ?, ?, ?, ?, ?)",
        (m.id, m.mail_from, m.message_id, m.size, m.received_at, m.received_at,
         m.connection_id, m.listener, m.client_ip))
    conn.execute("INSERT INTO message_bodies (message_id, data) VALUES (?, ?)", (m.id, m.body))
    conn.executemany(
        "INSERT OR IGNORE INTO message_recipients (message_id, recipient, domain, state) "
        "VALUES (?, ?, ?, 'pending')", [(m.id, r, d) for r, d in m.recipients])
    if m.verdicts:
        conn.executemany(
            "INSERT INTO verdicts (connection_id, message_id, seq, at, phase, subject, check_name, "
            "symbol, score, action, reply, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _verdict_rows(m.connection_id or "", m.id, m.verdicts))
    return m.id


def record_connection(conn: sqlite3.Connection, row: dict, verdicts: list[Verdict]) -> None:
    conn.execute(
        "INSERT INTO connections (id, listener, peer_ip, peer_port, helo, started_at, ended_at, "
        "messages, rejected) VALUES (:id, :listener, :peer_ip, :peer_port, :helo, :started_at, "
        ":ended_at, :messages, :rejected) ON CONFLICT(id) DO UPDATE SET helo=excluded.helo, "
        "ended_at=excluded.ended_at, messages=excluded.messages, rejected=excluded.rejected", row)
    if verdicts:
        conn.executemany(
            "INSERT INTO verdicts (connection_id, message_id, seq, at, phase, subject, check_name, "
            "symbol, score, action, reply, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _verdict_rows(row["id"], None, verdicts))


def recover_leases(conn: sqlite3.Connection, now: float, *, expired_only: bool) -> int:
    """Give leased messages back to the queue (all of them at start-up)."""
    where = "state = 'active'" + (" AND lease_until < ?" if expired_only else "")
    args: tuple = (now, now) if expired_only else (now,)
    return conn.execute(
        f"UPDATE messages SET state = 'deferred', lease_until = NULL, "
        f"next_attempt = min(next_attempt, ?) WHERE {where}", args).rowcount


def lease_due(conn: sqlite3.Connection, now: float, limit: int, lease_seconds: float) -> list[str]:
    ids = [r[0] for r in conn.execute(
        "SELECT id FROM messages WHERE state IN ('incoming', 'deferred') AND next_attempt <= ? "
        "ORDER BY next_attempt LIMIT ?", (now, limit))]
    if ids:
        conn.executemany("UPDATE messages SET state = 'active', lease_until = ?, "
                         "attempts = attempts + 1 WHERE id = ?",
                         [(now + lease_seconds, i) for i in ids])
    return ids


def next_due(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT min(next_attempt) FROM messages "
                       "WHERE state IN ('incoming', 'deferred')").fetchone()
    return row[0]


@dataclass
class Leased:
    id: str
    mail_from: str
    received_at: float
    attempts: int
    body: bytes
    recipients: list[tuple[str, str]]        # pending (address, domain)


def load_leased(conn: sqlite3.Connection, message_id: str) -> Leased | None:
    row = conn.execute("SELECT m.id, m.mail_from, m.received_at, m.attempts, b.data "
                       "FROM messages m JOIN message_bodies b ON b.message_id = m.id "
                       "WHERE m.id = ? AND m.state = 'active'", (message_id,)).fetchone()
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


def finish_attempt(conn: sqlite3.Connection, message_id: str, outcomes: list[RcptOutcome], *,
                   now: float, next_attempt: float | None, last_error: str | None,
                   dsn: NewMessage | None) -> str:
    """Record one delivery attempt and move the message to its next state.

    The bounce (if any) is queued in the same transaction, so a crash can neither lose
    it nor send it twice.
    """
    for o in outcomes:
        state = {"delivered": DELIVERED, "bounced": BOUNCED}.get(o.outcome, PENDING)
        conn.execute("UPDATE message_recipients SET state = ?, attempts = attempts + 1, "
                     "last_attempt = ?, last_reply = ?, remote = ? "
                     "WHERE message_id = ? AND recipient = ?",
                     (state, now, o.reply[:1000], o.remote, message_id, o.recipient))
        conn.execute("INSERT INTO delivery_log (message_id, recipient, at, outcome, remote, reply) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     (message_id, o.recipient, now, o.outcome, o.remote, o.reply[:1000]))
    counts = dict(conn.execute("SELECT state, count(*) FROM message_recipients "
                               "WHERE message_id = ? GROUP BY state", (message_id,)).fetchall())
    if counts.get(PENDING):
        state = "deferred"
        conn.execute("UPDATE messages SET state = 'deferred', lease_until = NULL, next_attempt = ?, "
                     "last_error = ? WHERE id = ? AND state = 'active'",
                     (next_attempt if next_attempt is not None else now, last_error, message_id))
    else:
        state = "bounced" if counts.get(BOUNCED) else "delivered"
        conn.execute("UPDATE messages SET state = ?, lease_until = NULL, done_at = ?, last_error = ? "
                     "WHERE id = ? AND state = 'active'", (state, now, last_error, message_id))
        # The body is not needed any more; the record and its verdict trace stay
        # until queue.keep_done has passed.
        conn.execute("DELETE FROM message_bodies WHERE message_id = ?", (message_id,))
    if dsn is not None:
        insert_message(conn, dsn)
    return state


def purge_done(conn: sqlite3.Connection, before: float) -> int:
    ids = [r[0] for r in conn.execute(
        "SELECT id FROM messages WHERE state IN ('delivered', 'bounced') AND done_at < ? LIMIT 5000",
        (before,))]
    for i in ids:
        conn.execute("DELETE FROM verdicts WHERE message_id = ?", (i,))
        conn.execute("DELETE FROM delivery_log WHERE message_id = ?", (i,))
        conn.execute("DELETE FROM messages WHERE id = ?", (i,))
    conn.execute("DELETE FROM connections WHERE ended_at < ? AND id NOT IN "
                 "(SELECT connection_id FROM messages WHERE connection_id IS NOT NULL)", (before,))
    conn.execute("DELETE FROM verdicts WHERE message_id IS NULL AND at < ?", (before,))
    return len(ids)
