"""SMTP smuggling over real sockets: every bare-LF / bare-CR "end of data" variant
stays inside the one message it was sent in, only CRLF.CRLF ends DATA, commands
must end in CRLF, pipelined commands after a real end of data run as the next
transaction, and what reaches the next hop has CRLF line endings only and correct
dot-stuffing (unstuffed on the way in, stuffed again on the way out)."""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

import pytest

from mailbox_guard import replies

BARE_LINE_END = re.compile(rb"(?<!\r)\n|\r(?!\n)")
QUEUED = re.compile(r"^250 .*queued as (\S+)$")


# ----------------------------------------------------------------------------- raw client
@dataclass
class Reply:
    code: int
    lines: list[str]          # each line without its CRLF, code prefix included

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __repr__(self) -> str:
        return f"Reply({self.text!r})"


class Client:
    """A raw SMTP client over one loopback socket: exact bytes out, whole (multi-line)
    replies in, with timeouts everywhere."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""
        self.banner = self.reply()
        assert self.banner.code == 220, self.banner

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, timeout: float | None = None) -> bool:
        """Read more bytes; False on EOF (or a reset after the peer closed)."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        if not chunk:
            return False
        self.buf += chunk
        return True

    def _line(self, timeout: float | None = None) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self._fill(timeout):
                if self.buf:
                    raise AssertionError(f"connection closed inside a reply line: {self.buf!r}")
                return None
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self, timeout: float | None = None) -> Reply | None:
        """One complete reply (multi-line aware), or None at EOF before it starts."""
        lines: list[str] = []
        while True:
            raw = self._line(timeout)
            if raw is None:
                if lines:
                    raise AssertionError(f"connection closed inside a multi-line reply: {lines}")
                return None
            text = raw.decode("utf-8", "replace")
            assert re.match(r"^\d{3}[ -]", text) or re.fullmatch(r"\d{3}", text), \
                f"malformed reply line {raw!r}"
            lines.append(text)
            if len(text) == 3 or text[3] == " ":
                codes = {ln[:3] for ln in lines}
                assert len(codes) == 1, f"mixed codes in one reply: {lines}"
                return Reply(int(text[:3]), lines)

    def expect(self, timeout: float | None = None) -> Reply:
        r = self.reply(timeout)
        assert r is not None, "connection closed where a reply was expected"
        return r

    def cmd(self, line: str | bytes, timeout: float | None = None) -> Reply:
        data = line.encode() if isinstance(line, str) else line
        if not data.endswith(b"\n") and not data.endswith(b"\r"):
            data += b"\r\n"
        self.send(data)
        return self.expect(timeout)

    def replies(self, n: int, timeout: float | None = None) -> list[Reply]:
        return [self.expect(timeout) for _ in range(n)]

    def until_eof(self, timeout: float | None = None) -> list[Reply]:
        """Every reply until the server closes the connection."""
        out = []
        while True:
            r = self.reply(timeout)
            if r is None:
                return out
            out.append(r)

    def nothing_pending(self, wait: float = 0.3) -> bool:
        """True when no byte arrives within ``wait`` seconds (and the connection is open)."""
        if self.buf:
            return False
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return True
        self.buf += chunk
        return False

    def ehlo(self, name: str = "client.test") -> Reply:
        r = self.cmd(f"EHLO {name}")
        assert r.code == 250, r
        return r

    def envelope(self, mail_from: str = "alice@sender.test", rcpts=("bob@example.test",)) -> None:
        r = self.cmd(f"MAIL FROM:<{mail_from}>")
        assert r.code == 250, r
        for rcpt in rcpts:
            r = self.cmd(f"RCPT TO:<{rcpt}>")
            assert r.code == 250, r

    def data(self, stuffed_body_and_end: bytes, timeout: float | None = None) -> Reply:
        """DATA, then the given bytes verbatim (they must include the end of data)."""
        r = self.cmd("DATA")
        assert r.code == 354, r
        self.send(stuffed_body_and_end)
        return self.expect(timeout)


def queued_id(reply: Reply) -> str:
    m = QUEUED.match(reply.text)
    assert m, f"expected '250 ... queued as ID', got {reply}"
    return m.group(1)


