"""Users of the gateway: argon2id password hashes, aliases, the password strength
policy (server and domain level); listing and lifting brute-force bans (their
statements are in :mod:`mailbox_guard.auth.bans`).

Hashes use argon2id with at least OWASP's parameters (19 MiB, 2 iterations); a hash
made with older parameters is replaced at the next successful login. Verification is
CPU-heavy and runs off the event loop (the engine calls it in a thread). An unknown
user is verified against a dummy hash so that the answer and its timing do not tell
whether the user exists.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from mailbox_guard.auth import bans
from mailbox_guard.config import SettingError
from mailbox_guard.store.db import LEGACY_MECHANISMS, PolicyStore, normalise_domain, normalise_user

HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16,
                        type=Type.ID)


@functools.cache
def dummy_hash() -> str:
    # Made by the engine at start (so that the first unknown login takes as long as
    # any), not at import: every CLI command imports this module.
    return HASHER.hash("no such user: this hash only makes failures take as long")


@dataclass(frozen=True)
class PasswordPolicy:
    scope: str = "*"
    min_length: int = 12
    min_classes: int = 3          # of lower, upper, digit, other
    reject_common: bool = True
    reject_name: bool = True


DEFAULT_POLICY = PasswordPolicy()


def _common_passwords() -> frozenset[str]:
    text = resources.files("mailbox_guard").joinpath("data/common-passwords.txt").read_text(encoding="utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip())


def check_password(password: str, user: str, policy: PasswordPolicy) -> None:
    """Raise SettingError naming the first rule the password breaks."""
    if len(password) < policy.min_length:
        raise SettingError(f"password too short: at least {policy.min_length} characters "
                           f"(policy {policy.scope})")
    classes = sum(bool(re.search(p, password)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^a-zA-Z0-9]"))
    if classes < policy.min_classes:
        raise SettingError(f"password needs {policy.min_classes} of: lower-case, upper-case, digits, "
                           f"other characters (it has {classes}; policy {policy.scope})")
    lowered = password.lower()
    if policy.reject_name:
        local = user.split("@")[0].lower()
        if len(local) >= 3 and (local in lowered or user.lower() in lowered):
            raise SettingError(f"password must not contain the user name (policy {policy.scope})")
    if policy.reject_common and lowered in _common_passwords():
        raise SettingError(f"password is on the list of common passwords (policy {policy.scope})")


def hash_password(password: str) -> str:
    return HASHER.hash(password)


SCRAM_ITERATIONS = 4096      # RFC 7677's minimum; the work is on the client too
# Given explicitly (not scramp's default), because the answers for unknown logins
# must carry salts of exactly this length.
SCRAM_SALT_BYTES = 32


def mechanism_secrets(user: str, domain: str, password: str, legacy: set[str]) -> dict[str, str]:
    """What the SASL mechanisms need, derived from the password at the moment it is
    set: SCRAM's salted keys always; DIGEST-MD5's H(user:realm:password) only where
    the domain enabled it (it is password-equivalent). Never the password itself."""
    from scramp import ScramMechanism
    salt, stored_key, server_key, iterations = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=SCRAM_ITERATIONS, salt=os.urandom(SCRAM_SALT_BYTES))
    out = {"SCRAM-SHA-256": json.dumps({"salt": base64.b64encode(salt).decode(),
                                        "stored_key": base64.b64encode(stored_key).decode(),
                                        "server_key": base64.b64encode(server_key).decode(),
                                        "iterations": iterations})}
    if "DIGEST-MD5" in legacy:
        out["DIGEST-MD5"] = hashlib.md5(f"{user}:{domain}:{password}".encode()).hexdigest()
    if "CRAM-MD5" in legacy:
        from mailbox_guard.auth.cram_md5 import derive
        out["CRAM-MD5"] = derive(password)
    return out


def _store_secrets(conn: sqlite3.Connection, user: str, domain: str, password: str) -> None:
    legacy = {r[0] for r in conn.execute("SELECT mechanism FROM domain_mechanisms WHERE domain = ?", (domain,))}
    conn.execute("DELETE FROM user_secrets WHERE user = ?", (user,))
    conn.executemany("INSERT INTO user_secrets (user, mechanism, secret) VALUES (?, ?, ?)",
                     [(user, m, v) for m, v in mechanism_secrets(user, domain, password, legacy).items()])


def set_password_hash(conn: sqlite3.Connection, name: str, password_hash: str, password: str) -> None:
    """A new hash and new mechanism secrets for the same password (at login)."""
    row = conn.execute("SELECT domain FROM users WHERE name = ?", (name,)).fetchone()
    if row is not None:
        conn.execute("UPDATE users SET password_hash = ? WHERE name = ?", (password_hash, name))
        _store_secrets(conn, name, row[0], password)


def scram_current(account: "Account") -> bool:
    """Whether the account's SCRAM keys have today's shape (salt length, iterations)."""
    try:
        keys = json.loads(account.secrets["SCRAM-SHA-256"])
        return (len(base64.b64decode(keys["salt"])) == SCRAM_SALT_BYTES
                and keys["iterations"] == SCRAM_ITERATIONS)
    except (KeyError, ValueError, TypeError):
        return False


def verify_password(stored_hash: str | None, password: str) -> tuple[bool, bool]:
    """(matches, needs_rehash). Blocking: call it in a thread."""
    try:
        HASHER.verify(stored_hash or dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False, False
    if stored_hash is None:
        return False, False
    return True, HASHER.check_needs_rehash(stored_hash)


class UserStore:
    """User administration on the store (CLI; the engine only reads)."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store

    def policy_for(self, conn: sqlite3.Connection, domain: str) -> PasswordPolicy:
        for scope in (domain, "*"):
            row = conn.execute("SELECT scope, min_length, min_classes, reject_common, reject_name "
                               "FROM password_policy WHERE scope = ?", (scope,)).fetchone()
            if row:
                return PasswordPolicy(row[0], row[1], row[2], bool(row[3]), bool(row[4]))
        return DEFAULT_POLICY

    def add(self, name: str, password: str) -> str:
        name, domain = normalise_user(name)
        with self.store._tx() as conn:
            if conn.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone() is None:
                raise SettingError(f"{domain} is not a guarded domain; add it first")
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise SettingError(f"user {name} exists; use `users passwd` to change the password")
            check_password(password, name, self.policy_for(conn, domain))
            now = time.time()
            conn.execute("INSERT INTO users (name, domain, password_hash, created_at, changed_at) "
                         "VALUES (?, ?, ?, ?, ?)", (name, domain, hash_password(password), now, now))
            _store_secrets(conn, name, domain, password)
        return name

    def passwd(self, name: str, password: str) -> str:
        name, domain = normalise_user(name)
        with self.store._tx() as conn:
            self._exists(conn, name)
            check_password(password, name, self.policy_for(conn, domain))
            conn.execute("UPDATE users SET password_hash = ?, changed_at = ? WHERE name = ?",
                         (hash_password(password), time.time(), name))
            _store_secrets(conn, name, domain, password)
        return name

    def set_disabled(self, name: str, disabled: bool) -> str:
        name, _ = normalise_user(name)
        with self.store._tx() as conn:
            self._exists(conn, name)
            conn.execute("UPDATE users SET disabled = ? WHERE name = ?", (int(disabled), name))
        return name

    def remove(self, name: str) -> bool:
        name, _ = normalise_user(name)
        with self.store._tx() as conn:
            return conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    def list(self) -> list[dict]:
        with self.store._tx() as conn:
            rows = conn.execute(
                "SELECT u.name, u.disabled, u.changed_at, (SELECT group_concat(address, ', ') FROM "
                "user_aliases a WHERE a.user = u.name) AS aliases FROM users u ORDER BY u.domain, u.name")
            return [{"name": r[0], "disabled": bool(r[1]), "password_changed": r[2], "aliases": r[3] or ""}
                    for r in rows]

    def add_alias(self, name: str, address: str) -> str:
        name, _ = normalise_user(name)
        address, _ = normalise_user(address)
        with self.store._tx() as conn:
            self._exists(conn, name)
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (address,)).fetchone():
                raise SettingError(f"{address} is a user of its own")
            conn.execute("INSERT INTO user_aliases (address, user) VALUES (?, ?) "
                         "ON CONFLICT(address) DO UPDATE SET user = excluded.user", (address, name))
        return address

    def remove_alias(self, address: str) -> bool:
        address, _ = normalise_user(address)
        with self.store._tx() as conn:
            return conn.execute("DELETE FROM user_aliases WHERE address = ?", (address,)).rowcount > 0

    def set_policy(self, scope: str, *, min_length: int, min_classes: int, reject_common: bool,
                   reject_name: bool) -> PasswordPolicy:
        scope = "*" if scope in ("*", "", None) else normalise_domain(scope)
        if not 8 <= min_length <= 1024:
            raise SettingError("minimum length must be between 8 and 1024")
        if not 1 <= min_classes <= 4:
            raise SettingError("character classes must be between 1 and 4")
        with self.store._tx() as conn:
            conn.execute("INSERT INTO password_policy (scope, min_length, min_classes, reject_common, "
                         "reject_name) VALUES (?, ?, ?, ?, ?) ON CONFLICT(scope) DO UPDATE SET "
                         "min_length = excluded.min_length, min_classes = excluded.min_classes, "
                         "reject_common = excluded.reject_common, reject_name = excluded.reject_name",
                         (scope, min_length, min_classes, int(reject_common), int(reject_name)))
        return PasswordPolicy(scope, min_length, min_classes, reject_common, reject_name)

    def policies(self) -> list[dict]:
        with self.store._tx() as conn:
            rows = [dict(r) for r in conn.execute("SELECT * FROM password_policy ORDER BY scope")]
        if not any(r["scope"] == "*" for r in rows):
            d = DEFAULT_POLICY
            rows.insert(0, {"scope": "*", "min_length": d.min_length, "min_classes": d.min_classes,
                            "reject_common": 1, "reject_name": 1})
        return rows

    def set_mechanism(self, domain: str, mechanism: str, enabled: bool) -> None:
        domain = normalise_domain(domain)
        mechanism = mechanism.upper()
        if mechanism not in LEGACY_MECHANISMS:
            raise SettingError(f"only {', '.join(sorted(LEGACY_MECHANISMS))} are switched per domain")
        with self.store._tx() as conn:
            if conn.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone() is None:
                raise SettingError(f"{domain} is not a guarded domain")
            if enabled:
                conn.execute("INSERT OR IGNORE INTO domain_mechanisms (domain, mechanism) VALUES (?, ?)",
                             (domain, mechanism))
            else:
                conn.execute("DELETE FROM domain_mechanisms WHERE domain = ? AND mechanism = ?",
                             (domain, mechanism))
                conn.execute("DELETE FROM user_secrets WHERE mechanism = ? AND user IN "
                             "(SELECT name FROM users WHERE domain = ?)", (mechanism, domain))

    def bans(self) -> list[dict]:
        with self.store._tx() as conn:
            return bans.active(conn, time.time())

    def unban(self, key: str) -> bool:
        with self.store._tx() as conn:
            return bans.remove(conn, key)

    @staticmethod
    def _exists(conn: sqlite3.Connection, name: str) -> None:
        if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
            raise SettingError(f"no user {name}")


# ------------------------------------------------------------------ engine side


@dataclass(frozen=True)
class Account:
    name: str
    domain: str
    password_hash: str
    disabled: bool
    addresses: frozenset[str]          # lower-case: its own address and its aliases
    secrets: dict                      # mechanism -> derived secret


def load_account(conn: sqlite3.Connection, login: str) -> Account | None:
    row = conn.execute("SELECT name, domain, password_hash, disabled FROM users WHERE name = ?",
                       (login.strip(),)).fetchone()
    if row is None:
        return None
    aliases = [r[0].lower() for r in conn.execute("SELECT address FROM user_aliases WHERE user = ?",
                                                  (row[0],))]
    secrets = dict(conn.execute("SELECT mechanism, secret FROM user_secrets WHERE user = ?", (row[0],)).fetchall())
    enabled = {r[0] for r in conn.execute("SELECT mechanism FROM domain_mechanisms WHERE domain = ?", (row[1],))}
    secrets = {m: v for m, v in secrets.items() if m not in LEGACY_MECHANISMS or m in enabled}
    return Account(row[0], row[1], row[2], bool(row[3]), frozenset([row[0].lower(), *aliases]), secrets)
