"""SMTP hygiene with Postfix-grade defaults, over real sockets: SIZE advertised and
enforced while reading, 1,000 recipients per message, RFC 5321 command and text line
limits, idle timeouts answered with 421, soft/hard error limits, no user enumeration
through VRFY, and the ordinary odd-but-legal cases (empty body, null sender)."""

from __future__ import annotations

import time

import pytest

from mailbox_guard import replies
from tests.test_smuggling import Client, message_count, queued_id

HOST = "gw.test"          # smtp.hostname set by the gateway fixture


def start(gateway, sink, **settings: str):
    if settings:
        gateway.configure(**settings)
    gateway.policy().add_domain("example.test", sink.hop)
    return gateway.start()


@pytest.fixture
def gw(sink, gateway):
    # sink before gateway: the engine (and its pooled connections to the sink) is
    # stopped first, so the sink never holds an unclosed session at teardown.
    return start(gateway, sink)


def sized_message(size: int, subject: str = "big") -> bytes:
    """A message of exactly ``size`` octets (CRLF line ends, final CRLF included,
    no line starting with a dot)."""
    head = f"Subject: {subject}\r\n\r\n".encode()
    out = bytearray(head)
    line = b"x" * 78 + b"\r\n"
    while size - len(out) > 2 * len(line):
        out += line
    rest = size - len(out)
    assert rest >= 3
    if rest > len(line):                       # two lines, each at most 80 octets
        first = rest // 2
        out += b"y" * (first - 2) + b"\r\n"
        rest -= first
    out += b"z" * (rest - 2) + b"\r\n"
    assert len(out) == size
    return bytes(out)


# ----------------------------------------------------------------------------- SIZE
def test_ehlo_advertises_the_default_size_limit(gw):
    with Client(gw.port) as c:
        r = c.ehlo()
        assert "250-SIZE 10240000" in r.lines, r
        assert any(line[4:] == "PIPELINING" for line in r.lines), r
        # SIZE= at the limit is fine; above it 552, and the MAIL did not take effect.
        assert c.cmd("MAIL FROM:<a@b.test> SIZE=10240000").code == 250
        assert c.cmd("RSET").code == 250
        r = c.cmd("MAIL FROM:<a@b.test> SIZE=99999999")
        assert r.code == 552, r
        r = c.cmd("RCPT TO:<bob@example.test>")
        assert r.code == 503, r


def test_oversize_data_gets_552_after_the_end_and_the_session_goes_on(sink, gateway):
    gw = start(gateway, sink, **{"smtp.max_message_size": "100000"})
    with Client(gw.port) as c:
        assert "250-SIZE 100000" in c.ehlo().lines
        c.envelope()
        assert c.cmd("DATA").code == 354
        c.send(sized_message(1_000_000))
        # Enforced while reading, answered at the end of data: no early reply, no close.
        assert c.nothing_pending(0.3), c.buf
        c.send(b".\r\n")
        r = c.expect()
        assert r.text == replies.S552_TOO_BIG
        assert message_count(gw) == 0
        # The session still works.
        c.envelope()
        qid = queued_id(c.data(b"Subject: small\r\n\r\nsmall\r\n.\r\n"))
        assert c.cmd("QUIT").code == 221
    assert [r["id"] for r in gw.query("SELECT id FROM messages")] == [qid]
    got = sink.wait_for(1)
    assert got[0].data.endswith(b"Subject: small\r\n\r\nsmall\r\n")


def test_size_limit_boundary_exact_is_accepted_one_more_is_not(sink, gateway):
    gw = start(gateway, sink, **{"smtp.max_message_size": "100000"})
    exact = sized_message(100_000, "exact")
    with Client(gw.port) as c:
        c.ehlo()
        c.envelope()
        r = c.data(sized_message(100_001, "over") + b".\r\n")
        assert r.text == replies.S552_TOO_BIG
        assert message_count(gw) == 0
        c.envelope()
        qid = queued_id(c.data(exact + b".\r\n"))
        assert c.cmd("QUIT").code == 221
    assert gw.query("SELECT id, size FROM messages")[0]["id"] == qid
    got = sink.wait_for(1)
    assert got[0].data.endswith(exact)       # delivered intact behind the Received: header


