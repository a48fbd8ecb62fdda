"""The delivery agent's SMTP client against next hops that misbehave: scripted SMTP
servers on loopback (real sockets, real TLS), each test one way of going wrong. The
client must end each with a clear error or an unusable connection, within its
deadline, holding no more than it was asked for."""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
import trustme
import uvloop

from mailbox_guard.delivery.client import Connection, SmtpClientError, opportunistic_tls_context

EHLO = b"250-hop.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


class Hop:
    """A next hop that answers each line it reads with what ``script`` returns."""

    def __init__(self, script, *, banner: bytes = b"220 hop.test ESMTP\r\n", tls: ssl.SSLContext | None = None):
        self.script, self.banner, self.tls = script, banner, tls
        self.lines: list[bytes] = []
        self.tls_lines: list[bytes] = []
        self.clients: list[Connection] = []
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Hop":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        for conn in self.clients:
            conn.close()
        for writer in self._writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()
        await asyncio.sleep(0.05)          # the transports' last callbacks

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            writer.write(self.banner)
            secure = False
            while True:
                line = await reader.readline()
                if not line:
                    return
                (self.tls_lines if secure else self.lines).append(line)
                answer = self.script(line.rstrip(b"\r\n"), secure)
                if answer is None:
                    continue                       # silence
                if answer == b"CLOSE":
                    writer.close()
                    return
                if answer.startswith(b"STARTTLS:"):
                    writer.write(answer[len(b"STARTTLS:"):])
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    secure = True
                    continue
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            return


def ehlo_then(rest):
    def script(line: bytes, secure: bool):
        if line.upper().startswith(b"EHLO"):
            return EHLO
        return rest(line, secure)
    return script


async def connect(hop: Hop, **kw) -> Connection:
    conn = await Connection.open("127.0.0.1", hop.port, helo="me.test", connect_timeout=kw.pop("connect_timeout", 5),
                                 command_timeout=kw.pop("command_timeout", 5), **kw)
    hop.clients.append(conn)         # closed with the hop, whatever the test found
    return conn


LOOP = {"kind": "asyncio"}


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def loop_kind(request):
    """Each test on asyncio's own loop and on uvloop (the delivery agent's)."""
    LOOP["kind"] = request.param
    yield request.param


def run(coro):
    if LOOP["kind"] == "uvloop":
        return uvloop.run(asyncio.wait_for(coro, 30))
    return asyncio.run(asyncio.wait_for(coro, 30))


def ok_transaction(line: bytes, secure: bool):
    if line.startswith((b"MAIL", b"RCPT")):
        return b"250 ok\r\n"
    if line == b"DATA":
        return b"354 go\r\n"
    if line == b".":
        return b"250 queued as X\r\n"
    if line == b"RSET":
        return b"250 ok\r\n"
    return None


def test_a_transaction_with_replies_in_one_byte_chunks():
    """Replies may arrive in any pieces: one byte at a time, or a multi-line reply
    split mid-line, parse the same."""
    class Trickle(Hop):
        async def _serve(self, reader, writer):
            self._writers.append(writer)

            async def say(data: bytes):
                for i in range(len(data)):
                    writer.write(data[i:i + 1])
                    await writer.drain()
            await say(b"220-hop.test\r\n220 ready\r\n")
            while line := await reader.readline():
                answer = ehlo_then(ok_transaction)(line.rstrip(b"\r\n"), False)
                if answer:
                    await say(answer)

    async def main():
        async with Trickle(None) as hop:
            conn = await connect(hop)
            assert "PIPELINING" in conn.extensions
            tx = await conn.send("a@x.test", ["b@y.test", "c@y.test"], b"Subject: x\r\n\r\nhi\r\n")
            assert tx.mail.code == 250 and [r.code for r in tx.rcpts] == [250, 250]
            assert tx.data.code == 250 and tx.data.text == "queued as X"
            assert conn.usable
            conn.close()
    run(main())


async def send_with_mail_answered(answer: bytes | None, error: str, **kw) -> bool:
    """A transaction to a next hop that answers MAIL with ``answer`` (b"CLOSE": hangs
    up; None: says nothing) must fail with ``error``; whether the connection is still
    usable right after (before the hop goes away)."""
    async with Hop(ehlo_then(lambda line, s: answer if line.startswith(b"MAIL") else None)) as hop:
        conn = await connect(hop, **kw)
        with pytest.raises(SmtpClientError, match=error):
            await conn.send("a@x.test", ["b@y.test"], b"x\r\n")
        return conn.usable


def test_a_malformed_reply_ends_the_connection_with_its_text():
    async def main():
        assert not await send_with_mail_answered(b"hello there\r\n", "malformed reply 'hello there'")
    run(main())


def test_an_inconsistent_multi_line_reply_is_refused():
    run(send_with_mail_answered(b"250-one\r\n550 two\r\n", "inconsistent multi-line reply"))


