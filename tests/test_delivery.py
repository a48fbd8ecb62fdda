"""End to end: smtplib -> mailbox-guard serve -> a real SMTP sink; retries after a
4xx, one DSN after a 5xx, none for a bounce, MX routing over a real DNS server."""

from __future__ import annotations

import email
import email.policy
import re
import time

import pytest

from tests.conftest import helper_pids, make_message, process_alive
from tests.dns_server import ZoneServer

BARE = re.compile(rb"(?<!\r)\n|\r(?!\n)")


def dsn_parts(data: bytes) -> tuple[email.message.Message, str]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    status = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_bytes().decode("ascii", "replace")
    return msg, text


@pytest.fixture
def routed(gateway, sink):
    """example.test (recipients) and sender.test (where bounces go) both to the sink."""
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.policy().add_domain("sender.test", sink.hop)
    return gateway


def test_accepted_mail_is_delivered_byte_for_byte(routed, sink):
    routed.start()
    original = make_message(subject="byte check", body="line one\r\n.dot line\r\n\r\nlast\r\n")
    with routed.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test", "carol@example.test"], original)
    got = sink.wait_for(1)[0]
    assert got.mail_from == "alice@sender.test"
    assert sorted(got.rcpt_tos) == ["bob@example.test", "carol@example.test"]
    assert got.data.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby gw.test (mailbox_guard)")
    assert got.data.endswith(original)
    routed.wait_until(lambda: routed.query("SELECT state FROM messages")[0]["state"] == "delivered",
                      what="delivered state")
    # The body is dropped once delivered; the record stays for `messages why`.
    assert routed.query("SELECT count(*) AS n FROM message_bodies")[0]["n"] == 0
    rows = routed.query("SELECT recipient, state FROM message_recipients ORDER BY recipient")
    assert [(r["recipient"], r["state"]) for r in rows] == [
        ("bob@example.test", "delivered"), ("carol@example.test", "delivered")]


def test_250_reply_names_the_queue_id_and_trace_is_kept(routed, sink):
    routed.start()
    with routed.smtp() as s:
        s.ehlo()
        s.mail("alice@sender.test")
        s.rcpt("bob@example.test")
        code, text = s.data(make_message(message_id="<trace-1@client.test>"))
    assert code == 250
    queue_id = re.search(rb"queued as ([0-9A-F]+)", text).group(1).decode()
    row = routed.query("SELECT message_id FROM messages WHERE id = ?", queue_id)[0]
    assert row["message_id"] == "<trace-1@client.test>"
    symbols = [r["symbol"] for r in routed.query(
        "SELECT symbol FROM verdicts WHERE message_id = ? ORDER BY seq", queue_id)]
    assert "RELAY_GUARDED_DOMAIN" in symbols and symbols[-1] == "QUEUED"


def test_retry_after_4xx_from_next_hop(routed, sink):
    attempts = []

    def flaky(address):
        attempts.append(time.monotonic())
        return "451 4.3.0 come back later" if len(attempts) <= 2 else None

    sink.rcpt_reply = flaky
    routed.start()
    with routed.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test"], make_message(subject="retry me"))
    got = sink.wait_for(1, timeout=30)
    assert b"Subject: retry me" in got[0].data
    assert len(attempts) == 3
    routed.wait_until(lambda: len(routed.query("SELECT 1 FROM delivery_log")) == 3, what="3 log rows")
    log = routed.query("SELECT outcome, reply FROM delivery_log ORDER BY id")
    assert [r["outcome"] for r in log] == ["deferred", "deferred", "delivered"]
    assert "451 4.3.0 come back later" in log[0]["reply"]
    # No bounce was produced for a temporary failure.
    assert len(sink.messages) == 1


def test_retry_after_4xx_at_end_of_data(routed, sink):
    calls = []
    sink.data_reply = lambda env: (calls.append(1), "452 4.3.1 insufficient storage")[1] if len(calls) < 1 else None
    routed.start()
    with routed.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test"], make_message(subject="data retry"))
    got = sink.wait_for(1, timeout=30)
    assert b"Subject: data retry" in got[0].data
    routed.wait_until(lambda: [r["outcome"] for r in routed.query(
        "SELECT outcome FROM delivery_log ORDER BY id")] == ["deferred", "delivered"], what="log rows")


