"""The outbound SMTP client of delivery: ESMTP with PIPELINING (RFC 2920).

aiosmtplib sends one command per round trip; a relay that does so spends as much
time and CPU on delivery as on reception. This client sends MAIL, every RCPT and DATA
in one write when the next hop advertises PIPELINING, then the body in one write,
dot-stuffed here (the body it is given already has CRLF line endings only; see
``delivery.to_wire``). It upgrades to TLS with STARTTLS when offered (opportunistic,
unauthenticated, like Postfix's ``may`` level). Every read has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass

_MAX_REPLY_LINES = 100
_LINE_LIMIT = 4096


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


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 command_timeout: float, name: str) -> None:
        self.reader, self.writer = reader, writer
        self.command_timeout = command_timeout
        self.name = name
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.broken = False

    # ------------------------------------------------------------------ open
    @classmethod
    async def open(cls, host: str, port: int, *, helo: str, connect_timeout: float,
                   command_timeout: float, name: str | None = None,
                   tls: ssl.SSLContext | None = None) -> "Connection":
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(host, port, limit=_LINE_LIMIT * 4)
        except ConnectionRefusedError:
            raise SmtpClientError(f"connection refused by {where}") from None
        except TimeoutError:
            raise SmtpClientError(f"no connection to {where} within {connect_timeout:g}s") from None
        except OSError as exc:
            raise SmtpClientError(f"cannot connect to {where}: {_os_text(exc)}") from None
        conn = cls(reader, writer, command_timeout=command_timeout, name=name or host)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            banner = await conn.read_reply(timeout=connect_timeout)
            if banner.code != 220:
                raise SmtpClientError(f"banner: {banner}")
            await conn.ehlo(helo)
            if tls is not None and "STARTTLS" in conn.extensions:
                reply = await conn.command(b"STARTTLS")
                if reply.code == 220:
                    try:
                        async with asyncio.timeout(connect_timeout):
                            await writer.start_tls(tls, server_hostname=name or host)
                    except (OSError, ssl.SSLError, TimeoutError) as exc:
                        raise SmtpClientError(f"TLS handshake with {where} failed: {_os_text(exc)}") from None
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
        (default: the command timeout) of the one before: one timer for all of them."""
        per_reply = timeout or self.command_timeout
        out: list[Reply] = []
        try:
            async with asyncio.timeout(per_reply) as deadline:
                for _ in range(count):
                    if out:
                        deadline.reschedule(asyncio.get_running_loop().time() + per_reply)
                    out.append(await self._reply())
        except TimeoutError:
            self.broken = True
            raise SmtpClientError("timeout waiting for a reply") from None
        except (OSError, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
            self.broken = True
            raise SmtpClientError(f"read failed: {_os_text(exc)}") from None
        except SmtpClientError:
            self.broken = True
            raise
        return out

    async def _reply(self) -> Reply:
        lines: list[str] = []
        code = None
        while True:
            raw = await self.reader.readline()
            if not raw.endswith(b"\n"):
                raise SmtpClientError("connection closed by the next hop")
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                raise SmtpClientError(f"malformed reply {line[:80]!r}")
            if code is not None and int(line[:3]) != code:
                raise SmtpClientError("inconsistent multi-line reply")
            code = int(line[:3])
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(code, "\n".join(lines))
            if len(lines) > _MAX_REPLY_LINES:
                raise SmtpClientError("reply too long")

    def _write(self, data: bytes) -> None:
        if self.writer.is_closing():
            self.broken = True
            raise SmtpClientError("connection closed")
        self.writer.write(data)

    async def _drain(self) -> None:
        transport = self.writer.transport
        if transport is not None and not transport.is_closing() and not transport.get_write_buffer_size():
            return            # the kernel took it all: nothing to wait for
        try:
            async with asyncio.timeout(self.command_timeout):
                await self.writer.drain()
        except (OSError, TimeoutError) as exc:
            self.broken = True
            raise SmtpClientError(f"write failed: {_os_text(exc)}") from None

    async def command(self, line: bytes) -> Reply:
        if b"\r" in line or b"\n" in line:
            raise ValueError("command with a line break")
        self._write(line + b"\r\n")
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
            self._write(b"".join(c + b"\r\n" for c in commands) + b"DATA\r\n")
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
        self._write((wire if wire_ready else dot_stuff(wire)) + b".\r\n")
        await self._drain()
        return Transaction(mail, rcpt_replies, await self.read_reply())

    async def rset(self) -> bool:
        try:
            return (await self.command(b"RSET")).code == 250
        except SmtpClientError:
            return False

    async def quit(self) -> None:
        with contextlib.suppress(SmtpClientError, OSError):
            self._write(b"QUIT\r\n")
            await self.read_reply(timeout=2)
        self.close()

    @property
    def usable(self) -> bool:
        return not self.broken and not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):
            self.writer.close()
