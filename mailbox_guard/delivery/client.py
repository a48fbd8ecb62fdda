"""The outbound SMTP client of delivery: ESMTP with PIPELINING (RFC 2920).

aiosmtplib sends one command per round trip; a relay that does so spends as much
time and CPU on delivery as on reception. This client sends MAIL, every RCPT and DATA
in one write when the next hop advertises PIPELINING, then the body in one write,
dot-stuffed here (the body it is given already has CRLF line endings only; see
``delivery.to_wire``). It upgrades to TLS with STARTTLS when offered (opportunistic,
unauthenticated, like Postfix's ``may`` level). Every read has a deadline.

It is an ``asyncio.Protocol``, not a stream: replies are parsed as the bytes arrive
(one pass over each chunk, however many replies it holds) and a waiting transaction
is woken once per chunk, not once per line. What the next hop may make it hold is
bounded: a line, the lines of a reply, and the replies it was not asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from dataclasses import dataclass

_MAX_REPLY_LINES = 100
_LINE_LIMIT = 16384          # one reply line, its end included
_UNASKED = 16                # replies beyond those owed before the connection is dropped
_QUEUED_TEXT = 1 << 20       # reply text received and not read yet, at most


class SmtpClientError(Exception):
    """The connection is unusable (refused, reset, timed out, malformed reply)."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


@dataclass
class Transaction:
    mail: Reply
    rcpts: list[Reply]
    data: Reply | None          # None when no recipient was accepted


def _os_text(exc: BaseException) -> str:
    """An OSError in words, without Python's "[Errno 111]": operators read it in the
    queue and senders in a bounce."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def dot_stuff(wire: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency, for a body with CRLF line endings only."""
    out = wire.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out.startswith(b".") else out


