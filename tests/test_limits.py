"""Limits on what a stranger can send: connections per address and in all, mail
loops, clients that stop reading, control bytes in addresses."""

from __future__ import annotations

import socket
import time

from mailbox_guard import replies
from tests.conftest import make_message


def banner(port: int) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s, s.recv(1000)


def test_connections_per_address_are_limited(gateway):
    gateway.configure(**{"smtp.max_connections_per_ip": "3"})
    gateway.start()
    held = []
    try:
        for _ in range(3):
            s, b = banner(gateway.port)
            held.append(s)
            assert b.startswith(b"220")
        s, b = banner(gateway.port)
        held.append(s)
        assert b.startswith(b"421 4.7.0") and b"too many connections from your address" in b
        assert s.recv(100) == b""           # and closed
    finally:
        for s in held:
            s.close()
    # Once the others are gone, the address is welcome again.
    gateway.wait_until(lambda: banner_ok(gateway.port), timeout=5, what="slot freed")


def banner_ok(port: int) -> bool:
    s, b = banner(port)
    s.close()
    return b.startswith(b"220")


def test_connections_in_all_are_limited(gateway):
    gateway.configure(**{"smtp.max_connections": "2"})
    gateway.start()
    held = []
    try:
        for _ in range(2):
            s, b = banner(gateway.port)
            held.append(s)
            assert b.startswith(b"220")
        s, b = banner(gateway.port)
        held.append(s)
        assert b.startswith(b"421") and b"too many connections" in b
    finally:
        for s in held:
            s.close()


def test_mail_loop_is_refused_at_data(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.start()
    looped = b"".join(b"Received: from hop%d.test by hop%d.test; Tue, 1 Dec 2026 08:00:00 +0000\r\n" % (i, i)
                      for i in range(51)) + make_message()
    with gateway.smtp() as s:
        s.ehlo()
        s.mail("a@sender.test")
        s.rcpt("b@example.test")
        code, text = s.data(looped)
        assert (code, text.decode()) == (554, replies.S554_TOO_MANY_HOPS[4:])
        # 50 hops are still fine.
        s.mail("a@sender.test")
        s.rcpt("b@example.test")
        assert s.data(b"".join(looped.split(b"\r\n", 1)[1:]))[0] == 250
    assert gateway.query("SELECT count(*) AS n FROM verdicts WHERE symbol = 'MAIL_LOOP'")  # traced


def test_client_that_never_reads_is_dropped(gateway):
    gateway.configure(**{"smtp.timeout": "1s"})
    gateway.start()
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.recv(100)
        # Pipeline far more replies than any buffer holds, and never read them.
        payload = b"HELP\r\n" * 200000
        s.setblocking(False)
        sent, deadline = 0, time.monotonic() + 10
        while sent < len(payload) and time.monotonic() < deadline:
            try:
                sent += s.send(payload[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
            except (ConnectionResetError, BrokenPipeError):
                break
        # Within a few timeouts the server gives up on us.
        deadline = time.monotonic() + 15
        gone = False
        while time.monotonic() < deadline and not gone:
            try:
                if s.recv(1 << 20) == b"":
                    gone = True
            except BlockingIOError:
                time.sleep(0.1)
            except (ConnectionResetError, BrokenPipeError):
                gone = True
        assert gone, "the server kept a connection that never reads"
    finally:
        s.close()
    assert gateway.proc.poll() is None


def test_control_bytes_in_addresses_are_refused(gateway):
    gateway.policy().add_domain("example.test", "127.0.0.1:9")
    gateway.start()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.recv(100)
        s.sendall(b"EHLO c.test\r\n")
        time.sleep(0.2)
        s.recv(1000)
        s.sendall(b"MAIL FROM:<a\x00b@sender.test>\r\n")
        assert s.recv(1000)[:1] == b"5"
        s.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<a\x7fb@example.test>\r\n")
        time.sleep(0.3)
        replies_ = s.recv(1000).split(b"\r\n")
        assert replies_[0].startswith(b"250") and replies_[1][:1] == b"5"
    assert gateway.query("SELECT count(*) AS n FROM messages")[0]["n"] == 0