def message_count(gw) -> int:
    return gw.query("SELECT count(*) AS n FROM messages")[0]["n"]


def wait_delivered(gw, n: int) -> None:
    gw.wait_until(lambda: gw.query("SELECT count(*) AS n FROM messages WHERE state = 'delivered'")[0]["n"] >= n,
                  what=f"{n} message(s) delivered")


def body_of(data: bytes) -> bytes:
    """The part after the header/body separator."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no header/body separator in {data[:200]!r}"
    return body


@pytest.fixture
def gw(sink, gateway):
    # sink before gateway: the engine (and its pooled connections to the sink) is
    # stopped first, so the sink never holds an unclosed session at teardown.
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.start()
    return gateway


# ----------------------------------------------------------------------------- smuggling
VARIANTS = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\n.\r", id="LF.CR"),
    pytest.param(b"\r.\n", id="CR.LF"),
    pytest.param(b"\r\n\x00.\r\n", id="CRLF-NUL.CRLF"),
    pytest.param(b"\r\n.\x00\r\n", id="CRLF.NUL-CRLF"),
    pytest.param(b"\r\n.\r\r\n", id="CRLF.CR-CRLF"),
    pytest.param(b"\n\r.\r\n", id="LF-CR.CRLF"),
    pytest.param(b"\r\n .\r\n", id="CRLF-SP.CRLF"),
]

SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled body\r\n")


@pytest.mark.parametrize("variant", VARIANTS)
def test_fake_end_of_data_stays_inside_one_message(gw, sink, variant):
    with Client(gw.port) as c:
        c.ehlo()
        c.envelope("alice@sender.test", ["bob@example.test"])
        r = c.cmd("DATA")
        assert r.code == 354, r
        # One packet: body with the fake end, the smuggled transaction, the real
        # end, and QUIT.
        c.send(b"Subject: x\r\n\r\nfirst part" + variant + SMUGGLED + b".\r\nQUIT\r\n")
        after = c.until_eof()

    # Exactly one reply to the data (250 queued), then the 221 of QUIT: no 250 for
    # a smuggled MAIL/RCPT, no 354 for a smuggled DATA.
    assert [r.code for r in after] == [250, 221], after
    qid = queued_id(after[0])
    assert sum(1 for r in after if QUEUED.match(r.text)) == 1
    rows = gw.query("SELECT id, mail_from FROM messages")
    assert [(row["id"], row["mail_from"]) for row in rows] == [(qid, "alice@sender.test")]
    rcpts = gw.query("SELECT recipient FROM message_recipients WHERE message_id = ?", qid)
    assert [row["recipient"] for row in rcpts] == ["bob@example.test"]

    got = sink.wait_for(1)
    wait_delivered(gw, 1)
    time.sleep(0.3)                       # a second delivery would show up by now
    assert len(sink.messages) == 1, [m.rcpt_tos for m in sink.messages]
    assert message_count(gw) == 1
    msg = got[0]
    assert msg.mail_from == "alice@sender.test"
    assert msg.rcpt_tos == ["bob@example.test"]
    # The smuggled text arrived, as content of the one message.
    assert b"first part" in msg.data
    assert b"smuggled body" in msg.data
    assert b"MAIL FROM:<evil@attacker.test>" in msg.data
    assert msg.data.count(b"Subject: x\r\n") == 1
    # Only CRLF line endings leave the gateway.
    assert not BARE_LINE_END.search(msg.data), \
        f"bare CR/LF delivered at {BARE_LINE_END.search(msg.data).start()}: {msg.data!r}"


def test_dot_stuffing_is_undone_on_the_way_in_and_redone_on_the_way_out(gw, sink):
    original = b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n.\r\n...\r\nend.\r\n. space\r\n"
    with Client(gw.port) as c:
        c.ehlo()
        c.envelope()
        r = c.data(b"Subject: dots\r\n\r\n..hidden\r\n...two\r\n..\r\n....\r\nend.\r\n.. space\r\n.\r\n")
        queued_id(r)
        # A dot-stuffed line right at the start of DATA (no headers at all).
        c.envelope()
        r = c.data(b"..first\r\nsecond\r\n.\r\n")
        queued_id(r)
        assert c.cmd("QUIT").code == 221
    got = sink.wait_for(2)
    by_subject = {b"Subject: dots" in m.data: m for m in got}
    dots = by_subject[True].data
    # The gateway adds a Received: header in front; the original follows intact.
    assert dots.endswith(original), dots
    assert body_of(dots) == b".hidden\r\n..two\r\n.\r\n...\r\nend.\r\n. space\r\n"
    first = by_subject[False].data
    assert first.endswith(b"\r\n.first\r\nsecond\r\n"), first
    for m in got:
        assert not BARE_LINE_END.search(m.data), m.data


# ----------------------------------------------------------------------------- commands
def test_commands_with_bare_lf_are_rejected_and_do_not_take_effect(gw):
    with Client(gw.port) as c:
        r = c.cmd(b"EHLO x\n")
        assert r.text == replies.S500_BARE_LF
        # The EHLO did not count: MAIL still needs a greeting first.
        r = c.cmd("MAIL FROM:<a@b.test>")
        assert r.code == 503 and "HELO" in r.text.upper(), r
        c.ehlo("x")
        r = c.cmd(b"MAIL FROM:<a@b.test>\n")
        assert r.text == replies.S500_BARE_LF
        r = c.cmd("RCPT TO:<x@example.test>")
        assert r.code == 503 and "need MAIL" in r.text, r
        # A bare LF inside a pipelined group is one rejected line, nothing more.
        c.send(b"MAIL FROM:<a@b.test>\nRCPT TO:<x@example.test>\r\nNOOP\r\n")
        got = c.replies(2)
        assert got[0].text == replies.S500_BARE_LF
        assert got[1].code == 503, got
        assert c.expect().code == 250            # the NOOP
        assert c.cmd("QUIT").code == 221
        assert c.until_eof() == []


def test_command_with_bare_cr_is_rejected_as_one_line(gw):
    with Client(gw.port) as c:
        c.ehlo()
        r = c.cmd(b"MAIL FROM:<a@b.test>\rRCPT TO:<x@example.test>\r\n")
        assert r.text == replies.S500_BARE_CR
        # Neither half took effect.
        r = c.cmd("RCPT TO:<x@example.test>")
        assert r.code == 503 and "need MAIL" in r.text, r
        r = c.cmd(b"NOOP\r\r\n")
        assert r.text == replies.S500_BARE_CR
        assert c.cmd("NOOP").code == 250
        assert c.cmd("QUIT").code == 221
        assert c.until_eof() == []            # no stray extra reply was pending


def test_commands_pipelined_after_the_real_end_of_data_are_the_next_transaction(gw, sink):
    with Client(gw.port) as c:
        c.ehlo()
        c.envelope("alice@sender.test", ["bob@example.test"])
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: one\r\n\r\nbody one\r\n.\r\n"
               b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@example.test>\r\nDATA\r\n")
        first, mail, rcpt, data = c.replies(4)
        q1 = queued_id(first)
        assert (mail.code, rcpt.code, data.code) == (250, 250, 354), (mail, rcpt, data)
        c.send(b"Subject: two\r\n\r\nbody two\r\n.\r\nQUIT\r\n")
        rest = c.until_eof()
        assert [r.code for r in rest] == [250, 221], rest
        q2 = queued_id(rest[0])
    assert q1 != q2
    rows = {r["id"]: r["mail_from"] for r in gw.query("SELECT id, mail_from FROM messages")}
    assert rows == {q1: "alice@sender.test", q2: "a@b.test"}
    got = sink.wait_for(2)
    by_rcpt = {tuple(m.rcpt_tos): m for m in got}
    assert set(by_rcpt) == {("bob@example.test",), ("c@example.test",)}
    assert body_of(by_rcpt[("bob@example.test",)].data) == b"body one\r\n"
    assert body_of(by_rcpt[("c@example.test",)].data) == b"body two\r\n"
    assert by_rcpt[("c@example.test",)].mail_from == "a@b.test"