def test_one_dsn_after_5xx(routed, sink):
    sink.rcpt_reply = lambda a: "550 5.1.1 <bob@example.test>: no such user" if a.startswith("bob@") else None
    routed.start()
    with routed.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test", "carol@example.test"],
                   make_message(subject="partly bounced"))
    got = sink.wait_for(2, timeout=20)
    time.sleep(1.5)          # would a second bounce come? it must not
    assert len(sink.messages) == 2
    normal = next(m for m in got if m.mail_from == "alice@sender.test")
    assert normal.rcpt_tos == ["carol@example.test"]
    bounce = next(m for m in got if m.mail_from in ("", "<>"))
    assert bounce.rcpt_tos == ["alice@sender.test"]
    msg, status = dsn_parts(bounce.data)
    assert msg["To"] == "alice@sender.test" or "alice@sender.test" in str(msg["To"])
    assert "Final-Recipient: rfc822; bob@example.test" in status
    assert "Status: 5.1.1" in status and "Action: failed" in status
    assert "carol@example.test" not in status
    assert "550 5.1.1" in status
    assert not BARE.search(bounce.data)
    # The bounce is queued under its own (folded) Message-ID, unfolded: `messages why` finds it.
    queued = routed.query("SELECT message_id FROM messages WHERE mail_from = ''")[0]["message_id"]
    assert queued == str(msg["Message-ID"]).strip() and queued.endswith("@gw.test>")
    states = {r["recipient"]: r["state"] for r in routed.query("SELECT recipient, state FROM message_recipients")}
    assert states == {"bob@example.test": "bounced", "carol@example.test": "delivered",
                      "alice@sender.test": "delivered"}


def test_bounce_is_never_bounced(routed, sink):
    sink.rcpt_reply = lambda a: "550 5.1.1 no such user"
    routed.start()
    with routed.smtp() as s:
        s.sendmail("", ["bob@example.test"], make_message(subject="I am a bounce"))
    routed.wait_until(lambda: routed.query("SELECT state FROM messages")[0]["state"] == "bounced",
                      what="bounced state")
    time.sleep(1.5)
    assert routed.query("SELECT count(*) AS n FROM messages")[0]["n"] == 1
    assert sink.messages == []
    assert "no bounce for a bounce" in routed.log()


def test_mx_routing_by_preference_with_fallback(gateway, sink):
    dead = "127.0.0.2"      # nothing listens there on the sink's port: connection refused
    zone = f"""
$ORIGIN remote.test.
$TTL 60
@      IN SOA ns hostmaster 1 3600 600 86400 30
@      MX 10 mx-dead
@      MX 20 mx-live
mx-dead A {dead}
mx-live A 127.0.0.1
$ORIGIN plain.test.
@      IN SOA ns hostmaster 1 3600 600 86400 30
@      A 127.0.0.1
"""
    with ZoneServer(zone) as dns_server:
        gateway.configure(**{"dns.nameservers": f"127.0.0.1:{dns_server.port}",
                             "delivery.port": str(sink.port), "delivery.connect_timeout": "2s"})
        gateway.policy().add_network("127.0.0.0/8")   # the test client may relay outward
        gateway.start()
        with gateway.smtp() as s:
            s.sendmail("alice@sender.test", ["user@remote.test"], make_message(subject="via mx"))
            s.sendmail("alice@sender.test", ["user@plain.test"], make_message(subject="via A"))
        got = sink.wait_for(2, timeout=20)
        subjects = sorted(re.search(rb"Subject: (.*?)\r\n", m.data).group(1) for m in got)
        assert subjects == [b"via A", b"via mx"]
        assert dns_server.queries_for("remote.test", "MX") >= 1
        # The preferred (dead) MX was tried first, then the next one delivered.
        assert dns_server.queries_for("mx-dead.remote.test", "A") >= 1


def test_null_mx_bounces_at_once(gateway, sink):
    zone = """
$ORIGIN nomail.test.
$TTL 60
@      IN SOA ns hostmaster 1 3600 600 86400 30
@      MX 0 .
"""
    with ZoneServer(zone) as dns_server:
        gateway.configure(**{"dns.nameservers": f"127.0.0.1:{dns_server.port}"})
        gateway.policy().add_domain("sender.test", sink.hop)
        gateway.policy().add_network("127.0.0.0/8")
        gateway.start()
        with gateway.smtp() as s:
            s.sendmail("alice@sender.test", ["user@nomail.test"], make_message(subject="to null mx"))
        bounce = sink.wait_for(1, timeout=20)[0]
        assert bounce.mail_from in ("", "<>")
        _, status = dsn_parts(bounce.data)
        assert "Status: 5.1.10" in status
        assert "null MX" in status


def test_expiry_returns_the_message_with_4_4_7(routed, sink):
    routed.configure(**{"queue.max_lifetime": "3s"})
    routed.policy().add_domain("dead.test", "127.0.0.1:9")     # discard port: refused
    routed.start()
    with routed.smtp() as s:
        s.sendmail("alice@sender.test", ["user@dead.test"], make_message(subject="never arrives"))
    bounce = sink.wait_for(1, timeout=30)[0]
    assert bounce.mail_from in ("", "<>")
    _, status = dsn_parts(bounce.data)
    assert "Status: 4.4.7" in status and "Action: failed" in status
    # Words, not Python: how long it waited, and why the last attempt failed.
    assert "message expired after 3 seconds in the queue; last reply: 4.4.1 connection refused by " \
        "127.0.0.1:9" in " ".join(status.split())
    assert "Errno" not in status and "Errno" not in bounce.data.decode()
    attempts = routed.query("SELECT count(*) AS n FROM delivery_log WHERE recipient = 'user@dead.test'")[0]["n"]
    assert attempts >= 2


