"""The outbound client against real next hops: pipelined and not, opportunistic
STARTTLS, Postfix's smtp-sink, connection reuse, dot-stuffing on the wire."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import trustme

from mailbox_guard.delivery.client import dot_stuff
from tests.conftest import Sink, free_port, make_message


def send_many(gw, n: int, rcpt: str = "bob@example.test") -> None:
    with gw.smtp() as s:
        for i in range(n):
            s.sendmail("alice@sender.test", [rcpt], make_message(subject=f"n{i}", to=rcpt))


def test_dot_stuffing():
    assert dot_stuff(b".a\r\n..b\r\nc.\r\n.\r\n") == b"..a\r\n...b\r\nc.\r\n..\r\n"


@pytest.mark.parametrize("pipelining", [True, False])
def test_delivery_with_and_without_pipelining_reuses_connections(gateway, pipelining):
    sink = Sink(pipelining=pipelining).start()
    try:
        gateway.policy().add_domain("example.test", sink.hop)
        gateway.start()
        send_many(gateway, 20)
        got = sink.wait_for(20)
        assert sorted(int(m.data.split(b"Subject: n")[1].split(b"\r\n")[0]) for m in got) == list(range(20))
        # Connections to the next hop are reused, not one per message.
        assert sink.sessions < 20
    finally:
        sink.stop()


def test_refused_recipient_does_not_spoil_the_reused_connection(gateway):
    sink = Sink().start()
    try:
        sink.rcpt_reply = lambda a: "550 5.1.1 nope" if a.startswith("bad") else None
        gateway.policy().add_domain("example.test", sink.hop)
        gateway.policy().add_domain("sender.test", sink.hop)
        gateway.start()
        with gateway.smtp() as s:
            s.sendmail("alice@sender.test", ["bad@example.test"], make_message(subject="x"))
            for i in range(5):
                s.sendmail("alice@sender.test", ["good@example.test"], make_message(subject=f"g{i}"))
        got = sink.wait_for(6)       # five good ones and the bounce for the bad one
        assert sum(1 for m in got if m.rcpt_tos == ["good@example.test"]) == 5
        assert sum(1 for m in got if m.rcpt_tos == ["alice@sender.test"]) == 1
    finally:
        sink.stop()


def test_opportunistic_starttls_to_the_next_hop(gateway):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "sink.test")
    ctx = __import__("ssl").create_default_context(__import__("ssl").Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    sink = Sink(tls_context=ctx).start()
    try:
        gateway.policy().add_domain("example.test", sink.hop)
        gateway.start()
        send_many(gateway, 2)
        got = sink.wait_for(2)
        assert all(m.tls for m in got)
    finally:
        sink.stop()


def test_postfix_smtp_sink_as_next_hop(gateway, tmp_path):
    """Postfix's smtp-sink (pipelining, a real MTA's SMTP server) stores what it gets."""
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    assert shutil.os.path.exists(binary), "smtp-sink (Debian postfix) is required"
    port = free_port()
    import tempfile
    # smtp-sink writes as "nobody": pytest's tmp_path sits below root-only folders.
    dump = Path(tempfile.mkdtemp(prefix="mg-smtp-sink-"))
    dump.chmod(0o777)
    proc = subprocess.Popen([binary, "-u", "nobody", "-d", str(dump / "%Y%m%d%H%M%S."),
                             f"127.0.0.1:{port}", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        gateway.policy().add_domain("example.test", f"127.0.0.1:{port}")
        gateway.start()
        body = "first\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
        with gateway.smtp() as s:
            for i in range(3):
                s.sendmail("alice@sender.test", ["bob@example.test"], make_message(subject=f"pf{i}", body=body))
        deadline = time.monotonic() + 20

        def written() -> int:
            # smtp-sink creates its file first and writes it when the transaction ends.
            return sum(1 for f in dump.iterdir() if b"end" in f.read_bytes())
        while time.monotonic() < deadline and written() < 3:
            time.sleep(0.05)
        files = sorted(dump.iterdir())
        assert len(files) == 3
        for f in files:
            data = f.read_bytes()
            # smtp-sink dumps the transaction with the message as it came off the wire,
            # unstuffed: the original lines must be intact.
            assert b"\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n" in data.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(dump, ignore_errors=True)
