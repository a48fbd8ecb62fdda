"""The store: created from schema.sql, WAL with synchronous=FULL verified, schema
version recorded, corrupt or foreign files refused with one clear line."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from mailbox_guard.store import db as store
from mailbox_guard.store.writer import Writer
from tests.conftest import ROOT


def test_fresh_store_comes_from_schema_sql(tmp_path):
    path = store.ensure_home(tmp_path / "h")
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"domains", "networks", "messages", "message_bodies", "message_recipients",
            "verdicts", "connections", "settings", "listeners"} <= tables
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.schema_version()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # schema.sql at the top of the repository is the one source.
    assert "CREATE TABLE messages" in (ROOT / "schema.sql").read_text()
    assert store.schema_text() == (ROOT / "schema.sql").read_text()
    conn.close()


def test_every_connection_is_wal_and_synchronous_full(tmp_path):
    path = store.ensure_home(tmp_path / "h")
    conn = store.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2     # FULL
    conn.close()


def test_policy_edits_bump_the_version(tmp_path):
    ps = store.PolicyStore(store.ensure_home(tmp_path / "h"))
    v0 = ps.policy_version()
    ps.add_domain("example.test")
    ps.add_network("10.0.0.0/8")
    ps.set_setting("smtp.max_recipients", "50")
    assert ps.policy_version() == v0 + 3


def test_initialise_is_idempotent_and_refuses_newer_schema(tmp_path):
    path = store.ensure_home(tmp_path / "h")
    store.initialise(path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(store.StoreError, match="newer"):
        store.initialise(path)


def test_migration_steps_run_in_order(tmp_path, monkeypatch):
    path = store.ensure_home(tmp_path / "h")
    current = store.schema_version()
    text = store.schema_text().replace(f"-- schema-version: {current}", f"-- schema-version: {current + 1}")
    monkeypatch.setattr(store, "schema_text", lambda: text)
    monkeypatch.setattr(store, "MIGRATIONS", {current: store.Migration(("CREATE TABLE added_later (x INTEGER)",))})
    store.initialise(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == current + 1
    assert conn.execute("SELECT count(*) FROM added_later").fetchone()[0] == 0
    conn.close()


def cli(home, *args):
    return subprocess.run([sys.executable, "-m", "mailbox_guard", "--home", str(home), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_corrupt_store_is_one_clear_line_not_a_traceback(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (home / store.DB_NAME).write_bytes(b"this is not a database" * 100)
    for args in (("domains", "list"), ("serve", "--inbound", "127.0.0.1:0")):
        out = cli(home, *args)
        assert out.returncode == 1, args
        assert "Traceback" not in out.stderr
        assert "store" in out.stderr and ("corrupt" in out.stderr or "unreadable" in out.stderr)


def test_foreign_sqlite_file_is_refused(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    conn = sqlite3.connect(home / store.DB_NAME)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    out = cli(home, "domains", "list")
    assert out.returncode == 1 and "not a mailbox-guard store" in out.stderr


def test_a_version_1_store_migrates_to_the_current_schema(tmp_path):
    """An old store (made from the schema.sql of version 1, kept as test data) ends up
    with exactly the tables, columns and triggers of a fresh one, data intact."""
    old = tmp_path / "old"
    old.mkdir()
    conn = sqlite3.connect(old / store.DB_NAME)
    v1 = (ROOT / "tests" / "data" / "schema-v1.sql").read_text()
    conn.executescript(v1)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO domains (name, next_hop, created_at) VALUES ('kept.test', NULL, 0)")
    conn.commit()
    conn.close()
    store.initialise(old / store.DB_NAME)
    fresh = store.ensure_home(tmp_path / "fresh")

    def shape(path):
        c = sqlite3.connect(path)
        tables = {r[0]: sorted(col[1] for col in c.execute(f"PRAGMA table_info({r[0]})"))
                  for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        others = sorted(r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type != 'table'"))
        version = c.execute("PRAGMA user_version").fetchone()[0]
        c.close()
        return tables, others, version

    assert shape(old / store.DB_NAME) == shape(fresh)
    assert store.PolicyStore(old / store.DB_NAME).domains()[0].name == "kept.test"


def _v3_store(path):
    """A store as schema version 3 made it (tests/data/schema-v3.sql is that
    schema.sql), holding a queued message with its body, recipients and verdicts, a
    domain, a user and a ban."""
    conn = sqlite3.connect(path)
    conn.executescript((ROOT / "tests" / "data" / "schema-v3.sql").read_text())
    conn.execute("PRAGMA user_version = 3")
    conn.execute("INSERT INTO domains (name, next_hop, created_at) VALUES ('kept.test', NULL, 0)")
    conn.execute("INSERT INTO users (name, domain, password_hash, created_at, changed_at) "
                 "VALUES ('alice@kept.test', 'kept.test', '$argon2id$x', 0, 0)")
    conn.execute("INSERT INTO auth_bans (kind, key, until, failures, created_at) "
                 "VALUES ('ip', '192.0.2.7', 9e9, 10, 0)")
    conn.execute("INSERT INTO messages (id, state, mail_from, message_id, size, received_at, next_attempt, attempts, "
                 "connection_id, listener, client_ip) VALUES ('M1', 'deferred', 'a@b.test', '<m1@b.test>', 5, 1, 2, 1, "
                 "'C1', 'inbound', '192.0.2.1')")
    conn.execute("INSERT INTO message_bodies (message_id, data) VALUES ('M1', X'68656c6c6f')")
    conn.execute("INSERT INTO message_recipients (message_id, recipient, domain, state) VALUES "
                 "('M1', 'bob@kept.test', 'kept.test', 'pending'), ('M1', 'carol@kept.test', 'kept.test', 'pending')")
    conn.execute("INSERT INTO verdicts (connection_id, message_id, seq, at, phase, check_name, symbol, action) "
                 "VALUES ('C1', 'M1', 1, 1, 'rcpt', 'rcpt_relay', 'RELAY_GUARDED_DOMAIN', 'accept')")
    conn.commit()
    conn.close()


def test_a_version_3_store_migrates_to_4_with_its_queue_intact(tmp_path):
    home = tmp_path / "old"
    home.mkdir()
    path = home / store.DB_NAME
    _v3_store(path)
    store.initialise(path)
    conn = store.connect(path)
    conn.row_factory = sqlite3.Row
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
    assert dict(conn.execute("SELECT id, state, mail_from, size, attempts, connection_id, reason, helo, tls, "
                             "auth_user FROM messages").fetchone()) == {
        "id": "M1", "state": "deferred", "mail_from": "a@b.test", "size": 5, "attempts": 1, "connection_id": "C1",
        "reason": None, "helo": None, "tls": None, "auth_user": None}
    assert bytes(conn.execute("SELECT data FROM message_bodies WHERE message_id = 'M1'").fetchone()[0]) == b"hello"
    assert [r[0] for r in conn.execute("SELECT recipient FROM message_recipients WHERE message_id = 'M1' "
                                       "ORDER BY recipient")] == ["bob@kept.test", "carol@kept.test"]
    assert [r[0] for r in conn.execute("SELECT symbol FROM verdicts WHERE message_id = 'M1'")] == [
        "RELAY_GUARDED_DOMAIN"]
    # The rebuilt table keeps its indexes, and the body still hangs on the message.
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'messages'")}
    assert {"messages_due", "messages_msgid"} <= names
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.execute("DELETE FROM messages WHERE id = 'M1'")
    assert conn.execute("SELECT count(*) FROM message_bodies").fetchone()[0] == 0        # ON DELETE CASCADE
    # Quarantine is a state now; runtime state is off the policy version, bans have their own.
    conn.execute("INSERT INTO messages (id, state, mail_from, size, received_at, next_attempt, reason) "
                 "VALUES ('M2', 'quarantine', '', 1, 1, 1, 'score 20')")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("INSERT INTO messages (id, state, mail_from, size, received_at, next_attempt) "
                     "VALUES ('M3', 'limbo', '', 1, 1, 1)")
    policy, bans = store.state_versions(conn)
    conn.execute("UPDATE users SET disabled = 1")
    conn.execute("INSERT INTO user_secrets (user, mechanism, secret) VALUES ('alice@kept.test', 'SCRAM-SHA-256', 's')")
    conn.execute("DELETE FROM users")
    assert store.state_versions(conn) == (policy, bans)
    conn.execute("INSERT INTO auth_bans (kind, key, until, failures, created_at) "
                 "VALUES ('ip', '192.0.2.8', 9e9, 10, 0)")
    conn.execute("UPDATE auth_bans SET failures = 11 WHERE key = '192.0.2.8'")
    conn.execute("DELETE FROM auth_bans WHERE key = '192.0.2.8'")
    assert store.state_versions(conn) == (policy, bans + 3)
    # The new policy tables bump the policy version.
    conn.execute("INSERT INTO scoped_settings (scope, key, value) VALUES ('kept.test', 'actions.reject', '10')")
    conn.execute("INSERT INTO check_modes (check_name, scope, mode) VALUES ('rcpt_recipients', '', 'warn')")
    assert store.state_versions(conn) == (policy + 2, bans + 3)
    conn.close()
    # And the store has exactly the shape of a fresh one.
    fresh = store.ensure_home(tmp_path / "fresh")
    assert _shape(path) == _shape(fresh)


def _shape(path):
    c = sqlite3.connect(path)
    tables = {r[0]: sorted(col[1] for col in c.execute(f"PRAGMA table_info({r[0]})"))
              for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    others = sorted((r[0], r[1]) for r in c.execute("SELECT name, sql FROM sqlite_master WHERE type != 'table'"))
    c.close()
    return tables, others


def test_delivery_leases_only_due_mail_never_held_or_quarantined(tmp_path):
    from mailbox_guard.queue import ops as q
    from mailbox_guard.queue import states
    path = store.ensure_home(tmp_path / "h")
    conn = store.connect(path)
    for state in states.ALL:
        conn.execute("INSERT INTO messages (id, state, mail_from, size, received_at, next_attempt) "
                     "VALUES (?, ?, '', 1, 0, 0)", (state.upper(), state))
    assert sorted(q.lease_due(conn, now=100, limit=100, lease_seconds=60)) == ["DEFERRED", "INCOMING"]
    assert q.next_due(conn) is None                    # nothing else is due, ever
    assert q.lease_due(conn, now=10**9, limit=100, lease_seconds=60) == []
    # A crashed engine's leases come back as deferred; parked mail stays parked.
    assert q.recover_leases(conn, now=100, expired_only=False) == 3        # ACTIVE, and the two just leased
    left = dict(conn.execute("SELECT id, state FROM messages"))
    assert (left["HOLD"], left["QUARANTINE"]) == ("hold", "quarantine")
    assert q.counts_by_state(conn) == {"incoming": 0, "active": 0, "deferred": 3, "hold": 1, "quarantine": 1,
                                       "delivered": 1, "bounced": 1}
    q.flush(conn, now=200)
    assert dict(conn.execute("SELECT id, next_attempt FROM messages WHERE id = 'QUARANTINE'"))["QUARANTINE"] == 0
    conn.close()


def _slow_job(c):
    import time as _time
    _time.sleep(0.2)       # the jobs queued meanwhile make one batch
    return "slow"


def _insert_job(c, key):
    return c.execute("INSERT INTO meta (key, value) VALUES (?, 'x')", (key,)).rowcount


def test_a_failing_job_does_not_spoil_the_others_of_its_commit(tmp_path):
    """Jobs queued together commit together; one that fails gets its error and the
    others are committed (the writer runs the batch again job by job)."""
    import asyncio
    store.initialise(tmp_path / "s.db")
    writer = Writer(tmp_path / "s.db").start()

    async def main():
        await writer.run(_insert_job, "warm-up")     # the writer has imported this module
        before = writer.commits
        first = asyncio.ensure_future(writer.run(_slow_job))
        await asyncio.sleep(0.05)
        results = await asyncio.gather(writer.run(_insert_job, "a"), writer.run(_insert_job, "policy_version"),
                                       writer.run(_insert_job, "b"), return_exceptions=True)
        return await first, results, writer.commits - before
    try:
        first, (a, dup, b), commits = asyncio.run(main())
    finally:
        writer.close()
    assert first == "slow" and a == 1 and b == 1 and commits == 2
    assert isinstance(dup, sqlite3.IntegrityError)
    conn = store.connect(tmp_path / "s.db", readonly=True)
    try:
        keys = {r[0] for r in conn.execute("SELECT key FROM meta")}
    finally:
        conn.close()
    assert {"a", "b"} <= keys
