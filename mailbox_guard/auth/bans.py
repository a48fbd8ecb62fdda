"""The brute-force bans in the store (table ``auth_bans``): every statement on it,
for the engine (load, record), the control socket and the CLI (list, remove).

Each function takes an open connection of the store and runs in its transaction;
a change to the table bumps the store's bans version, which the engine polls.
"""

from __future__ import annotations

COLUMNS = ("kind", "key", "until", "failures", "created_at")


def active(conn, now: float) -> list[dict]:
    """The bans still in force at ``now``, the longest-lasting first."""
    return [dict(zip(COLUMNS, row)) for row in conn.execute(
        "SELECT kind, key, until, failures, created_at FROM auth_bans WHERE until > ? "
        "ORDER BY until DESC", (now,))]


def address_bans(conn, now: float) -> dict[str, float]:
    """Banned addresses and networks (lower-case) -> until, for the engine."""
    rows = conn.execute("SELECT key, until FROM auth_bans WHERE kind = 'ip' AND until > ?", (now,))
    return {key.lower(): until for key, until in rows}


def record(conn, key: str, until: float, failures: int, now: float) -> None:
    """Ban an address or network until ``until`` (a renewed ban keeps its start)."""
    conn.execute("INSERT INTO auth_bans (kind, key, until, failures, created_at) VALUES ('ip', ?, ?, ?, ?) "
                 "ON CONFLICT(kind, key) DO UPDATE SET until = excluded.until, failures = excluded.failures",
                 (key, until, failures, now))


def remove(conn, key: str) -> bool:
    """Lift the ban of an address or network (any case); False when there was none."""
    return conn.execute("DELETE FROM auth_bans WHERE key = ? COLLATE NOCASE", (key.strip(),)).rowcount > 0