def test_an_endless_reply_line_or_reply_is_cut_off():
    async def main():
        await send_with_mail_answered(b"250 " + b"x" * 100_000 + b"\r\n", "reply line too long")
        await send_with_mail_answered(b"250-x\r\n" * 500 + b"250 end\r\n", "reply too long")
    run(main())


def test_a_silent_next_hop_times_out_at_the_command_deadline():
    async def main():
        started = time.monotonic()
        usable = await send_with_mail_answered(None, "timeout waiting for a reply", command_timeout=0.5)
        assert 0.4 < time.monotonic() - started < 3
        assert not usable
    run(main())


def test_a_silent_banner_times_out_at_the_connect_deadline():
    async def main():
        async with Hop(lambda line, s: None, banner=b"") as hop:
            started = time.monotonic()
            with pytest.raises(SmtpClientError, match="timeout waiting for a reply"):
                await connect(hop, connect_timeout=0.5)
            assert time.monotonic() - started < 3
    run(main())


def test_a_next_hop_that_closes_mid_transaction():
    async def main():
        assert not await send_with_mail_answered(b"CLOSE", "connection closed by the next hop")
    run(main())


def test_replies_nobody_asked_for_make_the_connection_unusable_and_are_bounded():
    """An idle pooled connection that hears a 421 is not used again; a next hop that
    floods replies is dropped, not buffered."""
    def script(line: bytes, secure: bool):
        if line == b".":
            return b"250 queued\r\n421 going away\r\n"
        if line == b"NOOP":
            return b"250 flood\r\n" * 10_000
        return ok_transaction(line, secure)

    async def main():
        async with Hop(ehlo_then(script)) as hop:
            conn = await connect(hop)
            tx = await conn.send("a@x.test", ["b@y.test"], b"x\r\n")
            assert tx.data.code == 250
            await asyncio.sleep(0.2)
            assert not conn.usable            # the 421 arrived while idle
            conn.close()
            conn = await connect(hop)
            with pytest.raises(SmtpClientError, match="replies nobody asked for"):
                await conn.command(b"NOOP")
                for _ in range(100):          # the flood may arrive after the first replies
                    await conn.read_reply()
            assert not conn.usable
    run(main())


def test_starttls_to_the_next_hop_and_nothing_sent_in_clear_counts():
    """A 250 injected in clear right after the 220 to STARTTLS (RFC 3207 5; the
    STARTTLS command injection of CVE-2011-0411, seen from the client's side) is not
    taken as the answer to the EHLO sent inside TLS."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)

    def script(line: bytes, secure: bool):
        if line.upper().startswith(b"EHLO"):
            if secure:
                return b"250-hop.test secure\r\n250 PIPELINING\r\n"
            return b"250-hop.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
        if line == b"STARTTLS":
            # (one write: the 220 and the injection arrive together, before the handshake)
            return b"STARTTLS:220 go ahead\r\n250-injected\r\n250 INJECTED\r\n"
        return ok_transaction(line, secure)

    async def main():
        async with Hop(script, tls=server_ctx) as hop:
            conn = await connect(hop, tls=opportunistic_tls_context())
            assert conn.tls
            assert set(conn.extensions) == {"PIPELINING"}          # the EHLO answered inside TLS
            tx = await conn.send("a@x.test", ["b@y.test"], b"Subject: x\r\n\r\nhi\r\n")
            assert tx.data.code == 250
            assert any(line.startswith(b"MAIL") for line in hop.tls_lines)
            assert not any(line.startswith(b"MAIL") for line in hop.lines)
            conn.close()
    run(main())


def test_a_next_hop_that_stops_reading_mid_body_is_dropped_with_the_body():
    """The drain deadline ends the transaction; closing then drops the connection and
    what we had not sent yet (a graceful close would wait for a reader that never comes)."""
    received = []
    stalled = asyncio.Event()

    class Staller(Hop):
        async def _serve(self, reader, writer):
            self._writers.append(writer)
            writer.write(self.banner)
            while line := await reader.readline():
                line = line.rstrip(b"\r\n")
                if line.upper().startswith(b"EHLO"):
                    writer.write(EHLO)
                elif line == b"DATA":
                    writer.write(b"354 go\r\n")
                    break
                elif line.startswith((b"MAIL", b"RCPT")):
                    writer.write(b"250 ok\r\n")
            await stalled.wait()               # not reading: the client's buffers fill up
            total = 0
            try:
                while chunk := await asyncio.wait_for(reader.read(1 << 20), 5):
                    total += len(chunk)
            except (ConnectionError, asyncio.TimeoutError):
                pass
            received.append(total)

    async def main():
        body = b"x" * 998 + b"\r\n"
        wire = body * (48 * 1024)              # 48 MB, far beyond loopback's buffers
        async with Staller(None) as hop:
            conn = await connect(hop, command_timeout=0.5)
            started = time.monotonic()
            with pytest.raises(SmtpClientError, match="write failed: timed out"):
                await conn.send("a@x.test", ["b@y.test"], wire, wire_ready=True)
            assert time.monotonic() - started < 5
            conn.close()
            stalled.set()
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.1)
            assert received and received[0] < len(wire) // 2
    run(main())
