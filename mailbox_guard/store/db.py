"""The embedded SQLite store: creation from ``schema.sql``, migrations, durable
connections, readers, and policy edits.

Every connection runs in WAL mode with ``synchronous=FULL``, and both are read back
and verified, so a ``250`` after DATA always means the message reached the disk.
All engine writes go through one writer (:mod:`mailbox_guard.store.writer`, a
process of its own) that commits whatever has queued up while the previous commit
was syncing (group commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

from mailbox_guard.config import SETTINGS, SettingError, parse_endpoint, parse_setting
from mailbox_guard.model import Mode

log = logging.getLogger("mailbox_guard.store")

DB_NAME = "mailbox-guard.db"

# The mechanisms a domain switches on for itself (schema.sql's domain_mechanisms
# allows these only); every other mechanism is the server's.
LEGACY_MECHANISMS = frozenset({"CRAM-MD5", "DIGEST-MD5"})

# Numbered migrations from an older user_version to the next one: statements of
# their own (ALTER TABLE ...) plus the tables that version added, whose CREATE TABLE,
# indexes and triggers are taken from schema.sql itself, which stays the one source.
@dataclass(frozen=True)
class Migration:
    statements: tuple[str, ...] = ()
    new_tables: tuple[str, ...] = ()
    # Tables rebuilt from schema.sql (SQLite cannot change a CHECK constraint): name ->
    # the columns the old table had, copied over; then its indexes are made again.
    rebuilt: tuple[tuple[str, tuple[str, ...]], ...] = ()
    after: tuple[str, ...] = ()

    def script(self, schema: str) -> list[str]:
        out = list(self.statements)
        for name, columns in self.rebuilt:
            create = _create_statement(schema, name)
            out.append(create.replace(f"CREATE TABLE {name} (", f"CREATE TABLE {name}__new (", 1))
            cols = ", ".join(columns)
            out.append(f"INSERT INTO {name}__new ({cols}) SELECT {cols} FROM {name}")
            out.append(f"DROP TABLE {name}")
            out.append(f"ALTER TABLE {name}__new RENAME TO {name}")
            out.extend(_index_statements(schema, name))
        for statement in _statements(schema):
            # Leading comment lines belong to no statement.
            words = "\n".join(line for line in statement.splitlines()
                              if not line.lstrip().startswith("--")).split()
            if len(words) < 3 or words[0].upper() != "CREATE":
                continue
            kind = words[1].upper()
            name = words[2]
            if kind == "TABLE" and name in self.new_tables:
                out.append(statement)
            elif kind in ("INDEX", "TRIGGER"):
                target = words[words.index("ON") + 1] if "ON" in words else ""
                if target in self.new_tables:
                    out.append(statement)
        return out + list(self.after)


def _words(statement: str) -> list[str]:
    return "\n".join(line for line in statement.splitlines()
                     if not line.lstrip().startswith("--")).split()


def _create_statement(schema: str, table: str) -> str:
    for statement in _statements(schema):
        words = _words(statement)
        if words[:3] == ["CREATE", "TABLE", table]:
            return "\n".join(line for line in statement.splitlines() if not line.lstrip().startswith("--"))
    raise StoreError(f"schema.sql has no table {table}")


def _index_statements(schema: str, table: str) -> list[str]:
    out = []
    for statement in _statements(schema):
        words = _words(statement)
        if words[:2] == ["CREATE", "INDEX"] and "ON" in words and \
                words[words.index("ON") + 1].partition("(")[0] == table:
            out.append(statement)
    return out


_POLICY_BUMP = "UPDATE meta SET value = value + 1 WHERE key = 'policy_version'"
_BANS_BUMP = "UPDATE meta SET value = value + 1 WHERE key = 'bans_version'"

MIGRATIONS: dict[int, Migration] = {
    # 1 -> 2: users, aliases, mechanism secrets, password policy, brute-force bans;
    # per-domain anti-impersonation; listener flags for AUTH.
    1: Migration(
        statements=(
            "ALTER TABLE domains ADD COLUMN anti_impersonation INTEGER NOT NULL DEFAULT 1",
            "ALTER TABLE listeners ADD COLUMN require_auth INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE listeners ADD COLUMN plaintext_auth INTEGER NOT NULL DEFAULT 0",
        ),
        new_tables=("users", "user_aliases", "user_secrets", "domain_mechanisms", "password_policy",
                    "auth_bans")),
    # 2 -> 3: accounts are no longer locked (sources are banned, a login under attack
    # slows down unknown networks): user bans end; where logins succeeded.
    2: Migration(statements=("DELETE FROM auth_bans WHERE kind = 'user'",
                             "CREATE INDEX verdicts_at ON verdicts(at)"), new_tables=("auth_known",)),
    # 3 -> 4: the decision core. Quarantine is a queue state (with its reason);
    # messages and connections keep the facts a replay needs; scoped settings and
    # check modes; runtime state (bans, secrets, users) no longer bumps the policy
    # version (bans have their own).
    3: Migration(
        statements=(
            "ALTER TABLE connections ADD COLUMN tls_version TEXT",
            "ALTER TABLE connections ADD COLUMN tls_cipher TEXT",
            "ALTER TABLE connections ADD COLUMN auth_user TEXT",
            "ALTER TABLE connections ADD COLUMN auth_mechanism TEXT",
            *(f"DROP TRIGGER IF EXISTS {t}_{op}" for t in ("users", "user_secrets", "auth_bans")
              for op in ("ins", "upd", "del")),
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('bans_version', '1')",
        ),
        rebuilt=(("messages", ("id", "state", "mail_from", "message_id", "size", "received_at",
                               "next_attempt", "attempts", "lease_until", "connection_id", "listener",
                               "client_ip", "last_error", "done_at")),),
        new_tables=("scoped_settings", "check_modes"),
        after=tuple(f"CREATE TRIGGER auth_bans_{op} AFTER {kind} ON auth_bans BEGIN {_BANS_BUMP}; END"
                    for op, kind in (("ins", "INSERT"), ("upd", "UPDATE"), ("del", "DELETE")))),
}


class StoreError(Exception):
    """The store cannot be used; the message is one line an admin can act on."""


def schema_text() -> str:
    """The text of schema.sql: packaged beside the engine, or at the repository top."""
    packaged = resources.files("mailbox_guard").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    top = Path(__file__).resolve().parents[2] / "schema.sql"
    try:
        return top.read_text(encoding="utf-8")
    except OSError as exc:
        raise StoreError(f"schema.sql not found ({exc.strerror})") from None


def schema_version(text: str | None = None) -> int:
    m = re.search(r"^-- schema-version:\s*(\d+)\s*$", text or schema_text(), re.M)
    if not m:
        raise StoreError("schema.sql has no '-- schema-version: N' line")
    return int(m.group(1))


def connect(path: Path | str, *, busy_timeout: float = 5.0, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with the durability settings set *and verified*."""
    try:
        if readonly:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=busy_timeout,
                                   isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None,
                                   check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous = FULL")
        sync = conn.execute("PRAGMA synchronous").fetchone()[0]
        conn.execute("PRAGMA foreign_keys = ON")
        # Debian's SQLite overwrites every deleted page with zeros (SECURE_DELETE): a
        # delivered message's body would then be written a second time, in full, into
        # the WAL. FAST zeroes what costs no extra I/O; freed body pages are reused by
        # later messages, as a file system reuses a deleted queue file's blocks.
        conn.execute("PRAGMA secure_delete = FAST")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"store {path} is unreadable ({exc}); restore it from a backup "
                         "or move it away to start with an empty store") from None
    if mode.lower() != "wal" or sync != 2:
        conn.close()
        raise StoreError(f"store {path}: could not enable WAL with synchronous=FULL "
                         f"(journal_mode={mode}, synchronous={sync})")
    return conn


