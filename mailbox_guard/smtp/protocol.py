"""The SMTP protocol: aiosmtpd's, made strict (the ``smtp`` package is the only one
that imports aiosmtpd).

The protocol subclass tightens aiosmtpd where a gateway must be stricter than a
library: commands must end in CRLF (no bare LF or CR), only ``CRLF.CRLF`` ends DATA,
DATA is read in chunks rather than line by line, error replies are counted (soft
limit: slow down; hard limit: 421 and close), and an internal error answers 451 with
no exception text. The hooks it calls are in :mod:`mailbox_guard.smtp.handler`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException, syntax

from mailbox_guard import replies
from mailbox_guard.mail.addresses import Path, PathError, parse_path, split_path
from mailbox_guard.mail.message import line_shape
from mailbox_guard.model import SessionFacts
from mailbox_guard.session.session import Session
from mailbox_guard.smtp.sasl import SaslMechanisms
from mailbox_guard.text import printable

if TYPE_CHECKING:   # pragma: no cover
    from mailbox_guard.smtp.server import Listener

log = logging.getLogger("mailbox_guard.smtp")

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF (998 + CRLF),
# measured after dot-unstuffing (mail.message.line_shape: a line without its end).
_TEXT_LINE_LIMIT = 998


_AUTH_LINE_LIMIT = 12288          # RFC 4954 (Kerberos tickets in AUTH GSSAPI)
# AUTH's argument: a mechanism name and perhaps an initial response, printable ASCII
# (anything else, a Unicode space or a control character, is a syntax error).
_AUTH_ARG = re.compile(r"[!-~]+(?: [!-~]+)?")


class GuardSMTP(SaslMechanisms, SMTP):
    """aiosmtpd's SMTP protocol, made strict. One instance per connection."""

    # The reader's buffer limit; commands are held to command_size_limits below and
    # AUTH lines may be long (RFC 4954).
    line_length_limit = _AUTH_LINE_LIMIT + 2

    def __init__(self, handler: Any, listener: "Listener", *, facts: SessionFacts, **kwargs: Any) -> None:
        # aiosmtpd keeps command_size_limits on the class and grows it per EHLO;
        # give each connection its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.listener = listener
        self.guard = Session(facts, listener.deps)      # the protocol-free session
        super().__init__(handler, **kwargs)
        self.errors = 0
        self.last_path: Path | None = None
        self.path_error: str | None = None
        self.phase = "connect"
        self._handshaking = False       # inside a STARTTLS handshake
        self.connect_task: asyncio.Task | None = None
        self._out: list[bytes] = []
        self.released = False          # taken out of the engine's table (exactly once)

    @property
    def facts(self) -> SessionFacts:
        return self.guard.facts

    @property
    def messages(self) -> int:
        return self.guard.messages

    @property
    def rejected(self) -> int:
        return self.guard.rejected

    def settings(self):
        return self.listener.policy().settings

    # ----------------------------------------------------------- transaction state
    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()
        # RSET, the end of DATA: what was not queued stays with the connection.
        guard = getattr(self, "guard", None)
        if guard is not None:
            guard.end_transaction()

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
            await self.push(replies.S501_STARTTLS_SYNTAX)
            return
        if self._tls_protocol is not None:
            await self.push(replies.S554_TLS_ACTIVE)
            return
        if not self.tls_context:
            await self.push(replies.S454_TLS_UNAVAILABLE)
            return
        await self.push(replies.S220_READY_FOR_TLS)
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
        self.guard.new_tls_session()
        self._tls_facts(tls)
        self._reset_timeout()

    async def _handshake(self, raw: asyncio.BaseTransport, context) -> asyncio.BaseTransport:
        """The server side of a TLS handshake within ``smtp.tls_handshake_timeout``;
        TLSSetupException when it fails, times out or the client goes away."""
        deadline = self.settings()["smtp.tls_handshake_timeout"]
        self._handshaking = True
        try:
            async with asyncio.timeout(deadline + 1):
                tls = await self.loop.start_tls(raw, self, context, server_side=True,
                                                ssl_handshake_timeout=deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:        # whatever the handshake raised: the client's failure
            raise TLSSetupException() from exc
        finally:
            self._handshaking = False
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
            await self.push(replies.S501_AUTH_SYNTAX)
            return
        await super().smtp_AUTH(arg)

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
            settings = self.settings()
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
        if not self.transport.get_write_buffer_size():
            return                 # all taken by the kernel: nothing to wait for
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
                 printable(str(cause) or type(cause).__name__, 200))
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
        if self._handshaking:
            # In the middle of a STARTTLS handshake a plain-text line is garbage to
            # the client's TLS layer: close without a word (the handshake fails and
            # the session ends as any failed handshake does).
            transport.abort()
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

    async def _refused_at_connect(self) -> bool:
        """A refusal decided at CONNECT that is answered now (instead of the banner, or
        for a gate at the next command): say it and close."""
        reply = self.guard.refused_at_connect
        if reply is None:
            return False
        await self.push(reply)
        await self._flush()
        if self.transport is not None:
            self.transport.close()
        return True

    async def _command_loop(self) -> None:
        if self.connect_task is not None and not self.settings()["smtp.delay_reject"]:
            await self.connect_task       # refusals of CONNECT are answered at once
        if await self._refused_at_connect():
            return
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
                if self.listener.table.draining and not self.envelope.mail_from:
                    await self.push(replies.S421_SHUTTING_DOWN.format(hostname=self.hostname))
                    self.transport.close()
                    return
                command_bytes, _, arg_bytes = line.partition(b" ")
                try:
                    command = command_bytes.upper().decode("ascii")
                    arg = arg_bytes.strip().decode("utf-8" if self.enable_SMTPUTF8 else "ascii",
                                                   "surrogateescape" if self.enable_SMTPUTF8 else "strict") or None
                except UnicodeDecodeError:
                    await self.push(replies.S500_BAD_SYNTAX)
                    continue
                if not command:
                    await self.push(replies.S500_BAD_SYNTAX)
                    continue
                limit = (self.command_size_limits[command] if self.session.extended_smtp
                         else self.command_size_limit)
                if len(line) + 2 > limit:        # RFC 5321 4.5.3.1.4 counts the CRLF
                    await self.push(replies.S500_LINE_TOO_LONG)
                    continue
                if not self._tls_handshake_okay and command != "QUIT":
                    await self.push(replies.S554_NEEDS_SECURITY)
                    continue
                if (self.require_starttls and not self._tls_protocol
                        and command not in ("NOOP", "EHLO", "STARTTLS", "QUIT")):
                    await self.push(replies.S530_STARTTLS_FIRST)
                    continue
                if self.connect_task is not None and self.connect_task.done() and await self._refused_at_connect():
                    return
                method = self._smtp_methods.get(command)
                if method is None:
                    # Counted like any other error reply (hard limit: 421).
                    await self.push(replies.S500_UNKNOWN_COMMAND.format(command=printable(command, 32)))
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
            await self.push(replies.S503_NEED_RCPT)
            return
        if arg:
            await self.push(replies.S501_DATA_SYNTAX)
            return
        await self.push(replies.S354_END_DATA)
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
        received = bytes(buf)
        body = received.replace(b"\r\n.", b"\r\n")[2:]
        longest, crlf = line_shape(body)
        if longest > _TEXT_LINE_LIMIT:
            return replies.S500_LINE_TOO_LONG, b""
        if limit and len(body) > limit:
            return replies.S552_TOO_BIG, b""
        # CRLF line ends only, and no line began with a dot (nothing was unstuffed, so
        # nothing needs stuffing again): delivery sends it as it is, without a scan.
        self.envelope.wire_ready = crlf and len(body) == len(received) - 2
        return None, body


