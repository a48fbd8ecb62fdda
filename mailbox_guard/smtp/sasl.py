"""SASL for SMTP AUTH: PLAIN, LOGIN, CRAM-MD5, DIGEST-MD5, GSSAPI, SCRAM-SHA-256.

:class:`Sasl` holds the mechanisms of one connection. It knows nothing of the
protocol object: it talks to the client through an :class:`Exchange` (a challenge
and its answer, a reply, a last word before closing), asks the engine's
:class:`~mailbox_guard.auth.service.AuthService` (bans, penalties, password checks in
a thread) and reports the outcome to the protocol-free session (the trace, the live
view). An unknown user goes through the same exchange as a known one.

aiosmtpd finds mechanisms as ``auth_<NAME>`` methods of the SMTP instance (collected
once, in its ``__init__``), so :class:`SaslMechanisms`, a mixin of
:class:`~mailbox_guard.smtp.protocol.GuardSMTP`, keeps one-line shims that hand each
AUTH over to the connection's :class:`Sasl`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from base64 import b64decode, b64encode
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from aiosmtpd.smtp import MISSING, AuthResult

from mailbox_guard import replies
from mailbox_guard.auth.service import normalise_login
from mailbox_guard.auth.users import SCRAM_ITERATIONS
from mailbox_guard.text import printable

if TYPE_CHECKING:   # pragma: no cover
    from mailbox_guard.auth.service import AuthService
    from mailbox_guard.session.session import Session

log = logging.getLogger("mailbox_guard.smtp")

_HEX32 = re.compile(r"[0-9a-f]{32}")
# RFC 4954 advertisement order asked for by admins' clients; only those implemented
# and enabled appear.
AUTH_ORDER = ("CRAM-MD5", "LOGIN", "PLAIN", "DIGEST-MD5", "GSSAPI", "SCRAM-SHA-256")
LOGIN_USERNAME = "Username:"
LOGIN_PASSWORD = "Password:"


class Exchange(Protocol):
    """How a mechanism talks to its client during AUTH."""

    async def challenge(self, text: str | bytes) -> Any:
        """Send a 334 challenge (base64-encoded here); the client's decoded answer,
        or ``MISSING`` when it aborted, sent bad base64 or an overlong line (the
        reply to that has been sent already)."""

    async def say(self, reply: str) -> None:
        """One reply line (counted like every error reply of the session)."""

    async def close_with(self, lines: Sequence[str]) -> None:
        """Say these lines and close the connection."""


def _aborted() -> AuthResult:
    # Whatever went wrong has been answered already (a 501 for "*" or bad base64).
    return AuthResult(success=False, handled=True)


class Sasl:
    """The SASL mechanisms of one connection; counts its failed AUTH attempts
    (``auth.session_failures`` of them end the connection)."""

    def __init__(self, exchange: Exchange, *, auth: "AuthService", session: "Session",
                 policy: Callable[[], Any], gssapi: Callable[[], Any], home: Path | None,
                 hostname: str) -> None:
        self.exchange = exchange
        self.auth = auth
        self.session = session                # the protocol-free session: trace and live view
        self.policy = policy                  # the current policy snapshot
        self.gssapi_availability = gssapi     # auth.kerberos availability, or None
        self.home = home                      # where the keytab is
        self.hostname = hostname
        self.failures = 0

    @property
    def facts(self):
        return self.session.facts

    async def _initial(self, args: list[str], challenge: str = "") -> Any:
        """The initial response of ``AUTH MECH [response]``, else the answer to a
        first challenge; ``MISSING`` (answered already) when there is none to use."""
        if len(args) == 1:
            return await self.exchange.challenge(challenge)
        try:
            return b64decode(args[1].encode(), validate=True)
        except ValueError:
            await self.exchange.say(replies.S501_AUTH_BASE64)
            return MISSING

    # PLAIN and LOGIN replace aiosmtpd's own, whose check runs synchronously (an
    # argon2 verification would stall every session); ours awaits the AuthService,
    # which verifies in a thread. aiosmtpd offers them only after TLS.
    async def plain(self, args: list[str]) -> AuthResult:
        blob = await self._initial(args)
        if blob is MISSING:
            return _aborted()
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return await self._refuse(replies.S501_AUTH_PLAIN)
        authzid, login, password = parts
        if authzid and authzid != login:
            # Acting for someone else is not allowed: fail like a bad password.
            return await self._password("PLAIN", login, b"\x00" + password)
        return await self._password("PLAIN", login, password)

    async def login(self, args: list[str]) -> AuthResult:
        login = await self._initial(args, LOGIN_USERNAME)
        if login is MISSING:
            return _aborted()
        password = await self.exchange.challenge(LOGIN_PASSWORD)
        if password is MISSING:
            return _aborted()
        return await self._password("LOGIN", login, password)

    async def _refuse(self, reply: str) -> AuthResult:
        await self.exchange.say(reply)
        return _aborted()

    async def _password(self, mechanism: str, login_b: bytes, password_b: bytes) -> AuthResult:
        try:
            login, password = login_b.decode("utf-8"), password_b.decode("utf-8")
        except UnicodeDecodeError:
            login, password = login_b.decode("utf-8", "replace"), "\x00"
        normalised = normalise_login(login)
        refused = await self.auth.gate(self.facts.peer_ip, normalised)
        account = None if refused else await self.auth.check_password(normalised, password)
        if account is not None:
            return await self._success(account, mechanism)
        return await self._failure(login, mechanism, counted=not refused)

    async def scram_sha_256(self, args: list[str]) -> AuthResult:
        """SCRAM-SHA-256 (RFC 7677) with scramp: the server keeps only salted keys;
        the password never crosses the wire. An unknown or disabled user, or a
        banned client, goes through the same exchange with throwaway keys."""
        from scramp import ScramException, ScramMechanism
        first = await self._initial(args)
        if first is MISSING:
            return _aborted()
        try:
            text = first.decode("utf-8")
            bare = text.split(",", 2)[2]
            login = next(a[2:] for a in bare.split(",") if a.startswith("n="))
            login = login.replace("=2C", ",").replace("=3D", "=")
        except (UnicodeDecodeError, IndexError, StopIteration):
            return await self._refuse(replies.S501_AUTH_SCRAM)
        raw_login, login = login, normalise_login(login)
        refused = await self.auth.gate(self.facts.peer_ip, login)
        # Looked up even when refused: the answer (salt, iterations) must not change
        # with a ban or show whether the account exists.
        account = await self.auth.account(login)
        secret = account.secrets.get("SCRAM-SHA-256") if account is not None else None
        if secret is not None:
            keys = json.loads(secret)
            auth_info = (b64decode(keys["salt"]), b64decode(keys["stored_key"]),
                         b64decode(keys["server_key"]), keys["iterations"])
        else:
            # A stable salt per login and throwaway keys: no PBKDF2 on the loop, and
            # nothing that tells an unknown login from a real one.
            auth_info = (self.auth.dummy_salt(login or raw_login), os.urandom(32), os.urandom(32),
                         SCRAM_ITERATIONS)
        server = ScramMechanism("SCRAM-SHA-256").make_server(lambda _user: auth_info)
        try:
            server.set_client_first(text)
            final = await self.exchange.challenge(server.get_server_first())
            if final is MISSING:
                # An abandoned exchange counts like a failure (else probing is free).
                await self._failure(raw_login, "SCRAM-SHA-256", counted=not refused, reply=False)
                return _aborted()
            server.set_client_final(final.decode("utf-8", "replace"))
            ok = secret is not None and not refused
        except ScramException:
            ok = False
        if not ok:
            return await self._failure(raw_login, "SCRAM-SHA-256", counted=not refused)
        # The server's proof goes in a last challenge; the client answers empty.
        if await self.exchange.challenge(server.get_server_final()) is MISSING:
            return _aborted()
        return await self._success(account, "SCRAM-SHA-256")

    async def gssapi(self, args: list[str]) -> AuthResult:
        """GSSAPI (RFC 4752): a Kerberos ticket; no security layer is offered (the
        connection is TLS already)."""
        from mailbox_guard.auth.kerberos import acceptor_credentials, user_for
        available = self.gssapi_availability()
        if not (available and available.available):
            return await self._refuse(replies.S504_AUTH_MECHANISM)
        import gssapi
        token = await self._initial(args)
        if token is MISSING:
            return _aborted()
        principal = "?"
        challenge = self.exchange.challenge
        try:
            creds = await asyncio.to_thread(acceptor_credentials, self.home, available.principal)
            ctx = gssapi.SecurityContext(creds=creds, usage="accept")
            for _round in range(10):
                out = await asyncio.to_thread(ctx.step, token)
                if ctx.complete:
                    break
                token = await challenge(out or b"")
                if token is MISSING:
                    return _aborted()
            else:
                raise ValueError("too many GSSAPI rounds")
            if out and await challenge(out) is MISSING:    # mutual authentication
                return _aborted()
            principal = str(ctx.initiator_name)
            # Security layer: none (bit 1), no maximum size.
            reply = await challenge(ctx.wrap(b"\x01\x00\x00\x00", False).message)
            if reply is MISSING:
                return _aborted()
            answer = ctx.unwrap(reply).message
            if len(answer) < 4 or not answer[0] & 1:
                raise ValueError("client asked for a security layer")
            authzid = answer[4:].decode("utf-8", "replace")
        except (gssapi.exceptions.GSSError, ValueError) as exc:
            log.info("conn=%s GSSAPI failed: %s", self.facts.connection_id, printable(str(exc), 200))
            return await self._failure(principal, "GSSAPI")
        realm = available.principal.rpartition("@")[2]
        login = normalise_login(user_for(principal)) if principal.endswith("@" + realm) or not realm else None
        refused = await self.auth.gate(self.facts.peer_ip, login)
        account = None if refused else await self.auth.account(login)
        if account is None or (authzid and normalise_login(authzid) != account.name.lower()):
            return await self._failure(principal, "GSSAPI", counted=not refused)
        return await self._success(account, "GSSAPI")

    async def cram_md5(self, args: list[str]) -> AuthResult:
        """CRAM-MD5, for domains that switched it on (see cram_md5.py)."""
        import hmac
        from mailbox_guard.auth import cram_md5
        if "CRAM-MD5" not in self.policy().legacy_mechanisms:
            return await self._refuse(replies.S504_AUTH_MECHANISM)
        if len(args) > 1:
            return await self._refuse(replies.S501_AUTH_NO_INITIAL.format(mechanism="CRAM-MD5"))
        challenge = f"<{os.urandom(8).hex()}.{int(time.time())}@{self.hostname}>".encode()
        answer = await self.exchange.challenge(challenge)
        if answer is MISSING:
            return _aborted()
        raw_login, _, digest = answer.decode("utf-8", "replace").rpartition(" ")
        login = normalise_login(raw_login)
        refused = await self.auth.gate(self.facts.peer_ip, login)
        account = None if refused else await self.auth.account(login)
        secret = account.secrets.get("CRAM-MD5") if account is not None else None
        digest = digest.lower()
        good = (secret is not None and _HEX32.fullmatch(digest) is not None
                and hmac.compare_digest(cram_md5.expected(secret, challenge).encode(), digest.encode()))
        if not good:
            return await self._failure(raw_login or "?", "CRAM-MD5", counted=not refused)
        return await self._success(account, "CRAM-MD5")

    async def digest_md5(self, args: list[str]) -> AuthResult:
        """DIGEST-MD5, for domains that switched it on (see digest_md5.py)."""
        from mailbox_guard.auth import digest_md5
        policy = self.policy()
        if "DIGEST-MD5" not in policy.legacy_mechanisms:
            return await self._refuse(replies.S504_AUTH_MECHANISM)
        if len(args) > 1:
            return await self._refuse(replies.S501_AUTH_NO_INITIAL.format(mechanism="DIGEST-MD5"))
        realms = sorted(policy.legacy_realms.get("DIGEST-MD5", ()))
        nonce = b64encode(os.urandom(24)).decode()
        answer = await self.exchange.challenge(digest_md5.challenge(realms, nonce))
        if answer is MISSING:
            return _aborted()
        try:
            d = digest_md5.parse(answer.decode("utf-8"))
        except (UnicodeDecodeError, digest_md5.DigestError):
            return await self._refuse(replies.S501_AUTH_DIGEST)
        raw_login = d.get("username", "")
        login = normalise_login(raw_login)
        refused = await self.auth.gate(self.facts.peer_ip, login)
        account = None if refused else await self.auth.account(login)
        secret = account.secrets.get("DIGEST-MD5") if account is not None else None
        rspauth = None
        if (secret is not None and d.get("realm", "").lower() == account.domain
                and normalise_login(d.get("authzid", raw_login)) == login):
            rspauth = digest_md5.verify(d, nonce=nonce, secret_hex=secret)
        if rspauth is None:
            return await self._failure(raw_login, "DIGEST-MD5", counted=not refused)
        if await self.exchange.challenge(f"rspauth={rspauth}") is MISSING:
            return _aborted()
        return await self._success(account, "DIGEST-MD5")

    async def _success(self, account, mechanism: str) -> AuthResult:
        await self.auth.succeeded(self.facts.peer_ip, account.name.lower())
        self.session.authenticated(account.name, account.addresses, mechanism)
        log.info("conn=%s authenticated %s with %s", self.facts.connection_id, account.name, mechanism)
        return AuthResult(success=True, auth_data=account.name, message=replies.S235_AUTH_OK)

    async def _failure(self, login: str, mechanism: str, *, counted: bool = True,
                       reply: bool = True) -> AuthResult:
        shown = printable(login, 128)       # the login only: never the password
        if counted:
            await self.auth.failed(self.facts.peer_ip, normalise_login(login))
        self.failures += 1
        self.session.auth_failed(shown, mechanism, replies.S535_AUTH_FAILED)
        # Postfix's wording, so that fail2ban-style tools find the client address.
        log.warning("unknown[%s]: SASL %s authentication failed: user=<%s> conn=%s", self.facts.peer_ip,
                    mechanism, shown, self.facts.connection_id)
        if not reply:
            return _aborted()
        if self.failures >= self.policy().settings["auth.session_failures"]:
            await self.exchange.close_with([replies.S535_AUTH_FAILED,
                                            replies.S421_AUTH_FAILURES.format(hostname=self.hostname)])
            return _aborted()
        return AuthResult(success=False, handled=False, message=replies.S535_AUTH_FAILED)


class _ProtocolExchange:
    """The :class:`Exchange` of a GuardSMTP connection."""

    def __init__(self, proto: Any) -> None:
        self._proto = proto

    async def challenge(self, text: str | bytes) -> Any:
        return await self._proto.challenge_auth(text)

    async def say(self, reply: str) -> None:
        await self._proto.push(reply)

    async def close_with(self, lines: Sequence[str]) -> None:
        proto = self._proto
        for line in lines:
            await proto.push(line)
        await proto._flush()
        if proto.transport is not None:
            proto.transport.close()


class SaslMechanisms:
    """The ``auth_<MECHANISM>`` methods aiosmtpd looks for on the protocol (a mixin
    of :class:`~mailbox_guard.smtp.protocol.GuardSMTP`): one line each, handing the
    AUTH to the connection's :class:`Sasl`."""

    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        return await self._sasl().plain(args)

    async def auth_LOGIN(self, _, args: list[str]) -> AuthResult:
        return await self._sasl().login(args)

    async def auth_SCRAM__SHA__256(self, _, args: list[str]) -> AuthResult:
        return await self._sasl().scram_sha_256(args)

    async def auth_GSSAPI(self, _, args: list[str]) -> AuthResult:
        return await self._sasl().gssapi(args)

    async def auth_CRAM__MD5(self, _, args: list[str]) -> AuthResult:
        return await self._sasl().cram_md5(args)

    async def auth_DIGEST__MD5(self, _, args: list[str]) -> AuthResult:
        return await self._sasl().digest_md5(args)

    def _sasl(self) -> Sasl:
        # Made at the first AUTH (the protocol's __init__ is aiosmtpd's business)
        # and kept for the connection, failure count included.
        sasl = self.__dict__.get("_sasl_of_connection")
        if sasl is None:
            listener = self.listener                  # type: ignore[attr-defined]
            sasl = Sasl(_ProtocolExchange(self), auth=listener.auth, session=self.guard,  # type: ignore[attr-defined]
                        policy=listener.policy, gssapi=listener.gssapi, home=listener.home,
                        hostname=self.hostname)       # type: ignore[attr-defined]
            self.__dict__["_sasl_of_connection"] = sasl
        return sasl
