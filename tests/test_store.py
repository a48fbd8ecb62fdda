"""The store: created from schema.sql, WAL with synchronous=FULL verified, schema
version recorded, corrupt or foreign files refused with one clear line."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from mailbox_guard.store import db as store
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
