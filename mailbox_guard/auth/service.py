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
import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mailbox_guard.auth import bans as stored_bans
from mailbox_guard.auth.users import (SCRAM_SALT_BYTES, Account, hash_password, load_account, scram_current,
                                      set_password_hash, verify_password)
from mailbox_guard.text import printable

if TYPE_CHECKING:   # pragma: no cover
    from mailbox_guard.store.db import Readers
    from mailbox_guard.store.writer import Writer

log = logging.getLogger("mailbox_guard.auth")

MAX_LOGIN = 320


def normalise_login(text: str) -> str | None:
    """The canonical login, or None for one that can name no account (whitespace or
    control characters inside, too long): such logins fail like a wrong password."""
    login = text.strip().lower()
    if not login or len(login) > MAX_LOGIN or any(c.isspace() or not c.isprintable() for c in login):
        return None
    return login


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


def remember_network(conn, login: str, network: str, now: float) -> None:
    """(In the store writer) the network ``login`` last logged in from, and when."""
    conn.execute("INSERT INTO auth_known (login, network, last_seen) VALUES (?, ?, ?) "
                 "ON CONFLICT(login, network) DO UPDATE SET last_seen = excluded.last_seen",
                 (login, network, now))


def network_of(ip: str) -> str:
    """The network a client address is penalised with: its /24 (IPv4) or /64 (IPv6)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(ipaddress.ip_network(f"{addr}/{24 if addr.version == 4 else 64}", strict=False))


def penalty_delay(failures: int, after: int, longest: float) -> float:
    """Seconds a try for a login with ``failures`` recent failures waits, from a network
    it never logged in from: none before ``after`` failures (0: never), then 1 s,
    doubling with each further failure, at most ``longest``."""
    if not after or failures < after:
        return 0.0
    return min(longest, 2.0 ** min(failures - after, 16))


# A network a login succeeded from stays known this long after the last success.
KNOWN_FOR = 180 * 86400


class AuthService:
    """Failures are counted per client address, per network and per login. Sources
    are banned (an address, a /24 or /64); accounts never are: a login under attack
    makes clients on networks it never succeeded from wait before each try (Dovecot's
    auth penalty), while its owner's networks log in as usual."""

    def __init__(self, *, policy: Callable[[], Any], readers: "Readers", writer: "Writer", home: Path) -> None:
        self.policy = policy            # the current policy snapshot (auth.* settings)
        self.readers = readers
        self.writer = writer
        self.home = home                # keeps the key of the dummy SCRAM salts
        self.failures: dict[tuple[str, str], collections.deque[float]] = {}
        self.bans: dict[str, float] = {}             # address or network -> until
        self.known: dict[str, dict[str, float]] = {}  # login -> network -> last success
        # For SCRAM answers about logins that cannot log in: a salt that stays the
        # same for the same login, as a real account's does (kept in the home folder,
        # so a restart does not change it either).
        self._salt_key: bytes | None = None      # read when first needed (home exists by then)

    async def load_bans(self) -> None:
        now = time.time()
        self.bans = await self.readers.run(lambda c: stored_bans.address_bans(c, now))

    async def load_known(self) -> None:
        rows = await self.readers.run(lambda c: c.execute(
            "SELECT login, network, last_seen FROM auth_known WHERE last_seen > ?",
            (time.time() - KNOWN_FOR,)).fetchall())
        self.known = {}
        for login, network, seen in rows:
            self.known.setdefault(login, {})[network] = seen

    def _banned(self, key: str, now: float) -> bool:
        until = self.bans.get(key)
        return until is not None and until > now

    def refused(self, ip: str) -> bool:
        """Whether the client's address or network is banned."""
        now = time.time()
        return self._banned(ip.lower(), now) or self._banned(network_of(ip), now)

    async def gate(self, ip: str, login: str | None) -> bool:
        """Before a try: wait out the penalty of a login under attack when this
        client's network is not one it succeeded from; then True if the client is
        banned (it fails like a wrong password, after the same wait)."""
        settings = self.policy().settings
        after = settings["auth.penalty_after"]
        if after and login is not None:
            delay = penalty_delay(self._recent(("login", login), settings["auth.ban_window"]), after,
                                  settings["auth.penalty_max"])
            if delay and network_of(ip) not in self.known.get(login, {}):
                await asyncio.sleep(delay)
        return self.refused(ip)

    def _recent(self, key: tuple[str, str], window: float) -> int:
        q = self.failures.get(key)
        if not q:
            return 0
        edge = time.time() - window
        return sum(1 for t in q if t > edge)

    async def account(self, login: str | None) -> Account | None:
        """The account a (normalised) login names, if it may log in at all."""
        if login is None:
            return None
        account = await self.readers.run(lambda c: load_account(c, login))
        return account if account is not None and not account.disabled else None

    def dummy_salt(self, login: str) -> bytes:
        """As long as a real account's salt, and the same for the same login."""
        if self._salt_key is None:
            self._salt_key = _salt_key(self.home / "scram-salt.key")
        return hmac.new(self._salt_key, login.encode(), hashlib.sha256).digest()[:SCRAM_SALT_BYTES]

    async def succeeded(self, ip: str, login: str) -> None:
        """Remember the network a login succeeded from (written at most once a day
        per network, so a busy account costs no write per login)."""
        now = time.time()
        network = network_of(ip)
        seen = self.known.setdefault(login, {})
        if now - seen.get(network, 0) < 86400:
            return
        seen[network] = now
        try:
            await self.writer.run(remember_network, login, network, now)
        except Exception as exc:      # still known in memory for this run
            log.error("could not store a known network of %s: %s", printable(login, 128), exc)

    async def failed(self, ip: str, login: str | None) -> None:
        """Count a failure. A success forgets nothing: failures age out of their window
        (clearing them would let one owned account reset the count for guesses on
        others)."""
        settings = self.policy().settings
        now = time.time()
        window = settings["auth.ban_window"]
        if login is not None:
            q = self.failures.setdefault(("login", login), collections.deque(maxlen=64))
            q.append(now)
        for key, limit in ((ip.lower(), settings["auth.ban_after"]),
                           (network_of(ip), settings["auth.net_ban_after"])):
            if not limit:
                continue
            q = self.failures.setdefault(("ip", key), collections.deque(maxlen=limit))
            q.append(now)
            if len(q) >= limit and now - q[0] <= window and not self._banned(key, now):
                until = now + settings["auth.ban_time"]
                self.bans[key] = until
                q.clear()
                log.warning("auth: %s banned until %s after %d failures", printable(key, 128),
                            time.strftime("%H:%M:%S", time.localtime(until)), limit)
                try:
                    await self.writer.run(stored_bans.record, key, until, limit, now)
                except Exception as exc:      # the ban still holds in memory
                    log.error("could not store the ban of %s: %s", printable(key, 128), exc)
        if len(self.failures) > 100000:       # bounded: forget the oldest counters
            for k in list(self.failures)[:50000]:
                del self.failures[k]

    async def check_password(self, login: str | None, password: str) -> Account | None:
        """The account when the password is right, else None. The caller has checked
        for bans (a banned client is refused before any hashing) and counts failures,
        as for every mechanism."""
        account = await self.account(login)
        # Always pay for one verification, so that timing tells nothing.
        ok, rehash = await asyncio.to_thread(verify_password, account.password_hash if account else None,
                                             password)
        if ok and account is not None:
            if rehash or not scram_current(account):
                await self._rehash(account, password)
            return account
        return None

    async def _rehash(self, account: Account, password: str) -> None:
        """New argon2 parameters, or SCRAM keys of an older shape (a salt length that
        would tell it from the answers for unknown logins): made again from the
        password just verified."""
        new_hash = await asyncio.to_thread(hash_password, password)
        await self.writer.run(set_password_hash, account.name, new_hash, password)
        log.info("password hash of %s upgraded to the current parameters (and its SCRAM keys)", account.name)