# ----------------------------------------------------------------------------- recipients
def test_one_thousand_recipients_then_452(gw):
    with Client(gw.port, timeout=30) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<alice@sender.test>").code == 250
        c.send(b"".join(f"RCPT TO:<user{i}@example.test>\r\n".encode() for i in range(1001)))
        got = c.replies(1001, timeout=30)
        codes = [r.code for r in got]
        assert codes[:1000] == [250] * 1000, [(i, r) for i, r in enumerate(got) if r.code != 250][:3]
        assert got[1000].text == replies.S452_TOO_MANY_RECIPIENTS
        qid = queued_id(c.data(b"Subject: many\r\n\r\nto many\r\n.\r\n", timeout=30))
        assert c.cmd("QUIT").code == 221
    rows = gw.query("SELECT recipient FROM message_recipients WHERE message_id = ?", qid)
    assert len(rows) == 1000
    assert {r["recipient"] for r in rows} == {f"user{i}@example.test" for i in range(1000)}


# ----------------------------------------------------------------------------- line limits
def test_command_line_limit_is_512_octets_with_crlf(gw):
    with Client(gw.port) as c:
        c.ehlo()
        ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
        assert len(ok) == 512
        assert c.cmd(ok).code == 250
        over = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
        assert len(over) == 513
        r = c.cmd(over)
        assert r.text == replies.S500_LINE_TOO_LONG, "513-octet command line not refused: " + r.text
        # Far over the limit (beyond the reader's own buffer): still one 500.
        assert c.cmd(b"NOOP " + b"x" * 20000 + b"\r\n").text == replies.S500_LINE_TOO_LONG
        assert c.cmd(b"MAIL FROM:<a@b.test>" + b" " * 600 + b"\r\n").text == replies.S500_LINE_TOO_LONG
        # The session goes on.
        assert c.cmd("NOOP").code == 250
        c.envelope()
        queued_id(c.data(b"Subject: s\r\n\r\nok\r\n.\r\n"))


def test_repeated_ehlo_does_not_raise_the_command_line_limit(gw):
    # RFC 1870/6531 let MAIL grow by 26 (SIZE) + 10 (SMTPUTF8) octets: 548, once.
    with Client(gw.port) as c:
        for _ in range(5):
            c.ehlo()
        line = b"MAIL FROM:<a@b.test>" + b" " * 600 + b"\r\n"
        r = c.cmd(line)
        assert r.text == replies.S500_LINE_TOO_LONG, \
            f"{len(line)}-octet MAIL line accepted after 5 EHLOs: {r.text}"


TEXT_LINES = [
    # (id, line as sent on the wire without CRLF, accepted?)
    pytest.param(b"a" * 998, True, id="998+CRLF=1000"),
    pytest.param(b"." + b"." + b"b" * 997, True, id="stuffed-dot+997+CRLF=1000-unstuffed"),
    pytest.param(b"c" * 999, False, id="999+CRLF=1001"),
    pytest.param(b"." + b"." + b"c" * 998, False, id="stuffed-dot+998+CRLF=1001-unstuffed"),
    pytest.param(b"d" * 1000, False, id="1000+CRLF=1002"),
    pytest.param(b"e" * 50000, False, id="50000"),
]


@pytest.mark.parametrize("wire_line, accepted", TEXT_LINES)
def test_text_line_limit_is_1000_octets_with_crlf(gw, wire_line, accepted):
    with Client(gw.port) as c:
        c.ehlo()
        c.envelope()
        r = c.data(b"Subject: line\r\n\r\nbefore\r\n" + wire_line + b"\r\nafter\r\n.\r\n")
        if accepted:
            queued_id(r)
            assert message_count(gw) == 1
        else:
            assert 500 <= r.code < 600, f"{len(wire_line) + 2}-octet text line accepted: {r}"
            assert message_count(gw) == 0
        # Either way the session goes on.
        c.envelope()
        queued_id(c.data(b"Subject: next\r\n\r\nnext\r\n.\r\n"))


