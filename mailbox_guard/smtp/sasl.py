"""SASL mechanisms of the SMTP adapter: PLAIN, LOGIN, CRAM-MD5, DIGEST-MD5, GSSAPI,
SCRAM-SHA-256, over aiosmtpd's AUTH command.

Every mechanism asks the engine's :class:`~mailbox_guard.auth.service.AuthService`
(bans, penalties, password checks in a thread) and reports the outcome to the
protocol-free session (the trace, the live view). An unknown user goes through the
same exchange as a known one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from base64 import b64decode, b64encode

from aiosmtpd.smtp import MISSING, AuthResult

from mailbox_guard import replies
from mailbox_guard.auth.service import normalise_login
from mailbox_guard.auth.users import SCRAM_ITERATIONS
from mailbox_guard.text import printable

log = logging.getLogger("mailbox_guard.smtp")

_HEX32 = re.compile(r"[0-9a-f]{32}")
# RFC 4954 advertisement order asked for by admins' clients; only those implemented
# and enabled appear.
AUTH_ORDER = ("CRAM-MD5", "LOGIN", "PLAIN", "DIGEST-MD5", "GSSAPI", "SCRAM-SHA-256")


class SaslMechanisms:
    """The ``auth_<MECHANISM>`` methods aiosmtpd finds on the protocol (a mixin of
    :class:`~mailbox_guard.smtp.protocol.GuardSMTP`)."""

    # PLAIN and LOGIN replace aiosmtpd's own, whose check runs synchronously (an
    # argon2 verification would stall every session); ours awaits the engine's
    # AuthService, which verifies in a thread. aiosmtpd offers them only after TLS.
    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                return await self._auth_syntax("501 5.5.2 Cannot decode base64")
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return await self._auth_syntax("501 5.5.2 Cannot split the PLAIN response")
        authzid, login, password = parts
        if authzid and authzid != login:
            # Acting for someone else is not allowed: fail like a bad password.
            return await self._login("PLAIN", login, b"\x00" + password)
        return await self._login("PLAIN", login, password)

    async def auth_LOGIN(self, _, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except ValueError:
                return await self._auth_syntax("501 5.5.2 Cannot decode base64")
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._login("LOGIN", login, password)

    async def _auth_syntax(self, reply: str) -> AuthResult:
        await self.push(reply)
        return AuthResult(success=False, handled=True)

    async def _login(self, mechanism: str, login_b: bytes, password_b: bytes) -> AuthResult:
        engine = self.listener
        try:
            login, password = login_b.decode("utf-8"), password_b.decode("utf-8")
        except UnicodeDecodeError:
            login, password = login_b.decode("utf-8", "replace"), "\x00"
        normalised = normalise_login(login)
        refused = await engine.auth.gate(self.facts.peer_ip, normalised)
        account = None if refused else await engine.auth.check_password(normalised, password)
        if account is not None:
            return await self._auth_success(account, mechanism)
        return await self._auth_failure(login, mechanism, counted=not refused)

    async def auth_SCRAM__SHA__256(self, _, args: list[str]) -> AuthResult:
        """SCRAM-SHA-256 (RFC 7677) with scramp: the server keeps only salted keys;
        the password never crosses the wire. An unknown or disabled user, or a
        banned client, goes through the same exchange with throwaway keys."""
        from scramp import ScramException, ScramMechanism
        if len(args) == 1:
            first = await self.challenge_auth("")
            if first is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                first = b64decode(args[1].encode(), validate=True)
            except ValueError:
                return await self._auth_syntax("501 5.5.2 Cannot decode base64")
        try:
            text = first.decode("utf-8")
            bare = text.split(",", 2)[2]
            login = next(a[2:] for a in bare.split(",") if a.startswith("n="))
            login = login.replace("=2C", ",").replace("=3D", "=")
        except (UnicodeDecodeError, IndexError, StopIteration):
            return await self._auth_syntax("501 5.5.2 Malformed SCRAM client-first message")
        engine = self.listener
        raw_login, login = login, normalise_login(login)
        refused = await engine.auth.gate(self.facts.peer_ip, login)
        # Looked up even when refused: the answer (salt, iterations) must not change
        # with a ban or show whether the account exists.
        account = await engine.auth.account(login)
        secret = account.secrets.get("SCRAM-SHA-256") if account is not None else None
        if secret is not None:
            keys = json.loads(secret)
            auth_info = (b64decode(keys["salt"]), b64decode(keys["stored_key"]),
                         b64decode(keys["server_key"]), keys["iterations"])
        else:
            # A stable salt per login and throwaway keys: no PBKDF2 on the loop, and
            # nothing that tells an unknown login from a real one.
            auth_info = (engine.auth.dummy_salt(login or raw_login), os.urandom(32), os.urandom(32),
                         SCRAM_ITERATIONS)
        server = ScramMechanism("SCRAM-SHA-256").make_server(lambda _user: auth_info)
        try:
            server.set_client_first(text)
            final = await self.challenge_auth(server.get_server_first())
            if final is MISSING:
                # An abandoned exchange counts like a failure (else probing is free).
                await self._auth_failure(raw_login, "SCRAM-SHA-256", counted=not refused, reply=False)
                return AuthResult(success=False, handled=True)
            server.set_client_final(final.decode("utf-8", "replace"))
            ok = secret is not None and not refused
        except ScramException:
            ok = False
        if not ok:
            return await self._auth_failure(raw_login, "SCRAM-SHA-256", counted=not refused)
        # The server's proof goes in a last challenge; the client answers empty.
        if await self.challenge_auth(server.get_server_final()) is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._auth_success(account, "SCRAM-SHA-256")

    async def auth_GSSAPI(self, _, args: list[str]) -> AuthResult:
        """GSSAPI (RFC 4752): a Kerberos ticket; no security layer is offered (the
        connection is TLS already)."""
        from mailbox_guard.auth.kerberos import acceptor_credentials, user_for
        engine = self.listener
        if not (engine.gssapi() and engine.gssapi().available):
            return await self._auth_syntax("504 5.5.4 Unrecognized authentication type")
        import gssapi
        if len(args) == 1:
            token = await self.challenge_auth("")
            if token is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                token = b64decode(args[1].encode(), validate=True)
            except ValueError:
                return await self._auth_syntax("501 5.5.2 Cannot decode base64")
        principal = "?"
        try:
            creds = await asyncio.to_thread(acceptor_credentials, engine.home, engine.gssapi().principal)
            ctx = gssapi.SecurityContext(creds=creds, usage="accept")
            for _round in range(10):
                out = await asyncio.to_thread(ctx.step, token)
                if ctx.complete:
                    break
                token = await self.challenge_auth(out or b"")
                if token is MISSING:
                    return AuthResult(success=False, handled=True)
            else:
                raise ValueError("too many GSSAPI rounds")
            if out and await self.challenge_auth(out) is MISSING:    # mutual authentication
                return AuthResult(success=False, handled=True)
            principal = str(ctx.initiator_name)
            # Security layer: none (bit 1), no maximum size.
            reply = await self.challenge_auth(ctx.wrap(b"\x01\x00\x00\x00", False).message)
            if reply is MISSING:
                return AuthResult(success=False, handled=True)
            answer = ctx.unwrap(reply).message
            if len(answer) < 4 or not answer[0] & 1:
                raise ValueError("client asked for a security layer")
            authzid = answer[4:].decode("utf-8", "replace")
        except (gssapi.exceptions.GSSError, ValueError) as exc:
            log.info("conn=%s GSSAPI failed: %s", self.facts.connection_id, printable(str(exc), 200))
            return await self._auth_failure(principal, "GSSAPI")
        realm = engine.gssapi().principal.rpartition("@")[2]
        login = normalise_login(user_for(principal)) if principal.endswith("@" + realm) or not realm else None
        refused = await engine.auth.gate(self.facts.peer_ip, login)
        account = None if refused else await engine.auth.account(login)
        if account is None or (authzid and normalise_login(authzid) != account.name.lower()):
            return await self._auth_failure(principal, "GSSAPI", counted=not refused)
        return await self._auth_success(account, "GSSAPI")

    async def auth_CRAM__MD5(self, _, args: list[str]) -> AuthResult:
        """CRAM-MD5, for domains that switched it on (see cram_md5.py)."""
        import hmac
        from mailbox_guard.auth import cram_md5
        engine = self.listener
        if "CRAM-MD5" not in engine.policy().legacy_mechanisms:
            return await self._auth_syntax("504 5.5.4 Unrecognized authentication type")
        if len(args) > 1:
            return await self._auth_syntax("501 5.5.2 CRAM-MD5 takes no initial response")
        challenge = f"<{os.urandom(8).hex()}.{int(time.time())}@{self.hostname}>".encode()
        answer = await self.challenge_auth(challenge)
        if answer is MISSING:
            return AuthResult(success=False, handled=True)
        raw_login, _, digest = answer.decode("utf-8", "replace").rpartition(" ")
        login = normalise_login(raw_login)
        refused = await engine.auth.gate(self.facts.peer_ip, login)
        account = None if refused else await engine.auth.account(login)
        secret = account.secrets.get("CRAM-MD5") if account is not None else None
        digest = digest.lower()
        good = (secret is not None and _HEX32.fullmatch(digest) is not None
                and hmac.compare_digest(cram_md5.expected(secret, challenge).encode(), digest.encode()))
        if not good:
            return await self._auth_failure(raw_login or "?", "CRAM-MD5", counted=not refused)
        return await self._auth_success(account, "CRAM-MD5")

    async def auth_DIGEST__MD5(self, _, args: list[str]) -> AuthResult:
        """DIGEST-MD5, for domains that switched it on (see digest_md5.py)."""
        from mailbox_guard.auth import digest_md5
        engine = self.listener
        if "DIGEST-MD5" not in engine.policy().legacy_mechanisms:
            return await self._auth_syntax("504 5.5.4 Unrecognized authentication type")
        if len(args) > 1:
            return await self._auth_syntax("501 5.5.2 DIGEST-MD5 takes no initial response")
        realms = sorted(engine.policy().legacy_realms.get("DIGEST-MD5", ()))
        nonce = b64encode(os.urandom(24)).decode()
        answer = await self.challenge_auth(digest_md5.challenge(realms, nonce))
        if answer is MISSING:
            return AuthResult(success=False, handled=True)
        try:
            d = digest_md5.parse(answer.decode("utf-8"))
        except (UnicodeDecodeError, digest_md5.DigestError):
            return await self._auth_syntax("501 5.5.2 Malformed DIGEST-MD5 response")
        raw_login = d.get("username", "")
        login = normalise_login(raw_login)
        refused = await engine.auth.gate(self.facts.peer_ip, login)
        account = None if refused else await engine.auth.account(login)
        secret = account.secrets.get("DIGEST-MD5") if account is not None else None
        rspauth = None
        if (secret is not None and d.get("realm", "").lower() == account.domain
                and normalise_login(d.get("authzid", raw_login)) == login):
            rspauth = digest_md5.verify(d, nonce=nonce, secret_hex=secret)
        if rspauth is None:
            return await self._auth_failure(raw_login, "DIGEST-MD5", counted=not refused)
        if await self.challenge_auth(f"rspauth={rspauth}") is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._auth_success(account, "DIGEST-MD5")

    async def _auth_success(self, account, mechanism: str) -> AuthResult:
        await self.listener.auth.succeeded(self.facts.peer_ip, account.name.lower())
        self.guard.authenticated(account.name, account.addresses, mechanism)
        log.info("conn=%s authenticated %s with %s", self.facts.connection_id, account.name, mechanism)
        return AuthResult(success=True, auth_data=account.name, message=replies.S235_AUTH_OK)

    async def _auth_failure(self, login: str, mechanism: str, *, counted: bool = True,
                            reply: bool = True) -> AuthResult:
        engine = self.listener
        shown = printable(login, 128)       # the login only: never the password
        if counted:
            await engine.auth.failed(self.facts.peer_ip, normalise_login(login))
        self.auth_failures += 1
        self.guard.auth_failed(shown, mechanism, replies.S535_AUTH_FAILED)
        # Postfix's wording, so that fail2ban-style tools find the client address.
        log.warning("unknown[%s]: SASL %s authentication failed: user=<%s> conn=%s", self.facts.peer_ip,
                    mechanism, shown, self.facts.connection_id)
        if not reply:
            return AuthResult(success=False, handled=True)
        if self.auth_failures >= engine.policy().settings["auth.session_failures"]:
            await self.push(replies.S535_AUTH_FAILED)
            self._out.append(replies.S421_AUTH_FAILURES.format(hostname=self.hostname).encode() + b"\r\n")
            await self._flush()
            if self.transport is not None:
                self.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=replies.S535_AUTH_FAILED)
