"""Relay control over real SMTP: only guarded domains inbound, every address trick
refused with a 5xx, trusted networks may relay, recipient lists give 550."""

from __future__ import annotations

import pytest

from tests.conftest import make_message

TRICKS = [
    ("percent hack", "<user%other.test@example.test>"),
    ("percent hack, upper case", "<USER%OTHER.TEST@EXAMPLE.TEST>"),
    ("bang path", "<other.test!user>"),
    ("bang path with guarded domain", "<other.test!user@example.test>"),
    ("source route", "<@example.test:user@other.test>"),
    ("source route to guarded", "<@other.test:user@example.test>"),
    ("source route, two hops", "<@a.test,@b.test:user@example.test>"),
    ("quoted local with @", '<"user@other.test"@example.test>'),
    ("quoted local with %", '<"user%other.test"@example.test>'),
    ("quoted local with !", '<"other.test!user"@example.test>'),
    ("trailing dot", "<user@example.test.>"),
    ("trailing dots", "<user@example.test..>"),
    ("IP literal", "<user@[127.0.0.1]>"),
    ("IPv6 literal", "<user@[IPv6:::1]>"),
    ("not guarded", "<user@other.test>"),
    ("not guarded, sub-domain", "<user@sub.example.test>"),
    ("not guarded, suffix", "<user@example.test.other.test>"),
    ("not guarded, spaces", "< user@other.test >"),
    ("not guarded, no brackets", "user@other.test"),
    ("no domain", "<user>"),
    ("two @", "<user@other.test@example.test>"),
    ("encoded word hiding CRLF", '<"=?utf-8?q?z=0D=0ARSET?="@example.test>'),
    ("comment in path", "<user(other.test)@example.test>"),
    ("backslash outside quotes", "<user\\ x@example.test>"),
    ("angle bracket in quotes", '<"> NOTIFY=SUCCESS"@example.test>'),
]


@pytest.fixture
def relay_gw(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.start()
    return gateway


def rcpt_reply(gw, rcpt: str) -> tuple[int, bytes]:
    with gw.smtp() as s:
        s.ehlo()
        code, _ = s.docmd("MAIL FROM:<alice@sender.test>")
        assert code == 250
        return s.docmd(f"RCPT TO:{rcpt}")


def test_every_relay_trick_is_refused_with_5xx(relay_gw):
    results = {name: rcpt_reply(relay_gw, rcpt) for name, rcpt in TRICKS}
    wrong = {name: r for name, r in results.items() if not 500 <= r[0] < 600}
    assert not wrong, f"tricks not refused with 5xx: {wrong}"
    # And nothing was queued for any of them.
    assert relay_gw.query("SELECT count(*) AS n FROM messages")[0]["n"] == 0


def test_trick_is_recorded_in_the_verdict_trace(relay_gw):
    code, _ = rcpt_reply(relay_gw, "<user%other.test@example.test>")
    assert code == 553
    relay_gw.wait_until(lambda: relay_gw.query(
        "SELECT 1 FROM verdicts WHERE symbol = 'RELAY_PERCENT_HACK'"), what="trace row")


def test_guarded_domain_is_accepted_in_any_case_and_delivered(relay_gw, sink):
    for rcpt in ("<bob@example.test>", "<Bob@EXAMPLE.Test>", "bob@example.test"):
        code, _ = rcpt_reply(relay_gw, rcpt)
        assert code == 250, rcpt
    with relay_gw.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@Example.TEST"], make_message(subject="relay ok"))
    got = sink.wait_for(1)
    assert got[0].rcpt_tos == ["bob@example.test"]
    assert b"Subject: relay ok" in got[0].data


def test_relay_denied_reply_text(relay_gw):
    code, text = rcpt_reply(relay_gw, "<user@other.test>")
    assert code == 554
    assert b"5.7.1" in text and b"Relay access denied" in text


def test_trusted_network_may_relay(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.policy().add_network("127.0.0.0/8")
    gateway.start()
    code, _ = rcpt_reply(gateway, "<user@elsewhere.test>")
    assert code == 250
    # ... but tricks stay refused even for trusted clients.
    code, _ = rcpt_reply(gateway, "<user%elsewhere.test@example.test>")
    assert code == 553


def test_network_change_is_picked_up_by_running_engine(relay_gw):
    assert rcpt_reply(relay_gw, "<user@elsewhere.test>")[0] == 554
    relay_gw.cli("networks", "add", "127.0.0.1/32")
    relay_gw.wait_until(lambda: rcpt_reply(relay_gw, "<user@elsewhere.test>")[0] == 250,
                        timeout=5, what="policy reload")


def test_recipient_list_rejects_unknown_users_only_when_present(relay_gw):
    assert rcpt_reply(relay_gw, "<nobody@example.test>")[0] == 250
    relay_gw.cli("recipients", "add", "bob@example.test")
    relay_gw.wait_until(lambda: rcpt_reply(relay_gw, "<nobody@example.test>")[0] == 550,
                        timeout=5, what="recipient list")
    code, text = rcpt_reply(relay_gw, "<nobody@example.test>")
    assert b"5.1.1" in text
    assert rcpt_reply(relay_gw, "<BOB@example.test>")[0] == 250