def initialise(path: Path | str, *, busy_timeout: float = 5.0) -> None:
    """Create the store from schema.sql, or migrate it to the current version."""
    text = schema_text()
    target = schema_version(text)
    conn = connect(path, busy_timeout=busy_timeout)
    try:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"store {path} is corrupt ({exc}); restore it from a backup "
                             "or move it away to start with an empty store") from None
        if check != "ok":
            raise StoreError(f"store {path} failed its integrity check ({check}); restore "
                             "it from a backup or move it away")
        if version > target:
            raise StoreError(f"store {path} has schema version {version}, newer than this "
                             f"mailbox-guard ({target}); upgrade mailbox-guard")
        if version == 0 and tables == 0:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(text):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
            version = target
            log.info("created store %s (schema version %d)", path, target)
        elif version == 0:
            raise StoreError(f"{path} is an SQLite file but not a mailbox-guard store")
        # A table rebuilt by a migration is dropped and made again: with foreign keys
        # on, dropping it would delete the rows that refer to it (SQLite's documented
        # procedure: keys off, rebuild, check the keys, commit).
        conn.execute("PRAGMA foreign_keys = OFF")
        while version < target:
            step = MIGRATIONS.get(version)
            if step is None:
                raise StoreError(f"no migration from schema version {version}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in step.script(text):
                conn.execute(statement)
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                conn.execute("ROLLBACK")
                raise StoreError(f"migration to schema version {version + 1} broke {len(broken)} "
                                 "reference(s); the store is left at the old version")
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
            log.info("migrated store %s to schema version %d", path, version)
    except sqlite3.OperationalError as exc:
        raise StoreError(f"cannot initialise store {path}: {exc}") from None
    finally:
        conn.close()


def _statements(script: str) -> Iterator[str]:
    """Split a script into complete statements (sqlite3.complete_statement knows
    about triggers' inner semicolons), so it can run inside our own transaction."""
    buf = ""
    for line in script.splitlines(keepends=True):
        if not buf and line.lstrip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip():
        raise StoreError("schema script ends with an incomplete statement")


# The writer (its own process) is in mailbox_guard.store.writer.


class Readers:
    """Read-only queries off the event loop, one connection per worker thread."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 5.0) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path, busy_timeout=self._busy_timeout)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def run_sync(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return fn(self._conn())

    async def run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await asyncio.to_thread(self.run_sync, fn)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()


# --------------------------------------------------------------------- policy edits
@dataclass(frozen=True)
class DomainRow:
    name: str
    next_hop: str | None


# Trusting a network that wide lets a good part of the Internet relay through us:
# public networks with a prefix this short or shorter are refused without --force.
OPEN_RELAY_PREFIX = {4: 8, 6: 16}


def _idna():
    """The idna package (IDNA 2008 with UTS #46 mapping, so that faß.de gets the
    A-label registries use) when installed; else None: the stdlib's IDNA 2003 codec."""
    try:
        import idna
    except ImportError:
        return None
    return idna


def _idna_encode(text: str) -> str:
    idna = _idna()
    return idna.encode(text, uts46=True).decode("ascii") if idna else text.encode("idna").decode("ascii")


def domain_unicode(name: str) -> str:
    """The U-label form of a stored (A-label) domain, for display."""
    if "xn--" not in name:
        return name
    idna = _idna()
    try:
        return idna.decode(name) if idna else name.encode("ascii").decode("idna")
    except UnicodeError:        # not valid IDNA (written behind our back): show it as stored
        return name


def normalise_domain(name: str) -> str:
    """A guarded domain as stored: lower-case, no trailing dot, IDNA A-labels, checked;
    the same for every spelling (U-label, A-label, upper case), so that add, remove and
    lookups agree. IP addresses are not domains."""
    text = str(name).strip().rstrip(".")
    try:
        # Plain ASCII needs no IDNA pass (the pattern below checks it); A-labels do,
        # so that a malformed xn-- label is refused.
        text = text.lower() if text.isascii() and "xn--" not in text.lower() else _idna_encode(text)
    except UnicodeError:
        raise SettingError(f"not a domain name: {name!r}") from None
    if ":" in text or re.fullmatch(r"[0-9.]+", text):
        raise SettingError(f"an IP address is not a domain name: {name!r} (e.g. example.org)")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+", text) \
            or text.rpartition(".")[2].isdigit():
        raise SettingError(f"not a domain name: {name!r} (e.g. example.org)")
    return text



def normalise_user(name: str) -> tuple[str, str]:
    """A login is the user's own address: local@guarded-domain."""
    local, at, domain = str(name).strip().rpartition("@")
    if not at or not local or any(c.isspace() or ord(c) < 32 for c in local):
        raise SettingError(f"a user is an address, e.g. alice@example.org (got {name!r})")
    domain = normalise_domain(domain)
    return f"{local}@{domain}", domain

def normalise_address(text: str) -> str:
    """A recipient as stored: local@domain, parsed as an SMTP path would be (no spaces,
    quotes, routes or literals), the domain normalised like a guarded domain."""
    from mailbox_guard.mail.addresses import PathError, parse_path
    raw = str(text).strip()
    try:
        path = parse_path(f"<{raw}>")
    except PathError:
        path = None
    if path is None or not path.domain or path.quoted_local or path.route or path.literal or path.trailing_dot:
        raise SettingError(f"not an address: {raw!r} (e.g. alice@example.org)")
    return f"{path.local}@{normalise_domain(path.domain)}"


def normalise_next_hop(text: str | None) -> str | None:
    if text is None or text == "":
        return None
    host, port = parse_endpoint(text, default_port=25)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalise_network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(str(text).strip(), strict=False))
    except ValueError:
        raise SettingError(f"not an IP network: {text!r} (e.g. 10.0.0.0/8 or 2001:db8::/32)") from None


