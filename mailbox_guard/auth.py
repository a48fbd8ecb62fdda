"""Authentication for SMTP AUTH: password checks off the event loop, failure
counting per client address and per user, and bans that refuse further attempts
early. The same answer for an unknown user, a disabled user and a wrong password.

Every mechanism first turns the login it was given into one canonical form
(:func:`normalise_login`); bans, failure counters and the account lookup all use
that form, so `Alice@Example.org ` is not a fresh login that escapes a ban.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import os
import time
from typing import TYPE_CHECKING

from .users import Account, hash_password, load_account, verify_password

if TYPE_CHECKING:   # pragma: no cover
    from .engine import Engine

log = logging.getLogger("mailbox_guard.auth")

MAX_LOGIN = 320


def normalise_login(text: str) -> str | None:
    """The canonical login, or None for one that can name no account (whitespace or
    control characters inside, too long): such logins fail like a wrong password."""
    login = text.strip().lower()
    if not login or len(login) > MAX_LOGIN or any(c.isspace() or not c.isprintable() for c in login):
        return None
    return login


def printable(text: str, limit: int = 128) -> str:
    return "".join(c if c.isprintable() and not c.isspace() or c == " " else "?" for c in text)[:limit]


def _salt_key(path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""                  # the first use: made below
    except OSError as exc:
        log.warning("cannot read %s (%s): using a new key", path, exc.strerror)
        data = b""
    if len(data) == 32:
        return data
    data = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:        # still works for this run; the next may differ
        log.warning("cannot keep %s: %s", path, exc.strerror)
    return data


class AuthService:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.failures: dict[tuple[str, str], collections.deque[float]] = {}
        self.bans: dict[tuple[str, str], float] = {}
        # For SCRAM answers about logins that cannot log in: a salt that stays the
        # same for the same login, as a real account's does (kept in the home folder,
        # so a restart does not change it either).
        self._salt_key: bytes | None = None      # read when first needed (home exists by then)

    async def load_bans(self) -> None:
        now = time.time()
        rows = await self.engine.readers.run(lambda c: c.execute(
            "SELECT kind, key, until FROM auth_bans WHERE until > ?", (now,)).fetchall())
        self.bans = {(r[0], r[1].lower()): r[2] for r in rows}

    def banned(self, kind: str, key: str) -> bool:
        until = self.bans.get((kind, key.lower()))
        return until is not None and until > time.time()

    def refused(self, ip: str, login: str | None) -> bool:
        return self.banned("ip", ip) or (login is not None and self.banned("user", login))

    async def account(self, login: str | None) -> Account | None:
        """The account a (normalised) login names, if it may log in at all."""
        if login is None:
            return None
        account = await self.engine.readers.run(lambda c: load_account(c, login))
        return account if account is not None and not account.disabled else None

    def dummy_salt(self, login: str) -> bytes:
        if self._salt_key is None:
            self._salt_key = _salt_key(self.engine.home / "scram-salt.key")
        return hmac.new(self._salt_key, login.encode(), hashlib.sha256).digest()[:16]

    async def failed(self, ip: str, login: str | None) -> None:
        """Count a failure. A success forgets nothing: failures age out of their window
        (clearing them would let one owned account reset the count for guesses on
        others)."""
        await self._failed(ip, login, self.engine.policy.settings)

    async def check_password(self, login: str | None, password: str) -> Account | None:
        """The account when the password is right, else None. The caller has checked
        for bans (a banned login is refused before any hashing: a ban is about the
        client or the login, not about whether an account exists) and counts failures,
        as for every mechanism."""
        account = await self.account(login)
        # Always pay for one verification, so that timing tells nothing.
        ok, rehash = await asyncio.to_thread(verify_password, account.password_hash if account else None,
                                             password)
        if ok and account is not None:
            if rehash:
                new_hash = await asyncio.to_thread(hash_password, password)
                await self.engine.writer.run(lambda c: c.execute(
                    "UPDATE users SET password_hash = ? WHERE name = ?", (new_hash, account.name)))
                log.info("password hash of %s upgraded to the current parameters", account.name)
            return account
        return None

    async def _failed(self, ip: str, login: str | None, settings) -> None:
        now = time.time()
        window = settings["auth.ban_window"]
        targets = [("ip", ip, settings["auth.ban_after"])]
        if login is not None:
            targets.append(("user", login, settings["auth.user_ban_after"]))
        for kind, key, limit in targets:
            if not limit:
                continue
            q = self.failures.setdefault((kind, key), collections.deque(maxlen=limit))
            q.append(now)
            if len(q) >= limit and now - q[0] <= window and not self.banned(kind, key):
                until = now + settings["auth.ban_time"]
                self.bans[(kind, key)] = until
                q.clear()
                log.warning("auth: %s %s banned until %s after %d failures", kind, printable(key),
                            time.strftime("%H:%M:%S", time.localtime(until)), limit)
                try:
                    await self.engine.writer.run(lambda c, kind=kind, key=key, until=until, n=limit: c.execute(
                        "INSERT INTO auth_bans (kind, key, until, failures, created_at) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT(kind, key) DO UPDATE SET until = excluded.until, "
                        "failures = excluded.failures", (kind, key, until, n, now)))
                except Exception as exc:      # the ban still holds in memory
                    log.error("could not store the ban of %s: %s", printable(key), exc)
        if len(self.failures) > 100000:       # bounded: forget the oldest counters
            for k in list(self.failures)[:50000]:
                del self.failures[k]