def test_outbound_has_only_crlf_line_endings(routed, sink):
    routed.start()
    raw = b"Subject: mixed endings\r\n\r\nbare lf\nbare cr\rcrlf\r\n\n.\nend"
    with routed.smtp() as s:
        s.ehlo()
        s.mail("alice@sender.test")
        s.rcpt("bob@example.test")
        # smtplib would fix the line endings itself: send the bytes raw.
        s.putcmd("DATA")
        assert s.getreply()[0] == 354
        s.send(raw + b"\r\n.\r\n")
        assert s.getreply()[0] == 250
    got = sink.wait_for(1)[0]
    assert not BARE.search(got.data)
    assert got.data.endswith(b"bare lf\r\nbare cr\r\ncrlf\r\n\r\n.\r\nend\r\n")


def test_swaks_with_pipelining_is_delivered(routed, sink):
    """A second, independent client (Debian's swaks) that pipelines its commands."""
    import shutil
    import subprocess
    swaks = shutil.which("swaks")
    assert swaks, "swaks is required (./run test installs it)"
    routed.start()
    out = subprocess.run([swaks, "--server", f"127.0.0.1:{routed.port}", "--pipeline",
                          "--from", "alice@sender.test", "--to", "bob@example.test,carol@example.test",
                          "--helo", "swaks.test", "--header", "Subject: via swaks", "--body", "hi\n.dot\n"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "queued as" in out.stdout
    got = sink.wait_for(1)[0]
    assert sorted(got.rcpt_tos) == ["bob@example.test", "carol@example.test"]
    assert b"Subject: via swaks" in got.data and b"\r\n.dot\r\n" in got.data


def test_mail_queued_while_delivery_is_busy_goes_out_as_slots_free_up(routed, sink):
    """With one delivery slot, messages committed while it is busy wait in the store;
    each finished delivery looks for the next at once (not at the once-a-second poll)."""
    routed.configure(delivery__concurrency="1")

    def slow(envelope):
        time.sleep(0.05)
        return None

    sink.data_reply = slow
    routed.start()
    with routed.smtp() as s:
        for i in range(15):
            s.sendmail("alice@sender.test", ["bob@example.test"], make_message(subject=f"backlog {i}"))
    sent = time.monotonic()
    assert len(sink.wait_for(15, timeout=30)) == 15
    # 15 deliveries of ~0.05 s each; polling once a second would take about 14 s.
    assert time.monotonic() - sent < 6.0
    routed.wait_until(lambda: routed.query(
        "SELECT count(*) AS n FROM messages WHERE state = 'delivered'")[0]["n"] == 15, what="all delivered")


def test_a_killed_delivery_agent_defers_and_a_new_agent_delivers(routed, sink):
    """The SMTP client work runs in the delivery agent process. Killed in the middle
    of a transaction, its delivery is deferred (nothing lost) and the retry, by a
    new agent, delivers."""
    import os
    import signal
    calls = []

    def slow_first(address):
        calls.append(address)
        if len(calls) == 1:
            time.sleep(2)         # the agent waits on this reply when it is killed
        return None

    sink.rcpt_reply = slow_first
    routed.start()
    with routed.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test"], make_message(subject="agent death"))
    routed.wait_until(lambda: calls, what="the agent's RCPT at the sink")
    agents = helper_pids(routed.proc.pid, "delivery.agent")
    assert len(agents) == 1, f"delivery agents of the engine: {agents}"
    os.kill(agents[0], signal.SIGKILL)
    got = sink.wait_for(1, timeout=30)
    assert got[0].rcpt_tos == ["bob@example.test"]
    routed.wait_until(lambda: routed.query("SELECT state FROM messages")[0]["state"] == "delivered",
                      what="delivered state")
    outcomes = [r["outcome"] for r in routed.query("SELECT outcome FROM delivery_log ORDER BY id")]
    assert outcomes == ["deferred", "delivered"], outcomes
    assert "delivery agent connection lost" in routed.log()
    engine_pid = routed.proc.pid
    new_agents = helper_pids(engine_pid, "delivery.agent")
    assert len(new_agents) == 1 and new_agents != agents
    assert routed.stop() == 0
    assert not process_alive(new_agents[0]), "the delivery agent outlived its engine"