def open_relay_networks(cidrs) -> list[str]:
    """Those of ``cidrs`` that make an open relay if trusted: public (not private,
    loopback or otherwise reserved) networks of prefix length OPEN_RELAY_PREFIX or
    shorter (IPv4 /8, IPv6 /16), such as 0.0.0.0/0 and ::/0. Unparsable entries are
    left out (they trust nothing)."""
    out = []
    for cidr in cidrs:
        try:
            net = ipaddress.ip_network(str(cidr).strip(), strict=False)
        except ValueError:
            continue
        if net.prefixlen <= OPEN_RELAY_PREFIX[net.version] and not net.is_private:
            out.append(str(net))
    return out


def _policy_row(row) -> dict:
    return {"scope": row["scope"], "min_length": row["min_length"], "min_classes": row["min_classes"],
            "reject_common": bool(row["reject_common"]), "reject_name": bool(row["reject_name"])}


class PolicyStore:
    """Policy edits and reads with one short-lived connection (CLI and engine)."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = connect(self.path, busy_timeout=self._busy_timeout)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"store {self.path}: {exc}") from None
        finally:
            conn.close()

    def policy_version(self) -> int:
        with self._tx() as conn:
            return int(conn.execute("SELECT value FROM meta WHERE key='policy_version'").fetchone()[0])

    # domains
    def add_domain(self, name: str, next_hop: str | None = None) -> DomainRow:
        name, hop = normalise_domain(name), normalise_next_hop(next_hop)
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO domains (name, next_hop, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET next_hop = excluded.next_hop",
                (name, hop, time.time()))
        return DomainRow(name, hop)

    def set_domain_option(self, name: str, option: str, value: bool) -> None:
        if option not in ("anti_impersonation",):
            raise SettingError(f"unknown domain option {option!r}")
        name = normalise_domain(name)
        with self._tx() as conn:
            if conn.execute(f"UPDATE domains SET {option} = ? WHERE name = ?", (int(value), name)).rowcount == 0:
                raise SettingError(f"{name} is not a guarded domain")

    def remove_domain(self, name: str) -> tuple[int, int] | None:
        """Stop guarding a domain; its recipients, users (an account of a domain we no
        longer guard must not authenticate), mechanisms and password policy go with it.
        Returns (recipients, users) removed, None when it was not guarded."""
        name = normalise_domain(name)
        with self._tx() as conn:
            count = lambda sql: conn.execute(sql, (name,)).fetchone()[0]   # noqa: E731
            gone = (count("SELECT count(*) FROM recipients WHERE domain = ?"),
                    count("SELECT count(*) FROM users WHERE domain = ?"))
            if conn.execute("DELETE FROM domains WHERE name = ?", (name,)).rowcount == 0:
                return None
            conn.execute("DELETE FROM users WHERE domain = ?", (name,))
            conn.execute("DELETE FROM password_policy WHERE scope = ?", (name,))
            _forget_scopes(conn, name)
            return gone

    def domain(self, name: str) -> dict:
        """Every per-domain option of a guarded domain (raises SettingError if not):
        next hop, anti-impersonation, mechanisms, password policy, its own scoped
        settings and check modes, and how many recipients and users it has."""
        name = normalise_domain(name)
        with self._tx() as conn:
            row = conn.execute("SELECT name, next_hop, anti_impersonation FROM domains "
                               "WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise SettingError(f"{name} is not a guarded domain")
            policy = (conn.execute("SELECT * FROM password_policy WHERE scope = ?", (name,)).fetchone()
                      or conn.execute("SELECT * FROM password_policy WHERE scope = '*'").fetchone())
            count = lambda sql: conn.execute(sql, (name,)).fetchone()[0]   # noqa: E731
            return {"name": row["name"], "unicode": domain_unicode(row["name"]), "next_hop": row["next_hop"],
                    "anti_impersonation": bool(row["anti_impersonation"]),
                    "mechanisms": [r[0] for r in conn.execute(
                        "SELECT mechanism FROM domain_mechanisms WHERE domain = ? ORDER BY mechanism", (name,))],
                    "password_policy": _policy_row(policy) if policy else None,
                    "settings": {r[0]: r[1] for r in conn.execute(
                        "SELECT key, value FROM scoped_settings WHERE scope = ? ORDER BY key", (name,))},
                    "check_modes": {r[0]: r[1] for r in conn.execute(
                        "SELECT check_name, mode FROM check_modes WHERE scope = ? ORDER BY check_name", (name,))},
                    "recipients": count("SELECT count(*) FROM recipients WHERE domain = ?"),
                    "users": count("SELECT count(*) FROM users WHERE domain = ?")}

    def is_guarded(self, name: str) -> bool:
        name = normalise_domain(name)
        with self._tx() as conn:
            return conn.execute("SELECT 1 FROM domains WHERE name = ?", (name,)).fetchone() is not None

    def domains(self) -> list[DomainRow]:
        with self._tx() as conn:
            return [DomainRow(r["name"], r["next_hop"])
                    for r in conn.execute("SELECT name, next_hop FROM domains ORDER BY name")]

    # recipients
    def add_recipient(self, address: str) -> str:
        return self.add_recipients([address])[0]

    def add_recipients(self, addresses: list[str], *, lines: list[int] | None = None,
                       progress: Callable[[int], None] | None = None) -> list[str]:
        """Add many recipients in one transaction: all or nothing. A bad entry raises
        SettingError naming its line (``lines[i]``, e.g. in the file it came from) or
        its position when there are several."""
        items = list(addresses)
        rows = []
        with self._tx() as conn:
            guarded = {r[0] for r in conn.execute("SELECT name FROM domains")}
            for n, address in enumerate(items, 1):
                try:
                    normal = normalise_address(address)
                    domain = normal.rpartition("@")[2]
                    if domain not in guarded:
                        raise SettingError(f"{domain} is not a guarded domain; add it with "
                                           f"`mailbox-guard domains add {domain}`")
                except SettingError as exc:
                    where = f"line {lines[n - 1]}: " if lines else f"entry {n}: " if len(items) > 1 else ""
                    raise SettingError(f"{where}{exc}") from None
                rows.append((normal, domain))
                if progress is not None:
                    progress(1)
            now = time.time()
            conn.executemany("INSERT OR IGNORE INTO recipients (address, domain, created_at) "
                             "VALUES (?, ?, ?)", [(a, d, now) for a, d in rows])
        return [a for a, _ in rows]

    def remove_recipient(self, address: str) -> bool:
        address = normalise_address(address)
        with self._tx() as conn:
            return conn.execute("DELETE FROM recipients WHERE address = ?", (address,)).rowcount > 0

    def recipients(self, domain: str | None = None) -> list[str]:
        with self._tx() as conn:
            if domain:
                rows = conn.execute("SELECT address FROM recipients WHERE domain = ? ORDER BY address",
                                    (normalise_domain(domain),))
            else:
                rows = conn.execute("SELECT address FROM recipients ORDER BY domain, address")
            return [r[0] for r in rows]

    # networks
    def add_network(self, cidr: str, comment: str = "", *, force: bool = False) -> str:
        cidr = normalise_network(cidr)
        if not force and open_relay_networks([cidr]):
            raise SettingError(f"trusting {cidr} would make an open relay (public networks of /"
                               f"{OPEN_RELAY_PREFIX[ipaddress.ip_network(cidr).version]} or wider); "
                               "add --force if you mean it")
        with self._tx() as conn:
            conn.execute("INSERT INTO networks (cidr, comment, created_at) VALUES (?, ?, ?) "
                         "ON CONFLICT(cidr) DO UPDATE SET comment = excluded.comment",
                         (cidr, comment, time.time()))
        return cidr

    def remove_network(self, cidr: str) -> bool:
        cidr = normalise_network(cidr)
        with self._tx() as conn:
            return conn.execute("DELETE FROM networks WHERE cidr = ?", (cidr,)).rowcount > 0

    def networks(self) -> list[dict]:
        with self._tx() as conn:
            return [dict(r) for r in conn.execute("SELECT cidr, comment FROM networks ORDER BY cidr")]

    # listeners
    @staticmethod
    def listener_row(name: str, kind: str, address: str, *, require_auth: bool = False,
                     plaintext_auth: bool = False) -> dict:
        if kind not in ("inbound", "submission", "smtps"):
            raise SettingError(f"unknown listener kind {kind!r} (inbound, submission, smtps)")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
            raise SettingError(f"bad listener name {name!r} (letters, digits, - and _)")
        host, port = parse_endpoint(address)
        if plaintext_auth:
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                raise SettingError("AUTH without TLS is allowed only on a loopback listener "
                                   "(127.0.0.1, ::1)")
        return {"name": name, "kind": kind, "host": host, "port": port,
                "require_auth": bool(require_auth), "plaintext_auth": bool(plaintext_auth)}

    def add_listener(self, name: str, kind: str, address: str, *, require_auth: bool = False,
                     plaintext_auth: bool = False) -> dict:
        row = self.listener_row(name, kind, address, require_auth=require_auth,
                                plaintext_auth=plaintext_auth)
        with self._tx() as conn:
            conn.execute("INSERT INTO listeners (name, kind, host, port, require_auth, plaintext_auth) "
                         "VALUES (:name, :kind, :host, :port, :require_auth, :plaintext_auth) "
                         "ON CONFLICT(name) DO UPDATE SET kind=excluded.kind, host=excluded.host, "
                         "port=excluded.port, require_auth=excluded.require_auth, "
                         "plaintext_auth=excluded.plaintext_auth", row)
        return row

    def remove_listener(self, name: str) -> bool:
        with self._tx() as conn:
            return conn.execute("DELETE FROM listeners WHERE name = ?", (name,)).rowcount > 0

    def listeners(self) -> list[dict]:
        with self._tx() as conn:
            return [dict(r, require_auth=bool(r["require_auth"]), plaintext_auth=bool(r["plaintext_auth"]))
                    for r in conn.execute("SELECT name, kind, host, port, require_auth, plaintext_auth "
                                          "FROM listeners ORDER BY name")]

    # settings
    def set_setting(self, key: str, value: str) -> Any:
        parsed = parse_setting(key, value)
        with self._tx() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, str(value)))
        return parsed

    def unset_setting(self, key: str) -> bool:
        if key not in SETTINGS:
            raise SettingError(f"unknown setting {key!r}")
        with self._tx() as conn:
            return conn.execute("DELETE FROM settings WHERE key = ?", (key,)).rowcount > 0

    def settings(self) -> dict[str, str]:
        with self._tx() as conn:
            return {r[0]: r[1] for r in conn.execute("SELECT key, value FROM settings")}

    # scopes: the server (''), a guarded domain, or an address of a guarded domain
    def scope_of(self, domain: str | None = None, user: str | None = None) -> str:
        """The scope ``--domain`` / ``--user`` name, normalised and checked: '' for the
        server, a guarded domain, or an address (a user's or any recipient's) of a
        guarded domain. SettingError (one line) otherwise."""
        if domain is not None and user is not None:
            raise SettingError("give a domain or a user, not both")
        if domain is None and user is None:
            return ""
        scope = normalise_scope(user if user is not None else domain, user=user is not None)
        with self._tx() as conn:
            _check_scope(conn, scope)
        return scope

    def set_scoped_setting(self, scope: str, key: str, value: str) -> Any:
        """A domain's or a user's own value of a scoped setting (validated by the setting)."""
        scope = normalise_scope(scope)
        if not scope:
            return self.set_setting(key, value)
        parsed = parse_scoped_setting(key, value)
        with self._tx() as conn:
            _check_scope(conn, scope)
            conn.execute("INSERT INTO scoped_settings (scope, key, value) VALUES (?, ?, ?) "
                         "ON CONFLICT(scope, key) DO UPDATE SET value = excluded.value", (scope, key, str(value)))
        return parsed

    def unset_scoped_setting(self, scope: str, key: str) -> bool:
        scope = normalise_scope(scope)
        if not scope:
            return self.unset_setting(key)
        parse_scoped_setting(key, None)
        with self._tx() as conn:
            return conn.execute("DELETE FROM scoped_settings WHERE scope = ? AND key = ?",
                                (scope, key)).rowcount > 0

    def scoped_settings(self, scope: str | None = None) -> list[dict]:
        """Rows {scope, key, value}: of one scope, or of every scope."""
        with self._tx() as conn:
            if scope is None:
                rows = conn.execute("SELECT scope, key, value FROM scoped_settings ORDER BY scope, key")
            else:
                rows = conn.execute("SELECT scope, key, value FROM scoped_settings WHERE scope = ? ORDER BY key",
                                    (normalise_scope(scope),))
            return [dict(r) for r in rows]

    # check modes (which checks exist is the caller's to know: the store knows no checks)
    def set_check_mode(self, check: str, mode: str, scope: str = "") -> str:
        scope, mode = normalise_scope(scope), parse_mode(mode)
        with self._tx() as conn:
            _check_scope(conn, scope)
            conn.execute("INSERT INTO check_modes (check_name, scope, mode) VALUES (?, ?, ?) "
                         "ON CONFLICT(check_name, scope) DO UPDATE SET mode = excluded.mode", (check, scope, mode))
        return mode

    def reset_check_mode(self, check: str, scope: str = "") -> bool:
        """Remove a scope's own mode for a check; False when it had none."""
        with self._tx() as conn:
            return conn.execute("DELETE FROM check_modes WHERE check_name = ? AND scope = ?",
                                (check, normalise_scope(scope))).rowcount > 0

    def check_modes(self) -> list[dict]:
        """Rows {check, scope, mode}, the server's ('') first."""
        with self._tx() as conn:
            return [dict(r) for r in conn.execute(
                "SELECT check_name AS \"check\", scope, mode FROM check_modes ORDER BY check_name, scope != '', scope")]


