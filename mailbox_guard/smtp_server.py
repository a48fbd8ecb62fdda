"""The SMTP protocol adapter: the one module that imports aiosmtpd.

Each ``handle_<VERB>`` builds the facts of its phase, asks the pipeline, renders the
reply and meets aiosmtpd's obligations. The protocol subclass tightens aiosmtpd
where a gateway must be stricter than a library: commands must end in CRLF (no bare
LF or CR), only ``CRLF.CRLF`` ends DATA, DATA is read in chunks rather than line by
line, error replies are counted (soft limit: slow down; hard limit: 421 and close),
and an internal error answers 451 with no exception text.

A missing hook would make aiosmtpd answer with its defaults (a missing
``handle_DATA`` answers 250 and drops the mail), so :func:`assert_hooks` runs at
start-up and in the tests.
"""

from __future__ import annotations

import asyncio
import collections
import email.parser
import email.policy
import email.utils
import itertools
import json
import logging
import os
import re
import socket
import time
import warnings
from datetime import datetime
from typing import TYPE_CHECKING, Any

from base64 import b64decode, b64encode

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, TLSSetupException, syntax

from . import replies
from .addresses import Path, PathError, parse_path, split_path
from .auth import normalise_login
from .users import SCRAM_ITERATIONS
from .pipeline import Action, Context, Decision, Phase, SessionFacts, TransactionFacts
from .queue import NewMessage, Verdict, new_queue_id

if TYPE_CHECKING:   # pragma: no cover
    from .engine import Engine

log = logging.getLogger("mailbox_guard.smtp")

# The hooks aiosmtpd must find on our handler; without any one of them it would
# silently apply its own default (for DATA: "250 OK" and the message is gone).
REQUIRED_HOOKS = ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "VRFY", "NOOP", "QUIT")

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF (998 + CRLF),
# measured after dot-unstuffing; here a line ends at LF and keeps its CR (999).
_TEXT_LINE_LIMIT = 999


def _has_long_line(data: bytes) -> bool:
    # split + len runs in C; a regex like [^\n]{1000} restarts at every byte and
    # costs milliseconds per 100 KB.
    return len(data) > _TEXT_LINE_LIMIT and max(map(len, data.split(b"\n"))) > _TEXT_LINE_LIMIT
_AUTH_LINE_LIMIT = 12288          # RFC 4954 (Kerberos tickets in AUTH GSSAPI)
_CONN_IDS = itertools.count(1)
_HEX32 = re.compile(r"[0-9a-f]{32}")
# AUTH's argument: a mechanism name and perhaps an initial response, printable ASCII
# (anything else, a Unicode space or a control character, is a syntax error).
_AUTH_ARG = re.compile(r"[!-~]+(?: [!-~]+)?")
# RFC 4954 advertisement order asked for by admins' clients; only those implemented
# and enabled appear.
AUTH_ORDER = ("CRAM-MD5", "LOGIN", "PLAIN", "DIGEST-MD5", "GSSAPI", "SCRAM-SHA-256")
LEGACY_MECHANISMS = frozenset({"CRAM-MD5", "DIGEST-MD5"})


def assert_hooks(handler: Any) -> None:
    """Fail loudly at start-up if a hook is missing or misspelled."""
    missing = [h for h in REQUIRED_HOOKS if not callable(getattr(handler, f"handle_{h}", None))]
    if missing or not callable(getattr(handler, "handle_exception", None)):
        raise RuntimeError(f"SMTP handler lacks hooks: {', '.join(missing) or 'exception'}")
    stray = [m for m in dir(handler) if m.startswith("handle_")
             and m[7:] not in REQUIRED_HOOKS and m[7:] not in ("exception", "STARTTLS", "AUTH")]
    if stray:
        raise RuntimeError(f"SMTP handler has unknown hooks (misspelled?): {', '.join(stray)}")


def _printable(text: str, limit: int = 255) -> str:
    if text.isascii() and text.isprintable():
        return text[:limit]
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:limit]


