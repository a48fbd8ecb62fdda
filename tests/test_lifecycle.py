"""Start, drain and reload: SIGTERM lets a transaction in flight finish with 250 and
refuses new sessions; SIGHUP reloads policy; one engine per home."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from tests.conftest import ROOT, make_message


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) >= 2 and lines[-1] == b"" and lines[-2][3:4] == b" ":
            return data


def test_sigterm_drains_a_transaction_in_flight(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    gateway.start()
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    assert read_reply(s).startswith(b"220")
    for cmd in (b"EHLO c.test", b"MAIL FROM:<alice@sender.test>", b"RCPT TO:<bob@example.test>", b"DATA"):
        s.sendall(cmd + b"\r\n")
        assert read_reply(s)[:1] in (b"2", b"3")
    s.sendall(make_message(subject="in flight")[:60])
    gateway.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # No new sessions while draining.
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=3) as other:
            banner = read_reply(other)
            assert banner == b"" or banner.startswith(b"421")
    except ConnectionRefusedError:
        pass
    s.sendall(make_message(subject="in flight")[60:] + b"\r\n.\r\n")
    reply = read_reply(s)
    assert reply.startswith(b"250 2.0.0 OK: queued as"), reply
    s.close()
    assert gateway.proc.wait(30) == 0
    assert "stopped cleanly" in gateway.log()
    assert gateway.query("SELECT count(*) AS n FROM messages")[0]["n"] == 1


def test_sigterm_tells_idle_sessions_to_come_back(gateway):
    gateway.start()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        assert read_reply(s).startswith(b"220")
        s.sendall(b"EHLO c.test\r\n")
        read_reply(s)
        gateway.proc.send_signal(signal.SIGTERM)
        assert read_reply(s).startswith(b"421")
    assert gateway.proc.wait(30) == 0


def test_sighup_reloads_and_keeps_serving(gateway):
    gateway.start()
    gateway.policy().add_domain("late.test", "127.0.0.1:9")
    gateway.proc.send_signal(signal.SIGHUP)
    gateway.wait_until(lambda: "policy version" in gateway.log(), timeout=5, what="reload")
    with gateway.smtp() as s:
        s.ehlo()
        s.mail("a@sender.test")
        assert s.rcpt("x@late.test")[0] == 250
    assert gateway.proc.poll() is None


def test_one_engine_per_home(gateway):
    gateway.start()
    out = subprocess.run([sys.executable, "-m", "mailbox_guard", "serve", "--inbound", "127.0.0.1:0"],
                         env=gateway.env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 1
    assert "another mailbox-guard engine" in out.stderr and "Traceback" not in out.stderr


def test_state_file_names_the_bound_listeners(gateway):
    gateway.start()
    state = gateway.engine_state()
    assert state["pid"] == gateway.proc.pid
    assert {"name": "inbound", "kind": "inbound", "host": "127.0.0.1", "port": gateway.port} in state["listeners"]