MODES = tuple(m.value for m in Mode)


def parse_mode(text: str) -> str:
    value = str(text).strip().lower()
    if value not in MODES:
        raise SettingError(f"unknown mode {text!r} (enforce, warn or off)")
    return value


def parse_scoped_setting(key: str, value: str | None) -> Any:
    """Check that ``key`` may be set per domain or user, and parse ``value`` (unless None)."""
    setting = SETTINGS.get(key)
    if setting is None:
        raise SettingError(f"unknown setting {key!r}; `mailbox-guard config show` lists them")
    if not setting.scoped:
        scoped = ", ".join(k for k, s in SETTINGS.items() if s.scoped)
        raise SettingError(f"{key} applies to the whole server; only these may be set per domain or user: {scoped}")
    return None if value is None else setting.parse(value)


def normalise_scope(text: str, *, user: bool | None = None) -> str:
    """A scope as stored: '' (the server), a domain, or an address (``user``: must be
    an address; False: must be a domain; None: either, by the '@')."""
    text = str(text or "").strip()
    if not text:
        if user is None:
            return ""
        raise SettingError(f"an empty {'user' if user else 'domain'} is not a scope")
    if user or (user is None and "@" in text):
        # Lower-cased whole: the policy looks recipients up that way.
        return normalise_address(text).lower()
    if "@" in text:
        raise SettingError(f"{text!r} is an address, not a domain (use --user for one address)")
    return normalise_domain(text)