class GuardSMTP(SMTP):
    """aiosmtpd's SMTP protocol, made strict. One instance per connection."""

    # The reader's buffer limit; commands are held to command_size_limits below and
    # AUTH lines may be long (RFC 4954).
    line_length_limit = _AUTH_LINE_LIMIT + 2
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, handler: "Handler", *, facts: SessionFacts, **kwargs: Any) -> None:
        # aiosmtpd keeps command_size_limits on the class and grows it per EHLO;
        # give each connection its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **kwargs)
        self.facts = facts
        self.tx = TransactionFacts()
        self.tx_trace: list[Verdict] = []
        self.conn_trace: list[Verdict] = []
        self.seq = itertools.count(1)
        self.errors = 0
        self.messages = 0
        self.rejected = 0
        self.last_path: Path | None = None
        self.path_error: str | None = None
        self.phase = "connect"
        self.connect_task: asyncio.Task | None = None
        self._out: list[bytes] = []
        self.trace_truncated = False
        self.auth_failures = 0
        self.released = False          # taken out of the engine's table (exactly once)

    # ----------------------------------------------------------- transaction state
    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()
        # A transaction that ended without being queued keeps its trace with the
        # connection ("why was this rejected?"), within the connection's bound.
        if getattr(self, "tx_trace", None):
            room = max(0, self.MAX_CONNECTION_TRACE - len(self.conn_trace))
            self.conn_trace.extend(self.tx_trace[:room])
        self.tx_trace = []
        self.tx = TransactionFacts()

    # The trace of refused transactions kept per connection: enough to answer "why",
    # bounded so that a client looping MAIL/RCPT/RSET cannot fill memory and disk.
    MAX_CONNECTION_TRACE = 1000

    def record(self, phase: Phase, subject: str, decision: Decision, *, into_tx: bool) -> None:
        now = time.time()
        trace = self.tx_trace if into_tx else self.conn_trace
        if len(self.conn_trace) + len(trace if into_tx else ()) >= self.MAX_CONNECTION_TRACE:
            if not self.trace_truncated:
                self.trace_truncated = True
                self.conn_trace.append(Verdict(next(self.seq), now, phase.value, "", "trace",
                                               "TRACE_TRUNCATED", 0.0, "none", None,
                                               f"more than {self.MAX_CONNECTION_TRACE} results"))
            if not into_tx or len(self.tx_trace) >= self.MAX_CONNECTION_TRACE * 3:
                trace = []         # counted below, not kept
        stats = self.event_handler.engine.stats
        if phase is Phase.MAIL and not decision.results:
            # The sender of the transaction, for "rejects" and "messages why" even
            # when no check had anything to say about it.
            trace.append(Verdict(next(self.seq), now, phase.value, subject, "smtp", "MAIL_FROM", 0.0,
                                 "none", None, ""))
        for r in decision.results:
            trace.append(Verdict(next(self.seq), now, phase.value, subject, r.check, r.symbol,
                                 r.score, r.action.value, r.reply, r.detail))
            stats.result(r.check, r.symbol, r.action.value)
        if decision.action is not Action.ACCEPT:
            self.rejected += 1
            stats.count("rejected" if decision.action is Action.REJECT else "tempfailed")
            d = decision.deciding
            self.event_handler.engine.events.publish(
                "reject", connection=self.facts.connection_id, peer_ip=self.facts.peer_ip,
                phase=phase.value, subject=subject, check=d.check if d else None,
                symbol=d.symbol if d else None, reply=decision.reply)
            self._log_reject(phase, decision.reply)

    def _log_reject(self, phase: Phase, reply: str | None) -> None:
        """Postfix's NOQUEUE line, so that an admin's habits and fail2ban-style tools
        find every refused command by client address."""
        facts = self.facts
        log.info("NOQUEUE: reject: %s from unknown[%s]: %s; from=<%s> to=<%s> proto=%s helo=<%s> conn=%s",
                 phase.value.upper(), facts.peer_ip, _printable(reply or "", 300),
                 _printable(self.tx.mail_from or ""),
                 _printable(self.last_path.address if phase is Phase.RCPT and self.last_path else ""),
                 "ESMTP" if facts.esmtp else "SMTP", _printable(facts.helo or "", 128), facts.connection_id)

    # ----------------------------------------------------------- address parsing
    def _getaddr(self, arg: str):
        """Parse with our own Path facts (source routes, literals, trailing dots are
        recorded, not silently dropped as the library would)."""
        self.last_path = None
        self.path_error = None
        if not arg:
            return "", ""
        try:
            text, params = split_path(arg)
            path = parse_path(text)
        except PathError as exc:
            self.path_error = str(exc)
            return None, None
        self.last_path = path
        return (path.address or "<>"), (" " + params if params else "")

    async def smtp_EHLO(self, hostname: str) -> None:
        # aiosmtpd widens the MAIL line limit on every EHLO (for SIZE= and SMTPUTF8
        # parameters); a client repeating EHLO must not widen it again and again.
        self.command_size_limits.clear()
        self.command_size_limits["AUTH"] = _AUTH_LINE_LIMIT
        await super().smtp_EHLO(hostname)

    # ----------------------------------------------------------- STARTTLS
    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str | None) -> None:
        """STARTTLS through the loop's own start_tls (aiosmtpd's builds an SSLProtocol
        by hand, which never reports a connection lost during the handshake: every
        failed or abandoned handshake left a session behind for good)."""
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self._tls_protocol is not None:
            await self.push("554 5.5.1 Error: TLS already active")
            return
        if not self.tls_context:
            await self.push("454 4.7.0 TLS not available")
            return
        await self.push("220 2.0.0 Ready to start TLS")
        raw = self.transport
        # RFC 3207 4.2: what the client pipelined in plain text behind STARTTLS is
        # discarded, never run after the handshake.
        self._reader._buffer.clear()             # type: ignore[attr-defined]
        self.phase = "starttls"
        tls = await self._handshake(raw, self.tls_context)
        self._original_transport = raw           # aiosmtpd closes it with the session
        self._reader._transport = tls            # type: ignore[attr-defined]
        self._writer._transport = tls            # type: ignore[attr-defined]
        self.transport = tls
        self._reader._buffer.clear()             # type: ignore[attr-defined]
        # A new SMTP session over TLS (RFC 3207 4.2): forget the EHLO and all state.
        peer = self.session.peer
        self._set_rset_state()
        self.session = self._create_session()
        self.session.peer = peer
        self.session.ssl = self._ssl_info(tls)
        self._out.clear()
        self._tls_facts(tls)
        self._reset_timeout()

    async def _handshake(self, raw: asyncio.BaseTransport, context) -> asyncio.BaseTransport:
        """The server side of a TLS handshake within ``smtp.tls_handshake_timeout``;
        TLSSetupException when it fails, times out or the client goes away."""
        deadline = self.event_handler.engine.policy.settings["smtp.tls_handshake_timeout"]
        try:
            async with asyncio.timeout(deadline + 1):
                tls = await self.loop.start_tls(raw, self, context, server_side=True,
                                                ssl_handshake_timeout=deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:        # whatever the handshake raised: the client's failure
            raise TLSSetupException() from exc
        if tls is None or tls.is_closing():
            raise TLSSetupException() from ConnectionResetError("closed during the TLS handshake")
        self._tls_protocol = tls        # aiosmtpd's "TLS is on" flag (STARTTLS offer, AUTH)
        return tls

    @staticmethod
    def _ssl_info(tls: asyncio.BaseTransport) -> dict:
        return {key: tls.get_extra_info(key) for key in ("cipher", "peercert", "sslcontext")}

    # ----------------------------------------------------------- AUTH
    async def smtp_AUTH(self, arg: str | None) -> None:
        # aiosmtpd splits the argument on Unicode whitespace and fails on what is
        # left (an IndexError for "AUTH \x85"): refuse anything but printable ASCII.
        if arg is not None and not _AUTH_ARG.fullmatch(arg):
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        await super().smtp_AUTH(arg)

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

    async def challenge_auth(self, challenge, encode_to_b64: bool = True, log_client_response: bool = False):
        """aiosmtpd's, with the AUTH line limit enforced like any other line (its own
        readline raises on a line over the limit, which would end in a 451)."""
        try:
            return await super().challenge_auth(challenge, encode_to_b64, False)
        except ValueError:      # LimitOverrunError from readline: drain the line, refuse
            while True:
                try:
                    await self._reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await self._reader.read(more.consumed)
            await self.push(replies.S500_LINE_TOO_LONG)
            return MISSING

    async def _auth_syntax(self, reply: str) -> AuthResult:
        await self.push(reply)
        return AuthResult(success=False, handled=True)

    async def _login(self, mechanism: str, login_b: bytes, password_b: bytes) -> AuthResult:
        engine = self.event_handler.engine
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
        engine = self.event_handler.engine
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
        from .gssapi_auth import acceptor_credentials, user_for
        engine = self.event_handler.engine
        if not (engine.gssapi and engine.gssapi.available):
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
            creds = await asyncio.to_thread(acceptor_credentials, engine.home, engine.gssapi.principal)
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
            log.info("conn=%s GSSAPI failed: %s", self.facts.connection_id, _printable(str(exc), 200))
            return await self._auth_failure(principal, "GSSAPI")
        realm = engine.gssapi.principal.rpartition("@")[2]
        login = normalise_login(user_for(principal)) if principal.endswith("@" + realm) or not realm else None
        refused = await engine.auth.gate(self.facts.peer_ip, login)
        account = None if refused else await engine.auth.account(login)
        if account is None or (authzid and normalise_login(authzid) != account.name.lower()):
            return await self._auth_failure(principal, "GSSAPI", counted=not refused)
        return await self._auth_success(account, "GSSAPI")

    async def auth_CRAM__MD5(self, _, args: list[str]) -> AuthResult:
        """CRAM-MD5, for domains that switched it on (see cram_md5.py)."""
        import hmac
        from . import cram_md5
        engine = self.event_handler.engine
        if "CRAM-MD5" not in engine.policy.legacy_mechanisms:
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
        from . import digest_md5
        engine = self.event_handler.engine
        if "DIGEST-MD5" not in engine.policy.legacy_mechanisms:
            return await self._auth_syntax("504 5.5.4 Unrecognized authentication type")
        if len(args) > 1:
            return await self._auth_syntax("501 5.5.2 DIGEST-MD5 takes no initial response")
        realms = sorted(engine.policy.legacy_realms.get("DIGEST-MD5", ()))
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
        shown = _printable(account.name, 128)
        await self.event_handler.engine.auth.succeeded(self.facts.peer_ip, account.name.lower())
        self.facts.auth_user = account.name
        self.facts.auth_addresses = account.addresses
        self.conn_trace.append(Verdict(next(self.seq), time.time(), "auth", shown, "auth", "AUTH_OK", 0.0,
                                       "accept", None, mechanism))
        log.info("conn=%s authenticated %s with %s", self.facts.connection_id, account.name, mechanism)
        return AuthResult(success=True, auth_data=account.name, message=replies.S235_AUTH_OK)

    async def _auth_failure(self, login: str, mechanism: str, *, counted: bool = True,
                            reply: bool = True) -> AuthResult:
        engine = self.event_handler.engine
        now = time.time()
        shown = _printable(login, 128)       # the login only: never the password
        if counted:
            await engine.auth.failed(self.facts.peer_ip, normalise_login(login))
        self.auth_failures += 1
        self.conn_trace.append(Verdict(next(self.seq), now, "auth", shown, "auth", "AUTH_FAILED", 0.0,
                                       "reject", replies.S535_AUTH_FAILED, mechanism))
        engine.stats.count("auth_failed")
        engine.events.publish("reject", connection=self.facts.connection_id, peer_ip=self.facts.peer_ip,
                              phase="auth", subject=shown, check="auth", symbol="AUTH_FAILED",
                              reply=replies.S535_AUTH_FAILED)
        # Postfix's wording, so that fail2ban-style tools find the client address.
        log.warning("unknown[%s]: SASL %s authentication failed: user=<%s> conn=%s", self.facts.peer_ip,
                    mechanism, shown, self.facts.connection_id)
        if not reply:
            return AuthResult(success=False, handled=True)
        if self.auth_failures >= engine.policy.settings["auth.session_failures"]:
            await self.push(replies.S535_AUTH_FAILED)
            self._out.append(replies.S421_AUTH_FAILURES.format(hostname=self.hostname).encode() + b"\r\n")
            await self._flush()
            if self.transport is not None:
                self.transport.close()
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=replies.S535_AUTH_FAILED)

    # ----------------------------------------------------------- replies
    async def push(self, status: str | bytes) -> None:
        """Queue a reply; count errors (soft limit: slow down, hard limit: 421).

        Replies to pipelined commands are sent together once no further complete
        command is waiting in the input (RFC 2920 allows it; it saves a system call
        and a packet per reply). A final reply with nothing else pending, and 221,
        421 and 354, go out at once, and so does the banner.
        """
        data = status if isinstance(status, bytes) else status.encode("utf-8", "replace")
        if data[:1] in (b"4", b"5") and not data.startswith(b"421"):
            self.errors += 1
            settings = self.event_handler.engine.policy.settings
            if self.errors > settings["smtp.soft_error_limit"] and settings["smtp.error_sleep"] > 0:
                await self._flush()
                await asyncio.sleep(settings["smtp.error_sleep"])
            self._out.append(data + b"\r\n")
            if self.errors >= settings["smtp.hard_error_limit"] and self.transport is not None:
                self._out.append(replies.S421_TOO_MANY_ERRORS.format(hostname=self.hostname).encode()
                                 + b"\r\n")
                await self._flush()
                if self.transport is not None:
                    self.transport.close()
                return
        else:
            self._out.append(data + b"\r\n")
        if data[3:4] == b"-" and sum(map(len, self._out)) < 65536:
            return                 # a continuation line: the final line follows
        if data[:3] in (b"220", b"221", b"421", b"354") or not self._input_pending():
            await self._flush()

    def _input_pending(self) -> bool:
        # StreamReader has no public peek; a complete line already buffered means
        # the client pipelined its next command.
        buffered = getattr(self._reader, "_buffer", None)
        return bool(buffered) and b"\n" in buffered

    async def _flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(data)
        try:
            # A client that sends but never reads must not pin our buffers: give
            # it the session timeout to take our replies, then drop it.
            async with asyncio.timeout(self._timeout_duration):
                await self._writer.drain()
        except TimeoutError:
            self._abort()
            raise ConnectionResetError("client stopped reading") from None

    def _abort(self) -> None:
        for transport in (self.transport, self._original_transport):
            if transport is not None and not transport.is_closing():
                transport.abort()

    def _tls_failed(self, error: BaseException) -> None:
        cause = error.__cause__ or error
        log.info("conn=%s TLS handshake failed from [%s]: %s", self.facts.connection_id, self.facts.peer_ip,
                 _printable(str(cause) or type(cause).__name__, 200))
        self._abort()

    def idle(self) -> bool:
        """Between transactions (or not yet talking SMTP): may be told to go at once."""
        return self.envelope is None or (not self.envelope.mail_from and self.phase != "data")

    def close_with(self, line: str) -> None:
        """Say one last line (421 ...) if the client can still hear it, and close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            self._abort()           # nothing to say it on: drop what is left
            self.release()
            return
        transport.write(line.encode("ascii", "replace") + b"\r\n")
        transport.close()

    async def handle_exception(self, error: Exception) -> str:
        return await self.event_handler.handle_exception(error)

    def _timeout_cb(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if transport.get_write_buffer_size():
                # Our earlier replies are still unread: closing would wait for them
                # forever. Drop the connection.
                transport.abort()
                return
            transport.write(replies.S421_TIMEOUT.format(hostname=self.hostname).encode() + b"\r\n")
        super()._timeout_cb()

    # ----------------------------------------------------------- the command loop
    async def _handle_client(self) -> None:
        """aiosmtpd's loop, stricter: CRLF only, counted errors, drain-aware. When it
        ends, for whatever reason, the session leaves the engine's table."""
        try:
            await self._command_loop()
        finally:
            self.release()

    def release(self) -> None:
        """Out of the engine's connection table, exactly once (a hook for subclasses)."""
        self.released = True

    async def _command_loop(self) -> None:
        await self.push(replies.S220_BANNER.format(hostname=self.hostname))
        reader = self._reader
        while self.transport is not None:
            try:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as exc:
                    await reader.read(exc.consumed)
                    while True:
                        try:
                            await reader.readuntil(b"\n")
                            break
                        except asyncio.LimitOverrunError as more:
                            await reader.read(more.consumed)
                    await self.push(replies.S500_LINE_TOO_LONG)
                    continue
                except asyncio.IncompleteReadError:
                    self._writer.close()
                    return
                if not line.endswith(b"\r\n"):
                    await self.push(replies.S500_BARE_LF)
                    continue
                line = line[:-2]
                if b"\r" in line:
                    await self.push(replies.S500_BARE_CR)
                    continue
                if self.event_handler.engine.draining and not self.envelope.mail_from:
                    await self.push(replies.S421_SHUTTING_DOWN.format(hostname=self.hostname))
                    self.transport.close()
                    return
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                    arg = arg_bytes.strip().decode("utf-8" if self.enable_SMTPUTF8 else "ascii",
                                                   "surrogateescape" if self.enable_SMTPUTF8 else "strict") or None
                except UnicodeDecodeError:
                    await self.push("500 5.5.2 Error: bad syntax")
                    continue
                if not command:
                    await self.push("500 5.5.2 Error: bad syntax")
                    continue
                limit = (self.command_size_limits[command] if self.session.extended_smtp
                         else self.command_size_limit)
                if len(line) + 2 > limit:        # RFC 5321 4.5.3.1.4 counts the CRLF
                    await self.push(replies.S500_LINE_TOO_LONG)
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push("554 5.7.0 Command refused due to lack of security")
                    continue
                if (self.require_starttls and not self._tls_protocol
                        and command not in ("NOOP", "EHLO", "STARTTLS", "QUIT")):
                    await self.push("530 5.7.0 Must issue a STARTTLS command first")
                    continue
                method = self._smtp_methods.get(command)
                if method is None:
                    # Counted like any other error reply (hard limit: 421).
                    await self.push(f'500 5.5.1 Error: command "{_printable(command, 32)}" not recognized')
                    continue
                self._reset_timeout()
                self.phase = command.lower()
                await method(arg)
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except (ConnectionResetError, BrokenPipeError):
                self._writer.close()
                return
            except TLSSetupException as error:
                # A failed handshake is the client's business (scanners do it all day):
                # one line in the log, no traceback, and the connection goes.
                self._tls_failed(error)
                return
            except Exception as error:
                status = await self.handle_exception(error)
                try:
                    await self.push(status)
                except (ConnectionError, RuntimeError):
                    return

    # ----------------------------------------------------------- DATA, in chunks
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.phase = "data"
        outcome, body = await self._read_data()
        if outcome is not None:
            self._set_post_data_state()
            await self.push(outcome)
            return
        self.envelope.content = body
        self.envelope.original_content = body
        status = await self._call_handler_hook("DATA")
        if status is MISSING:     # assert_hooks makes this impossible; never answer 250
            status = replies.S451_INTERNAL
        self._set_post_data_state()
        await self.push(status)

    async def _read_data(self) -> tuple[str | None, bytes]:
        """Read up to CRLF.CRLF (and nothing else ends DATA: LF.LF, CR.CR, LF.CRLF
        are content). Returns (error reply or None, unstuffed body)."""
        reader = self._reader
        limit = self.data_size_limit
        # A virtual CRLF before the first byte lets ".\r\n" right after 354 (an
        # empty message) match the same terminator as every other end of data.
        buf = bytearray(b"\r\n")
        scan = 0
        discarded = 0
        while True:
            chunk = await reader.read(1 << 18)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            self._reset_timeout()
            buf += chunk
            end = buf.find(b"\r\n.\r\n", scan)
            if end >= 0:
                rest = bytes(buf[end + 5:])
                del buf[end + 2:]
                if rest:
                    # Pipelined commands after the end of data belong to the command
                    # loop: hand them back to the reader (as aiosmtpd's own STARTTLS
                    # code touches the buffer, there is no public unread).
                    reader._buffer[:0] = rest          # type: ignore[attr-defined]
                break
            scan = max(0, len(buf) - 4)
            if limit and len(buf) + discarded > limit + 1024 and len(buf) > 8:
                # Too big: keep reading to the end, but keep only the tail that
                # could hold the start of the terminator.
                discarded += len(buf) - 4
                del buf[:-4]
                scan = 0
        if discarded:
            return replies.S552_TOO_BIG, b""
        body = bytes(buf).replace(b"\r\n.", b"\r\n")[2:]
        if _has_long_line(body):
            return replies.S500_LINE_TOO_LONG, b""
        if limit and len(body) > limit:
            return replies.S552_TOO_BIG, b""
        return None, body


