"""A connection is in the engine's table from accept to close, however it ends: TLS
handshakes that fail, are abandoned or time out (STARTTLS and SMTPS) leave no ghost
behind (at once, not at the handshake deadline), count against the connection limits
while they last, can be killed, and stopping the engine after them or during them is a
clean stop. Odd bytes after a command answer 5xx, never 451."""

from __future__ import annotations

import signal
import socket
import ssl
import time
import warnings

import pytest

from mailbox_guard.control.client import ControlClient
from tests.conftest import free_port, new_gateway


def live(gw) -> list[dict]:
    return ControlClient(gw.home, timeout=10).call("connections")


def wait_empty(gw, timeout: float = 5) -> None:
    gw.wait_until(lambda: live(gw) == [], timeout=timeout, what="the connection table to empty")


def insecure() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_1_0() -> ssl.SSLContext:
    ctx = insecure()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # deprecated: that is the point
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def to_starttls(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert reply(s).startswith(b"220")
    s.sendall(b"EHLO client.test\r\n")
    assert b"STARTTLS" in reply(s)
    s.sendall(b"STARTTLS\r\n")
    assert reply(s).startswith(b"220")
    return s


# Every way a STARTTLS can go wrong that the issue lists.
def close_after_220(port):
    to_starttls(port).close()


def garbage_instead_of_hello(port):
    s = to_starttls(port)
    s.sendall(b"this is not a ClientHello\r\n" * 20)
    s.recv(100)
    s.close()


def tls_1_0_client(port):
    s = to_starttls(port)
    with pytest.raises((ssl.SSLError, OSError)):
        tls_1_0().wrap_socket(s).close()
    s.close()


def client_rejects_the_certificate(port):
    s = to_starttls(port)
    ctx = ssl.create_default_context()     # the self-signed certificate does not verify
    with pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(s, server_hostname="gw.test")
    s.close()


def starttls_twice(port):
    s = to_starttls(port)
    t = insecure().wrap_socket(s)
    t.sendall(b"EHLO client.test\r\n")
    assert b"STARTTLS" not in reply(t)            # not offered again
    t.sendall(b"STARTTLS\r\n")
    assert reply(t).startswith(b"554 5.5.1")
    t.sendall(b"NOOP\r\n")
    assert reply(t).startswith(b"250")             # the session goes on
    t.close()


TRIGGERS = [close_after_220, garbage_instead_of_hello, tls_1_0_client, client_rejects_the_certificate,
            starttls_twice]


@pytest.fixture
def tls_gw(gateway):
    gateway.smtps_port = free_port()
    gateway.configure(**{"smtp.tls_handshake_timeout": "1s"})
    gateway.start("--smtps", f"127.0.0.1:{gateway.smtps_port}")
    return gateway


@pytest.mark.parametrize("trigger", TRIGGERS, ids=lambda f: f.__name__)
def test_failed_starttls_leaves_no_ghost(tls_gw, trigger):
    trigger(tls_gw.port)
    wait_empty(tls_gw)
    assert "Traceback" not in tls_gw.log()


@pytest.fixture(scope="module")
def slow_tls_gw(tmp_path_factory):
    """One engine for the module whose TLS handshake deadline (30 s) is far off: an
    entry that leaves the table here left it because the connection ended, not
    because the deadline cut it."""
    gw = new_gateway(tmp_path_factory.mktemp("slow-tls") / "home")
    gw.smtps_port = free_port()
    gw.configure(**{"smtp.tls_handshake_timeout": "30s"})
    gw.start("--smtps", f"127.0.0.1:{gw.smtps_port}")
    yield gw
    gw.stop()


def until_closed(sock: socket.socket, seconds: float = 5) -> bytes:
    """What the server sent before it closed the connection (fails if it stays open)."""
    sock.settimeout(seconds)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def empty_within(gw, seconds: float) -> float:
    """How long the connection table took to empty; fails past ``seconds``."""
    started = time.monotonic()
    while live(gw):
        assert time.monotonic() - started < seconds, live(gw)
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("trigger", TRIGGERS, ids=lambda f: f.__name__)
def test_a_ghost_leaves_the_table_at_once_not_at_the_handshake_deadline(slow_tls_gw, trigger):
    assert live(slow_tls_gw) == []
    trigger(slow_tls_gw.port)
    assert empty_within(slow_tls_gw, 0.5) < 0.5         # the deadline is 30 s away
    assert "Traceback" not in slow_tls_gw.log()


def test_kill_of_a_connection_in_its_starttls_handshake(slow_tls_gw):
    s = to_starttls(slow_tls_gw.port)                  # the 220 read; no ClientHello sent
    try:
        slow_tls_gw.wait_until(lambda: [c["phase"] for c in live(slow_tls_gw)] == ["starttls"], timeout=5,
                               what="the STARTTLS handshake in the table")
        (conn,) = live(slow_tls_gw)
        out = slow_tls_gw.cli("connections", "kill", conn["id"], check=False)
        assert (out.returncode, out.stdout, out.stderr) == (0, f"{conn['id']}: closed\n", "")
        # Closed now, not in 30 s, and without a word: a clear-text line in the
        # middle of a handshake is garbage to the client's TLS layer.
        assert until_closed(s) == b""
        assert empty_within(slow_tls_gw, 0.5) < 0.5
    finally:
        s.close()
    log = slow_tls_gw.log()
    assert "Traceback" not in log and "internal error" not in log
    # Killing it again: it is gone, one line and exit 1.
    out = slow_tls_gw.cli("connections", "kill", conn["id"], check=False)
    assert out.returncode == 1 and out.stderr == f"mailbox-guard: no live connection {conn['id']}\n"


def test_a_silent_starttls_client_is_dropped_at_the_handshake_deadline(tls_gw):
    s = to_starttls(tls_gw.port)
    assert len(live(tls_gw)) == 1
    started = time.monotonic()
    s.settimeout(10)
    assert s.recv(100) == b""                      # the server closes it
    s.close()
    assert time.monotonic() - started < 5          # smtp.tls_handshake_timeout is 1s
    wait_empty(tls_gw)


@pytest.mark.parametrize("how", ["close", "garbage", "silent", "tls_1_0"])
def test_failed_smtps_handshake_leaves_no_ghost(tls_gw, how):
    s = socket.create_connection(("127.0.0.1", tls_gw.smtps_port), timeout=10)
    if how == "close":
        s.close()
    elif how == "garbage":
        s.sendall(b"EHLO client.test\r\n")
        s.recv(100)
        s.close()
    elif how == "silent":
        assert s.recv(100) == b""                  # closed at the handshake deadline
        s.close()
    else:
        with pytest.raises((ssl.SSLError, OSError)):
            tls_1_0().wrap_socket(s)
        s.close()
    wait_empty(tls_gw)


def test_sixty_half_open_starttls_clients_lock_nobody_out_and_stop_is_clean(tls_gw):
    for _ in range(60):                            # more than smtp.max_connections_per_ip (50)
        close_after_220(tls_gw.port)
    wait_empty(tls_gw)
    with tls_gw.smtp() as s:
        assert s.ehlo()[0] == 250
        assert s.starttls(context=insecure())[0] == 220
        assert s.ehlo()[0] == 250
    # And a probe right before the stop does not make the stop fail.
    close_after_220(tls_gw.port)
    s = socket.create_connection(("127.0.0.1", tls_gw.smtps_port), timeout=10)
    assert tls_gw.stop(signal.SIGTERM) == 0
    s.close()
    assert not (tls_gw.home / "engine.json").exists()
    assert not (tls_gw.home / "control.sock").exists()
    assert "internal error" not in tls_gw.log() and "Traceback" not in tls_gw.log()


def test_smtps_handshakes_count_against_the_limits_and_time_out(gateway):
    gateway.smtps_port = free_port()
    gateway.configure(**{"smtp.max_connections_per_ip": "3", "smtp.tls_handshake_timeout": "2s"})
    gateway.start("--smtps", f"127.0.0.1:{gateway.smtps_port}")
    held = [socket.create_connection(("127.0.0.1", gateway.smtps_port), timeout=10) for _ in range(3)]
    gateway.wait_until(lambda: len(live(gateway)) == 3, timeout=5, what="three handshakes in the table")
    assert {c["phase"] for c in live(gateway)} == {"tls"}
    # The fourth from the same address is closed at once, before any handshake ...
    with socket.create_connection(("127.0.0.1", gateway.smtps_port), timeout=10) as fourth:
        started = time.monotonic()
        assert fourth.recv(100) == b""
        assert time.monotonic() - started < 1.5
    # ... and so is a plain-text client on the inbound port (the limit is per address).
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as plain:
        assert reply(plain).startswith(b"421 4.7.0")
    # The handshakes that never came are cut at the deadline, and the address is free.
    for s in held:
        assert s.recv(100) == b""
        s.close()
    wait_empty(gateway)
    with socket.create_connection(("127.0.0.1", gateway.smtps_port), timeout=10) as s:
        with insecure().wrap_socket(s) as t:
            assert reply(t).startswith(b"220")


def test_handshakes_count_against_the_total_limit(gateway):
    gateway.smtps_port = free_port()
    gateway.configure(**{"smtp.max_connections": "2", "smtp.tls_handshake_timeout": "5s"})
    gateway.start("--smtps", f"127.0.0.1:{gateway.smtps_port}")
    held = [socket.create_connection(("127.0.0.1", gateway.smtps_port), timeout=10) for _ in range(2)]
    try:
        gateway.wait_until(lambda: len(live(gateway)) == 2, timeout=5, what="two handshakes in the table")
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as plain:
            answer = reply(plain)
            assert answer.startswith(b"421 4.7.0") and b"too many connections" in answer
    finally:
        for s in held:
            s.close()
    wait_empty(gateway)


def test_kill_of_a_connection_in_its_smtps_handshake(slow_tls_gw):
    with socket.create_connection(("127.0.0.1", slow_tls_gw.smtps_port), timeout=10) as s:
        slow_tls_gw.wait_until(lambda: len(live(slow_tls_gw)) == 1, timeout=5, what="the handshake in the table")
        (conn,) = live(slow_tls_gw)
        assert slow_tls_gw.cli("connections", "kill", conn["id"]).returncode == 0
        assert s.recv(100) == b""
    wait_empty(slow_tls_gw)
    assert "Traceback" not in slow_tls_gw.log()


def test_sigint_with_starttls_handshakes_open_is_a_clean_stop(gateway):
    gateway.configure(**{"smtp.tls_handshake_timeout": "30s"})
    gateway.start()
    held = [to_starttls(gateway.port) for _ in range(5)]     # each in its handshake, none to end soon
    try:
        gateway.wait_until(lambda: [c["phase"] for c in live(gateway)] == ["starttls"] * 5, timeout=5,
                           what="five STARTTLS handshakes in the table")
        started = time.monotonic()
        assert gateway.stop(signal.SIGINT) == 0
        assert time.monotonic() - started < 10          # not the 30 s handshake deadline
        for s in held:
            assert until_closed(s) == b""              # closed by the stop, without clear text
    finally:
        for s in held:
            s.close()
    assert not (gateway.home / "engine.json").exists()
    assert not (gateway.home / "control.sock").exists()
    log = gateway.log()
    assert "internal error" not in log and "Traceback" not in log


ODD = ["\u0085", "\u2028", "\x1c", "\u00a0", "\u3000"]


@pytest.mark.parametrize("command", ["AUTH", "AUTH PLAIN", "EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "VRFY",
                                     "NOOP", "HELP", "STARTTLS", "DATA", "RSET", "QUIT"])
def test_unicode_spaces_and_controls_after_a_command_are_a_syntax_error(gateway, command):
    gateway.start()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        assert reply(s).startswith(b"220")
        s.sendall(b"EHLO client.test\r\n")
        reply(s)
        for odd in ODD:
            s.sendall(f"{command} {odd}\r\n".encode())
            answer = reply(s)
            assert not answer.startswith(b"451"), (command, odd, answer)
            if command == "AUTH":
                assert answer.startswith(b"501"), (odd, answer)
            if not answer or answer.startswith(b"221"):
                break
    log = gateway.log()
    assert "internal error" not in log and "Traceback" not in log
