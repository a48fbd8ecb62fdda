"""Authentication for SMTP AUTH: password checks off the event loop, failure
counting per client address and per user, and bans that refuse further attempts
early. The same answer for an unknown user, a disabled user and a wrong password."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING

from .users import Account, hash_password, load_account, verify_password

if TYPE_CHECKING:   # pragma: no cover
    from .engine import Engine

log = logging.getLogger("mailbox_guard.auth")


class AuthService:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.failures: dict[tuple[str, str], collections.deque[float]] = {}
        self.bans: dict[tuple[str, str], float] = {}

    async def load_bans(self) -> None:
        now = time.time()
        rows = await self.engine.readers.run(lambda c: c.execute(
            "SELECT kind, key, until FROM auth_bans WHERE until > ?", (now,)).fetchall())
        self.bans = {(r[0], r[1].lower()): r[2] for r in rows}

    def banned(self, kind: str, key: str) -> bool:
        until = self.bans.get((kind, key.lower()))
        return until is not None and until > time.time()

    def refused(self, ip: str, login: str) -> bool:
        return self.banned("ip", ip) or self.banned("user", login)

    async def account(self, login: str) -> Account | None:
        """The account a login names, if it may log in at all (exists, enabled)."""
        account = await self.engine.readers.run(lambda c: load_account(c, login))
        return account if account is not None and not account.disabled else None

    def succeeded(self, ip: str) -> None:
        self.failures.pop(("ip", ip), None)

    async def failed(self, ip: str, login: str) -> None:
        await self._failed(ip, login, self.engine.policy.settings)

    async def login(self, login: str, password: str, ip: str) -> Account | None:
        """The account when the password is right and nobody is banned, else None."""
        settings = self.engine.policy.settings
        refused_early = self.banned("ip", ip) or self.banned("user", login)
        account = None if refused_early else await self.engine.readers.run(lambda c: load_account(c, login))
        usable = account is not None and not account.disabled
        # Always pay for one verification, so that timing tells nothing either.
        ok, rehash = await asyncio.to_thread(verify_password, account.password_hash if usable else None,
                                             password)
        if refused_early:
            return None       # already banned: not counted again (the ban would never end)
        if ok and usable:
            self.failures.pop(("ip", ip), None)
            if rehash:
                new_hash = await asyncio.to_thread(hash_password, password)
                await self.engine.writer.run(lambda c: c.execute(
                    "UPDATE users SET password_hash = ? WHERE name = ?", (new_hash, account.name)))
                log.info("password hash of %s upgraded to the current parameters", account.name)
            return account
        await self._failed(ip, login, settings)
        return None

    async def _failed(self, ip: str, login: str, settings) -> None:
        now = time.time()
        window = settings["auth.ban_window"]
        for kind, key, limit in (("ip", ip, settings["auth.ban_after"]),
                                 ("user", login.lower()[:320], settings["auth.user_ban_after"])):
            if not limit:
                continue
            q = self.failures.setdefault((kind, key), collections.deque(maxlen=limit))
            q.append(now)
            if len(q) >= limit and now - q[0] <= window and not self.banned(kind, key):
                until = now + settings["auth.ban_time"]
                self.bans[(kind, key)] = until
                q.clear()
                log.warning("auth: %s %s banned until %s after %d failures", kind, key,
                            time.strftime("%H:%M:%S", time.localtime(until)), limit)
                try:
                    await self.engine.writer.run(lambda c, kind=kind, key=key, until=until, n=limit: c.execute(
                        "INSERT INTO auth_bans (kind, key, until, failures, created_at) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT(kind, key) DO UPDATE SET until = excluded.until, "
                        "failures = excluded.failures", (kind, key, until, n, now)))
                except Exception as exc:      # the ban still holds in memory
                    log.error("could not store the ban of %s: %s", key, exc)
        if len(self.failures) > 100000:       # bounded: forget the oldest counters
            for k in list(self.failures)[:50000]:
                del self.failures[k]