class Handler:
    """The hooks: build facts, ask the pipeline, render the reply."""

    def __init__(self, engine: "Engine", listener: str, kind: str, spec=None) -> None:
        self.engine = engine
        self.listener = listener
        self.kind = kind
        # Submission and SMTPS always want AUTH; an inbound listener only when the
        # admin says so (then it offers AUTH too).
        self.require_auth = kind != "inbound" or bool(getattr(spec, "require_auth", False))
        self.plaintext_auth = bool(getattr(spec, "plaintext_auth", False))

    def _ctx(self, server: GuardSMTP, phase: Phase, subject: str = "", address: Path | None = None) -> Context:
        return Context(phase=phase, session=server.facts, transaction=server.tx,
                       policy=self.engine.policy, dns=self.engine.dns, subject=subject,
                       address=address)

    async def handle_HELO(self, server: GuardSMTP, session, envelope, hostname: str) -> str:
        reply = await self._helo(server, session, hostname, esmtp=False)
        return reply or f"250 {server.hostname}"

    async def handle_EHLO(self, server: GuardSMTP, session, envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        reply = await self._helo(server, session, hostname, esmtp=True)
        if reply:
            return [reply]
        # AUTH in the documented order, legacy mechanisms only where a domain enabled
        # them; no AUTH line at all without mechanisms (the inbound listener).
        gss = self.engine.gssapi
        offered = [m for m in AUTH_ORDER if m in server._auth_methods
                   and (m not in LEGACY_MECHANISMS or m in self.engine.policy.legacy_mechanisms)
                   and (m != "GSSAPI" or (gss is not None and gss.available))]
        out = [r for r in responses if r[4:] != "HELP" and not r[4:].startswith("AUTH")]
        if any(r[4:].startswith("AUTH") for r in responses) and offered:
            out.append("250-AUTH " + " ".join(offered))
        out.insert(1, "250-PIPELINING")
        out[-1] = "250 " + out[-1][4:]
        return out

    async def _helo(self, server: GuardSMTP, session, hostname: str, *, esmtp: bool) -> str | None:
        server.facts.helo = _printable(hostname)
        server.facts.esmtp = esmtp
        if server.connect_task is not None:
            await server.connect_task
        decision = await self.engine.pipeline.run(self._ctx(server, Phase.HELO, server.facts.helo))
        server.record(Phase.HELO, server.facts.helo, decision, into_tx=False)
        if decision.action is not Action.ACCEPT:
            return decision.reply
        session.host_name = hostname
        return None

    async def handle_MAIL(self, server: GuardSMTP, session, envelope, address: str,
                          mail_options: list[str]) -> str:
        path = server.last_path
        if path is None:
            return replies.S501_BAD_ADDRESS
        server.tx = TransactionFacts(mail_from=path.address, mail_from_domain=path.domain_lc,
                                     mail_options=list(mail_options))
        decision = await self.engine.pipeline.run(self._ctx(server, Phase.MAIL, path.address, path))
        server.record(Phase.MAIL, path.address or "<>", decision, into_tx=True)
        if decision.action is not Action.ACCEPT:
            server.tx = TransactionFacts()
            return decision.reply
        envelope.mail_from = path.address or "<>"
        envelope.mail_options.extend(mail_options)
        return replies.S250_SENDER_OK

    async def handle_RCPT(self, server: GuardSMTP, session, envelope, address: str,
                          rcpt_options: list[str]) -> str:
        path = server.last_path
        if path is None:
            return replies.S501_BAD_ADDRESS
        if len(envelope.rcpt_tos) >= self.engine.policy.settings["smtp.max_recipients"]:
            return replies.S452_TOO_MANY_RECIPIENTS
        if server.connect_task is not None:
            await server.connect_task     # delayed findings of CONNECT are answered here
        decision = await self.engine.pipeline.run(self._ctx(server, Phase.RCPT, path.address, path))
        server.record(Phase.RCPT, path.address, decision, into_tx=True)
        if decision.action is not Action.ACCEPT:
            return decision.reply
        addr = f"{path.local}@{path.domain_lc}" if not path.quoted_local else \
            path.address.rpartition("@")[0] + "@" + path.domain_lc
        envelope.rcpt_tos.append(addr)
        envelope.rcpt_options.extend(rcpt_options)
        server.tx.recipients.append(addr)
        return replies.S250_RECIPIENT_OK

    async def handle_DATA(self, server: GuardSMTP, session, envelope) -> str:
        body: bytes = envelope.original_content
        raw_headers, complete = _header_section(body)      # found once, used twice
        headers = _parse_headers(raw_headers)
        server.tx.size = len(body)
        server.tx.headers = headers
        server.tx.raw_headers, server.tx.headers_complete = raw_headers, complete
        decision = await self.engine.pipeline.run(self._ctx(server, Phase.DATA))
        server.record(Phase.DATA, "", decision, into_tx=True)
        if decision.action is not Action.ACCEPT:
            return decision.reply
        now = time.time()
        queue_id = new_queue_id(now)
        received = self._received_header(server, envelope, queue_id, now)
        msg = NewMessage(
            id=queue_id, mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,
            recipients=[(r, r.rpartition("@")[2]) for r in envelope.rcpt_tos],
            body=received + body, received_at=now,
            message_id=_message_id(headers), connection_id=server.facts.connection_id,
            listener=self.listener, client_ip=server.facts.peer_ip,
            verdicts=server.tx_trace + [Verdict(next(server.seq), now, "queue", queue_id, "queue",
                                                "QUEUED", 0.0, "accept", None, "")])
        try:
            await self.engine.commit_message(msg)
        except Exception as exc:     # storage failure: 451, never 250, never 5xx
            log.error("conn=%s queueing failed: %s", server.facts.connection_id, exc)
            server.tx_trace.append(Verdict(next(server.seq), time.time(), "queue", "", "queue",
                                           "STORAGE_ERROR", 0.0, "tempfail",
                                           replies.S451_STORAGE, type(exc).__name__))
            return replies.S451_STORAGE
        server.tx_trace = []          # now stored with the message
        server.messages += 1
        log.info("conn=%s queued %s from=<%s> rcpts=%d size=%d", server.facts.connection_id,
                 queue_id, _printable(msg.mail_from), len(msg.recipients), len(body))
        return replies.S250_QUEUED.format(queue_id=queue_id)

    def _received_header(self, server: GuardSMTP, envelope, queue_id: str, now: float) -> bytes:
        facts = server.facts
        proto = "ESMTP" if facts.esmtp else "SMTP"
        if facts.tls:
            proto += "S"
        if facts.auth_user:
            proto += "A"
        rcpt = f"\r\n\tfor <{_printable(envelope.rcpt_tos[0])}>" if len(envelope.rcpt_tos) == 1 else ""
        text = (f"Received: from {_printable(facts.helo or 'unknown', 128)} "
                f"([{facts.peer_ip}])\r\n\tby {server.hostname} (mailbox_guard) with {proto} "
                f"id {queue_id}{rcpt};\r\n\t{_date_header_value(now)}\r\n")
        return text.encode("ascii", "replace")

    async def handle_RSET(self, server, session, envelope) -> str:
        return replies.S250_OK

    async def handle_NOOP(self, server, session, envelope, arg) -> str:
        return replies.S250_OK

    async def handle_QUIT(self, server, session, envelope) -> str:
        return replies.S221_BYE

    async def handle_VRFY(self, server, session, envelope, address) -> str:
        # No user enumeration: the same answer whatever the address.
        return replies.S252_CANNOT_VRFY

    async def handle_exception(self, error: Exception) -> str:
        log.error("internal error in SMTP session: %s: %s", type(error).__name__, error,
                  exc_info=not isinstance(error, (OSError, asyncio.TimeoutError)))
        return replies.S451_INTERNAL


_DATE_CACHE: list = [None, ""]


def _date_header_value(now: float) -> str:
    """RFC 5322 date of ``now`` in local time, formatted once per second."""
    second = int(now)
    if _DATE_CACHE[0] != second:
        _DATE_CACHE[:] = [second, email.utils.format_datetime(datetime.fromtimestamp(second).astimezone())]
    return _DATE_CACHE[1]


_HEADER_CAP = 256 * 1024


def _header_section(body: bytes) -> tuple[bytes, bool]:
    """The header section as received, and whether an empty line ended it within
    the cap (an unterminated or oversized one cannot be checked completely)."""
    end = body.find(b"\r\n\r\n")
    if 0 <= end <= _HEADER_CAP:
        return body[:end + 2], True
    return body[:_HEADER_CAP], False


def _parse_headers(section: bytes):
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(section)


def _message_id(headers) -> str | None:
    value = headers.get("Message-ID") if headers is not None else None
    if value is None:
        return None
    return _printable("".join(str(value).split()), 250) or None     # unfolded


class Refuse(asyncio.Protocol):
    """Answers one line (none on an SMTPS port, where the client expects TLS) and
    closes: connection-level refusals before any SMTP object is built (draining now;
    access rules and flow control later)."""

    def __init__(self, reply: str | None, why: str) -> None:
        self.reply = reply
        self.why = why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("?",)
        log.info("refused connection from [%s]: %s", peer[0], self.why)
        if self.reply is not None:
            transport.write(self.reply.encode("ascii") + b"\r\n")   # type: ignore[attr-defined]
        transport.close()


def make_protocol(engine: "Engine", handler: Handler) -> asyncio.Protocol:
    """The protocol factory of a listener: refusals first, then a GuardSMTP."""
    settings = engine.policy.settings
    hostname = settings["smtp.hostname"]
    plain = handler.kind != "smtps"
    if engine.draining:
        return Refuse(replies.S421_SHUTTING_DOWN.format(hostname=hostname) if plain else None, "shutting down")
    if len(engine.sessions) >= settings["smtp.max_connections"]:
        return Refuse(replies.S421_TOO_MANY_CONNECTIONS.format(hostname=hostname) if plain else None,
                      "too many connections in all")
    return _Session(engine, handler)


class _Session(GuardSMTP):
    """GuardSMTP bound to the engine's live connection table: a connection is in the
    table from accept to close, TLS handshake included, and leaves it exactly once
    (:meth:`release`) however it ends."""

    def __init__(self, engine: "Engine", handler: Handler) -> None:
        settings = engine.policy.settings
        facts = SessionFacts(connection_id="", listener=handler.listener,
                             listener_kind=handler.kind, peer_ip="", peer_port=0)
        # Submission and SMTPS: AUTH before MAIL. Inbound (MX): no AUTH at all.
        # aiosmtpd knows TLS only as STARTTLS: on SMTPS the whole connection is TLS,
        # so its "AUTH only after STARTTLS" rule is lifted there (and its warning
        # about that, meant for plain-text listeners, silenced).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(handler, facts=facts, data_size_limit=settings["smtp.max_message_size"],
                             enable_SMTPUTF8=True, decode_data=False, hostname=settings["smtp.hostname"],
                             ident="mailbox_guard", timeout=settings["smtp.timeout"],
                             tls_context=engine.tls.context(handler.listener) if handler.kind != "smtps" else None,
                             auth_required=handler.require_auth,
                             auth_require_tls=handler.kind != "smtps" and not handler.plaintext_auth,
                             loop=asyncio.get_running_loop())
        if not handler.require_auth:
            self._auth_methods.clear()
        self.engine = engine
        self.implicit_tls = handler.kind == "smtps"
        self.smtp_started = False      # aiosmtpd's connection_made has run
        self.handshake: asyncio.Task | None = None     # SMTPS: the task doing it, until done

    def _tls_facts(self, transport: asyncio.BaseTransport) -> None:
        obj = transport.get_extra_info("ssl_object")
        if obj is None:
            return
        cipher = obj.cipher() or ("?", "?", 0)
        peer = obj.getpeercert() or None
        self.facts.tls = {"version": obj.version(), "cipher": cipher[0], "bits": cipher[2],
                          "client_cert": peer.get("subject") if peer else None}
        self.conn_trace.append(Verdict(next(self.seq), time.time(), "tls", self.facts.listener, "tls",
                                       "TLS_ESTABLISHED", 0.0, "none", None,
                                       f"{obj.version()} {cipher[0]} {cipher[2]} bits"))

    def admit(self, peer: tuple) -> bool:
        """Take a new connection from ``peer`` into the engine's table; False (and a
        log line) when its address already has too many."""
        now = time.time()
        self.facts.peer_ip = str(peer[0])
        self.facts.peer_port = int(peer[1]) if len(peer) > 1 else 0
        self.facts.started_at = now
        self.facts.trusted_network = self.engine.policy.is_trusted(self.facts.peer_ip)
        per_ip = self.engine.policy.settings["smtp.max_connections_per_ip"]
        if not self.facts.trusted_network and self.engine.connections_from(self.facts.peer_ip) >= per_ip:
            log.info("refused connection from [%s]: too many connections from the address", self.facts.peer_ip)
            self.released = True
            return False
        self.facts.connection_id = f"C{int(now * 1000):011X}{next(_CONN_IDS):05X}"
        self.engine.session_opened(self)
        return True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.released:                         # killed during its SMTPS handshake
            transport.abort()
            return
        if not self.facts.connection_id:          # SMTPS sessions were admitted before TLS
            if not self.admit(transport.get_extra_info("peername") or ("?", 0)):
                # Refused before any command is read: the banner is the only reply.
                transport.write(replies.S421_TOO_MANY_FROM_IP.format(hostname=self.hostname).encode() + b"\r\n")
                transport.close()
                return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._begin(transport)
        if self.implicit_tls:
            self.session.ssl = self._ssl_info(transport)

    def _begin(self, transport: asyncio.BaseTransport) -> None:
        self.smtp_started = True
        self.phase = "connect"
        if self.implicit_tls:
            self._tls_protocol = transport      # aiosmtpd's "TLS is on" flag
        super().connection_made(transport)     # aiosmtpd: reader, writer, the command loop
        self._tls_facts(transport)             # an SMTPS listener: TLS from the first byte
        self.connect_task = asyncio.ensure_future(self._run_connect())

    async def _run_connect(self) -> None:
        ctx = Context(phase=Phase.CONNECT, session=self.facts, transaction=self.tx,
                      policy=self.engine.policy, dns=self.engine.dns, subject=self.facts.peer_ip)
        decision = await self.engine.pipeline.run(ctx)
        self.record(Phase.CONNECT, self.facts.peer_ip, decision, into_tx=False)

    def connection_lost(self, error: Exception | None) -> None:
        try:
            if self.smtp_started:
                super().connection_lost(error)
        finally:
            self.release()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        if self.handshake is not None and self.handshake is not asyncio.current_task():
            self.handshake.cancel()         # killed or stopped during its SMTPS handshake
        if self.tx_trace:
            self.conn_trace.extend(self.tx_trace)
            self.tx_trace = []
        self.engine.session_closed(self)