# ----------------------------------------------------------------------------- error limits
def _errors_until_421(c: Client, command: str, expected_code: int, limit: int) -> None:
    for i in range(1, limit + 5):
        r = c.cmd(command)
        assert r.code == expected_code, f"error #{i}: {r}"
        if i < limit:
            continue
        # The 20th error reply is followed at once by 421 and the close.
        r421 = c.expect()
        assert r421.text == replies.S421_TOO_MANY_ERRORS.format(hostname=HOST), f"after error #{i}: {r421}"
        assert c.until_eof(timeout=5) == []
        return
    raise AssertionError("never disconnected")


def test_hard_error_limit_relay_denied(gw):
    with Client(gw.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        # 19 errors leave the session usable ...
        for i in range(19):
            assert c.cmd("RCPT TO:<x@other.test>").code == 554, i
        assert c.cmd("NOOP").code == 250
        # ... the 20th ends it.
        r = c.cmd("RCPT TO:<x@other.test>")
        assert r.code == 554
        assert c.expect().text == replies.S421_TOO_MANY_ERRORS.format(hostname=HOST)
        assert c.until_eof(timeout=5) == []


def test_hard_error_limit_counts_unknown_commands_to_twenty(gw):
    with Client(gw.port) as c:
        c.ehlo()
        _errors_until_421(c, "FOOBAR", 500, 20)


def test_hard_error_limit_counts_mixed_errors(gw):
    with Client(gw.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        for i in range(19):
            r = c.cmd(["RCPT TO:<x@other.test>", b"NOOP\n", "MAIL FROM:<c@d.test>"][i % 3])
            assert 400 <= r.code < 600 and r.code != 421, (i, r)
        r = c.cmd("RCPT TO:<x@other.test>")
        assert r.code == 554
        assert c.expect().text == replies.S421_TOO_MANY_ERRORS.format(hostname=HOST)
        assert c.until_eof(timeout=5) == []


def test_soft_error_limit_slows_down_further_errors(sink, gateway):
    gw = start(gateway, sink, **{"smtp.error_sleep": "0.5s", "smtp.soft_error_limit": "2"})
    with Client(gw.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        took = []
        for _ in range(4):
            t0 = time.monotonic()
            assert c.cmd("RCPT TO:<x@other.test>").code == 554
            took.append(time.monotonic() - t0)
        assert max(took[:2]) < 0.3, f"errors within the soft limit were delayed: {took}"
        assert min(took[2:]) >= 0.45, f"errors past the soft limit were not delayed: {took}"
        # Success replies are not delayed.
        t0 = time.monotonic()
        assert c.cmd("NOOP").code == 250
        assert time.monotonic() - t0 < 0.3


# ----------------------------------------------------------------------------- timeouts
def test_idle_connection_gets_421_and_is_closed(sink, gateway):
    gw = start(gateway, sink, **{"smtp.timeout": "1s"})
    with Client(gw.port) as c:
        c.ehlo()
        t0 = time.monotonic()
        r = c.expect(timeout=5)
        elapsed = time.monotonic() - t0
        assert r.text == replies.S421_TIMEOUT.format(hostname=HOST)
        assert r.text.startswith("421 4.4.2 ")
        assert c.until_eof(timeout=3) == []
        assert 0.8 <= elapsed <= 3.0, elapsed


def test_stalled_data_times_out_and_nothing_is_queued(sink, gateway):
    gw = start(gateway, sink, **{"smtp.timeout": "1s"})
    with Client(gw.port) as c:
        c.ehlo()
        c.envelope()
        assert c.cmd("DATA").code == 354
        c.send(b"Subject: stalled\r\n\r\npart")
        t0 = time.monotonic()
        r = c.expect(timeout=5)
        assert r.text == replies.S421_TIMEOUT.format(hostname=HOST)
        assert c.until_eof(timeout=3) == []
        assert time.monotonic() - t0 <= 3.0
    time.sleep(0.2)
    assert message_count(gw) == 0


def test_slow_but_steady_client_is_not_timed_out(sink, gateway):
    gw = start(gateway, sink, **{"smtp.timeout": "1s"})
    with Client(gw.port) as c:
        c.ehlo()
        c.envelope()
        assert c.cmd("DATA").code == 354
        for part in (b"Subject: slow\r\n\r\n", b"one\r\n", b"two\r\n"):
            c.send(part)
            time.sleep(0.6)                  # 1.8 s in all, never 1 s idle
        c.send(b".\r\n")
        queued_id(c.expect(timeout=5))


# ----------------------------------------------------------------------------- misc
def test_vrfy_does_not_enumerate_users(sink, gateway):
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.policy().add_recipient("bob@example.test")     # a recipient list exists
    gw = gateway.start()
    with Client(gw.port) as c:
        c.ehlo()
        # The recipient list is live: RCPT tells them apart ...
        assert c.cmd("MAIL FROM:<a@b.test>").code == 250
        assert c.cmd("RCPT TO:<bob@example.test>").code == 250
        assert c.cmd("RCPT TO:<nobody@example.test>").code == 550
        assert c.cmd("RSET").code == 250
        # ... VRFY does not.
        known = c.cmd("VRFY <bob@example.test>")
        unknown = c.cmd("VRFY <nobody@example.test>")
        assert known.text == unknown.text == replies.S252_CANNOT_VRFY
        assert c.cmd("VRFY bob@example.test").text == c.cmd("VRFY nobody@example.test").text \
            == replies.S252_CANNOT_VRFY
        assert c.cmd("VRFY bob").code == c.cmd("VRFY nobody").code


def test_unknown_command_gets_500_and_the_session_goes_on(gw, sink):
    with Client(gw.port) as c:
        r = c.cmd("XYZZY plugh")
        assert r.code == 500, r
        c.ehlo()
        assert c.cmd("WHATEVER").code == 500
        c.envelope()
        assert c.cmd("BOGUS").code == 500
        qid = queued_id(c.data(b"Subject: after junk\r\n\r\nstill fine\r\n.\r\n"))
        assert c.cmd("QUIT").code == 221
    assert [r["id"] for r in gw.query("SELECT id FROM messages")] == [qid]


def test_empty_body_is_accepted(gw, sink):
    with Client(gw.port) as c:
        c.ehlo()
        c.envelope()
        qid = queued_id(c.data(b".\r\n"))
        assert c.cmd("QUIT").code == 221
    assert gw.query("SELECT size FROM messages WHERE id = ?", qid)
    got = sink.wait_for(1)
    assert got[0].rcpt_tos == ["bob@example.test"]
    assert got[0].data.startswith(b"Received: ")     # only our trace header


def test_null_sender_is_accepted(gw, sink):
    with Client(gw.port) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<>").text == replies.S250_SENDER_OK
        assert c.cmd("RCPT TO:<bob@example.test>").code == 250
        qid = queued_id(c.data(b"Subject: bounce\r\n\r\nreport\r\n.\r\n"))
        assert c.cmd("QUIT").code == 221
    assert gw.query("SELECT mail_from FROM messages WHERE id = ?", qid) == [{"mail_from": ""}]
    got = sink.wait_for(1)
    assert got[0].mail_from in ("", "<>")
    assert got[0].data.endswith(b"Subject: bounce\r\n\r\nreport\r\n")


@pytest.mark.parametrize("data,longest,crlf", [
    (b"", 0, False),
    (b"a\r\n", 1, True),
    (b"abc\r\n\r\nbody\r\n", 4, True),
    (b"a\nb\r\n", 1, False),              # a bare LF
    (b"a\rb\r\n", 1, False),              # a bare CR
    (b"a\r\r\n", 1, False),               # CR before CRLF
    (b"a\r\nb", 1, False),                # no final line end
    (b"x" * 600 + b"\r" + b"y" * 600 + b"\r\n", 600, False),   # a bare CR ends a line, as once relayed
])
def test_line_shape_finds_the_longest_line_and_bare_line_ends(data, longest, crlf):
    from mailbox_guard.mail.message import line_shape
    assert line_shape(data) == (longest, crlf)