def opportunistic_tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE      # opportunistic: encrypt, do not authenticate
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _Wire(asyncio.Protocol):
    """The connection's bytes: whole replies queued as they arrive, the first
    malformed one (or too long, or unasked for) ends the connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.replies: deque[Reply] = deque()
        self.owed = 0                  # replies to commands sent and not read yet
        self.error: str | None = None  # why the connection is unusable
        self.closed = False
        self.waiter: asyncio.Future | None = None
        self._partial = b""            # the start of a line
        self._lines: list[str] = []    # the lines of a reply so far
        self._code = 0
        self._queued = 0               # bytes of text in self.replies
        self._paused = False
        self._drained: asyncio.Future | None = None

    # ------------------------------------------------------------ asyncio
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self._partial:
            data = self._partial + data
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if end - start >= _LINE_LIMIT or not self._line(data[start:end]):
                self._fail(self.error or "reply line too long")
                return
            start = end + 1
        self._partial = data[start:]
        if len(self._partial) >= _LINE_LIMIT:
            self._fail("reply line too long")
            return
        self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and self.error is None:
            self.error = f"read failed: {_os_text(exc)}"
        self.closed = True
        self._wake()
        self._release_drain()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._release_drain()

    def _release_drain(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None:
            _settle(drained, None)

    # ------------------------------------------------------------ replies
    def _line(self, raw: bytes) -> bool:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
            self.error = f"malformed reply {line[:80]!r}"
            return False
        code = int(line[:3])
        if self._lines and code != self._code:
            self.error = "inconsistent multi-line reply"
            return False
        self._code = code
        self._lines.append(line[4:])
        if line[3:4] != "-":
            text = "\n".join(self._lines)
            self._lines = []
            self.replies.append(Reply(code, text))
            self._queued += len(text)
            if len(self.replies) > self.owed + _UNASKED or self._queued > _QUEUED_TEXT:
                self.replies.clear()       # none of them can be trusted to answer anything
                self.error = "replies nobody asked for"
                return False
        elif len(self._lines) > _MAX_REPLY_LINES:
            self.error = "reply too long"
            return False
        return True

    def _fail(self, why: str) -> None:
        self.error = why
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and (self.replies or self.error or self.closed):
            _settle(self.waiter, True)

    def take(self) -> Reply:
        reply = self.replies.popleft()
        self._queued -= len(reply.text)
        self.owed = max(0, self.owed - 1)
        return reply

    @property
    def idle(self) -> bool:
        """Nothing received and not read, not even part of a line."""
        return not self.replies and not self._partial and not self._lines

    def forget(self) -> None:
        """Drop whatever arrived unread (before TLS: nothing sent in clear may count)."""
        self.replies.clear()
        self._queued = 0
        self._partial = b""
        self._lines = []

    async def drained(self, timeout: float) -> bool:
        """False if the next hop did not take our bytes within ``timeout``."""
        if not self._paused or self.closed:
            return True
        loop = asyncio.get_running_loop()
        self._drained = future = loop.create_future()
        timer = loop.call_later(timeout, _settle, future, False)
        try:
            return await future is not False
        finally:
            timer.cancel()


def _settle(future: asyncio.Future, value) -> None:
    """A waiter's outcome, unless it has one already (a reply and its deadline may
    come in the same turn of the loop)."""
    if not future.done():
        future.set_result(value)


class Connection:
    def __init__(self, wire: _Wire, *, command_timeout: float, name: str) -> None:
        self._wire = wire
        self.command_timeout = command_timeout
        self.name = name
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.broken = False

    @property
    def transport(self) -> asyncio.Transport:
        return self._wire.transport

    # ------------------------------------------------------------------ open
    @classmethod
    async def open(cls, host: str, port: int, *, helo: str, connect_timeout: float,
                   command_timeout: float, name: str | None = None,
                   tls: ssl.SSLContext | None = None) -> "Connection":
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                transport, wire = await loop.create_connection(_Wire, host, port)
        except ConnectionRefusedError:
            raise SmtpClientError(f"connection refused by {where}") from None
        except TimeoutError:
            raise SmtpClientError(f"no connection to {where} within {connect_timeout:g}s") from None
        except OSError as exc:
            raise SmtpClientError(f"cannot connect to {where}: {_os_text(exc)}") from None
        conn = cls(wire, command_timeout=command_timeout, name=name or host)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            wire.owed = 1
            banner = await conn.read_reply(timeout=connect_timeout)
            if banner.code != 220:
                raise SmtpClientError(f"banner: {banner}")
            await conn.ehlo(helo)
            if tls is not None and "STARTTLS" in conn.extensions:
                reply = await conn.command(b"STARTTLS")
                if reply.code == 220:
                    wire.forget()       # anything after the 220, in clear, is not the server's
                    try:
                        async with asyncio.timeout(connect_timeout):
                            secure = await loop.start_tls(transport, wire, tls, server_hostname=name or host)
                    except (OSError, ssl.SSLError, TimeoutError) as exc:
                        raise SmtpClientError(f"TLS handshake with {where} failed: {_os_text(exc)}") from None
                    if secure is None:
                        raise SmtpClientError(f"TLS handshake with {where} failed: connection closed")
                    wire.transport = secure
                    conn.tls = True
                    await conn.ehlo(helo)
        except BaseException:
            conn.close()
            raise
        return conn

    async def ehlo(self, helo: str) -> None:
        reply = await self.command(f"EHLO {helo}".encode())
        if reply.code == 250:
            ext = {}
            for line in reply.text.split("\n")[1:]:
                key, _, value = line.strip().partition(" ")
                ext[key.upper()] = value
            self.extensions = ext
            return
        reply = await self.command(f"HELO {helo}".encode())
        if reply.code != 250:
            raise SmtpClientError(f"HELO refused: {reply}")
        self.extensions = {}

    # ------------------------------------------------------------------ wire
    async def read_reply(self, timeout: float | None = None) -> Reply:
        return (await self.read_replies(1, timeout))[0]

    async def read_replies(self, count: int, timeout: float | None = None) -> list[Reply]:
        """``count`` replies in a row (to pipelined commands), each within ``timeout``
        (default: the command timeout) of the one before."""
        per_reply = timeout or self.command_timeout
        wire = self._wire
        out: list[Reply] = []
        while len(out) < count:
            if wire.replies:
                out.append(wire.take())
                continue
            if wire.error is not None or wire.closed:
                self.broken = True
                raise SmtpClientError(wire.error or "connection closed by the next hop")
            loop = asyncio.get_running_loop()
            wire.waiter = future = loop.create_future()
            timer = loop.call_later(per_reply, _settle, future, False)
            try:
                woken = await future
            except asyncio.CancelledError:
                self.broken = True          # cut off mid-exchange: out of step for good
                raise
            finally:
                timer.cancel()
                wire.waiter = None
            if not woken:
                self.broken = True
                raise SmtpClientError("timeout waiting for a reply")
        return out

    def _write(self, data: bytes, replies: int) -> None:
        wire = self._wire
        if self.broken or wire.closed or self.transport.is_closing():
            self.broken = True
            raise SmtpClientError("connection closed")
        if len(wire.replies) > wire.owed:
            # A reply came before its command: it would be read as the answer to this one.
            self.close()
            raise SmtpClientError("reply out of step with the commands")
        wire.owed += replies
        self.transport.write(data)

    async def _drain(self) -> None:
        if not await self._wire.drained(self.command_timeout):
            self.broken = True
            raise SmtpClientError("write failed: timed out")
        if self._wire.closed:
            self.broken = True
            raise SmtpClientError("write failed: connection closed")

    async def command(self, line: bytes) -> Reply:
        if b"\r" in line or b"\n" in line:
            raise ValueError("command with a line break")
        self._write(line + b"\r\n", 1)
        await self._drain()
        return await self.read_reply()

    # ------------------------------------------------------------------ mail
    async def send(self, mail_from: str, rcpts: list[str], wire: bytes, *, wire_ready: bool = False) -> Transaction:
        """One transaction. Connection trouble raises SmtpClientError; refusals are
        returned as replies. ``wire_ready``: no line of ``wire`` begins with a dot
        (it goes out as it is, without a dot-stuffing pass)."""
        params = []
        if "SIZE" in self.extensions:
            params.append(f" SIZE={len(wire)}")
        if "8BITMIME" in self.extensions and not wire.isascii():
            params.append(" BODY=8BITMIME")
        if "SMTPUTF8" in self.extensions and not (mail_from.isascii() and all(r.isascii() for r in rcpts)):
            params.append(" SMTPUTF8")
        commands = [f"MAIL FROM:<{mail_from}>{''.join(params)}".encode()]
        commands += [f"RCPT TO:<{r}>".encode() for r in rcpts]
        for c in commands:
            if b"\r" in c or b"\n" in c:
                raise ValueError("address with a line break")
        if "PIPELINING" in self.extensions:
            self._write(b"".join(c + b"\r\n" for c in commands) + b"DATA\r\n", len(rcpts) + 2)
            await self._drain()
            mail, *rcpt_replies, data_start = await self.read_replies(len(rcpts) + 2)
        else:
            mail = await self.command(commands[0])
            if not mail.ok:
                return Transaction(mail, [mail] * len(rcpts), None)
            rcpt_replies = [await self.command(c) for c in commands[1:]]
            data_start = await self.command(b"DATA") if any(r.ok for r in rcpt_replies) else None
        if not mail.ok:
            return Transaction(mail, [mail] * len(rcpts), None)
        if data_start is None or data_start.code != 354:
            if any(r.ok for r in rcpt_replies) and data_start is not None:
                # DATA itself refused although someone was accepted: that is the answer.
                return Transaction(mail, rcpt_replies, data_start)
            return Transaction(mail, rcpt_replies, None)
        self._write((wire if wire_ready else dot_stuff(wire)) + b".\r\n", 1)
        await self._drain()
        return Transaction(mail, rcpt_replies, await self.read_reply())

    async def rset(self) -> bool:
        try:
            return (await self.command(b"RSET")).code == 250
        except SmtpClientError:
            return False

    async def quit(self) -> None:
        with contextlib.suppress(SmtpClientError, OSError):
            self._write(b"QUIT\r\n", 1)
            await self.read_reply(timeout=2)
        self.close()

    @property
    def usable(self) -> bool:
        """Open, and nothing arrived unasked (an idle connection's 421, say)."""
        wire = self._wire
        return (not self.broken and not wire.closed and wire.error is None and wire.idle
                and not self.transport.is_closing())

    def close(self) -> None:
        """Closed in order when idle; dropped (its unsent bytes with it) when broken or
        still sending: a next hop that stopped reading must not keep our socket and
        our buffered body for as long as it likes."""
        abort = self.broken or bool(self.transport.get_write_buffer_size())
        self.broken = True
        with contextlib.suppress(Exception):
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