class ImplicitTlsServer:
    """An SMTPS listener that accepts by itself: a connection is admitted (counted by
    its address, or refused) before its TLS handshake, which has a deadline. The
    loop's own ``create_server(ssl=...)`` only shows a connection once its handshake
    is done, so half-open handshakes were neither counted nor limited."""

    def __init__(self, engine: "Engine", handler: Handler, sockets: list[socket.socket]) -> None:
        self.engine = engine
        self.handler = handler
        self.sockets = sockets
        self._accepting = [asyncio.ensure_future(self._accept(s)) for s in sockets]
        self._handshakes: set[asyncio.Task] = set()

    @classmethod
    async def start(cls, engine: "Engine", handler: Handler, host: str, port: int) -> "ImplicitTlsServer":
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(1024)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return cls(engine, handler, sockets)

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listening)
            except OSError as exc:        # out of file descriptors, say: breathe, go on
                log.warning("SMTPS accept failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._handshake(conn, peer))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, peer: tuple) -> None:
        engine = self.engine
        refused = make_protocol(engine, self.handler)
        if not isinstance(refused, _Session):
            log.info("refused connection from [%s]: %s", peer[0], refused.why)   # type: ignore[attr-defined]
            conn.close()
            return
        session = refused
        if not session.admit(peer):
            conn.close()               # no plain-text reply: the client expects TLS
            return
        session.phase = "tls"
        session.handshake = asyncio.current_task()
        deadline = engine.policy.settings["smtp.tls_handshake_timeout"]
        try:
            async with asyncio.timeout(deadline + 1):
                await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: session, conn, ssl=engine.tls.context(self.handler.listener),
                    ssl_handshake_timeout=deadline)
        except asyncio.CancelledError:
            conn.close()
            session.release()
            raise
        except Exception as exc:         # whatever the handshake raised: the client's failure
            conn.close()
            session._tls_failed(TLSSetupException(str(exc)))
            session.release()
        finally:
            session.handshake = None

    def close(self) -> None:
        for task in (*self._accepting, *self._handshakes):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, return_exceptions=True)