def _check_scope(conn: sqlite3.Connection, scope: str) -> None:
    if not scope:
        return
    domain = scope.rpartition("@")[2]
    if conn.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone() is None:
        what = f"{scope}: " if "@" in scope else ""
        raise SettingError(f"{what}{domain} is not a guarded domain; add it with `mailbox-guard domains add {domain}`")


def _forget_scopes(conn: sqlite3.Connection, domain: str) -> None:
    """A domain that goes takes its own and its addresses' settings and check modes."""
    like = "%@" + domain.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    for table in ("scoped_settings", "check_modes"):
        conn.execute(f"DELETE FROM {table} WHERE scope = ? OR scope LIKE ? ESCAPE '\\'", (domain, like))


def policy_sections(conn: sqlite3.Connection) -> dict[str, Any]:
    """The policy as named sections of plain rows, for
    :meth:`mailbox_guard.policy.snapshot.Policy.from_sections` (read in one
    transaction, so that the sections belong to one version)."""
    conn.execute("BEGIN")
    try:
        version = int(conn.execute("SELECT value FROM meta WHERE key='policy_version'").fetchone()[0])

        def rows(sql: str) -> list[dict]:
            cur = conn.execute(sql)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur]
        return {
            "version": version,
            "domains": rows("SELECT name, next_hop, anti_impersonation FROM domains"),
            "recipients": [r[0] for r in conn.execute("SELECT address FROM recipients")],
            "networks": [r[0] for r in conn.execute("SELECT cidr FROM networks")],
            "settings": {r[0]: r[1] for r in conn.execute("SELECT key, value FROM settings")},
            "legacy_mechanisms": rows("SELECT domain, mechanism FROM domain_mechanisms"),
            "scoped_settings": rows("SELECT scope, key, value FROM scoped_settings"),
            "check_modes": rows("SELECT check_name AS 'check', scope, mode FROM check_modes"),
        }
    finally:
        conn.execute("COMMIT")


def state_versions(conn: sqlite3.Connection) -> tuple[int, int]:
    """(policy_version, bans_version): what the engine polls each second."""
    values = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('policy_version', 'bans_version')"))
    return int(values.get("policy_version", 0)), int(values.get("bans_version", 0))


def ensure_home(home: Path) -> Path:
    """Create the home folder (0750) and the store in it; return the store's path."""
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o750)
    except OSError as exc:
        raise StoreError(f"cannot create home folder {home}: {exc.strerror}") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise StoreError(f"home folder {home} is not writable by this user")
    path = home / DB_NAME
    initialise(path)
    return path
