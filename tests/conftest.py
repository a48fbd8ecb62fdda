"""Shared fixtures: the real engine as a subprocess (``python -m mailbox_guard serve``)
on ephemeral loopback ports with its own home, and a real SMTP sink downstream
(aiosmtpd) that records what it receives and can answer 4xx/5xx on demand."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from aiosmtpd.controller import Controller

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def helper_pids(parent: int, marker: str = "") -> list[int]:
    """Live child processes of ``parent`` whose command line contains ``marker``
    (the engine's helpers: "store.writer", "delivery.agent")."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmdline = (entry / "cmdline").read_text(errors="replace")
        except OSError:
            continue
        if ppid == str(parent) and marker in cmdline and process_alive(int(entry.name)):
            out.append(int(entry.name))
    return out


def wait_for_banner(port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"engine exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"no SMTP banner on port {port}")


# ----------------------------------------------------------------------------- sink
@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes            # as received after the dot (unstuffed, line endings as sent)
    at: float = field(default_factory=time.time)
    tls: bool = False
    peer: tuple = ()


class _SinkHandler:
    def __init__(self, sink: "Sink") -> None:
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.sink.sessions += 1
        self.sink.protocols.append(server)
        if self.sink.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.sink.rcpt_reply(address) if self.sink.rcpt_reply else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        reply = self.sink.data_reply(envelope) if self.sink.data_reply else None
        if reply:
            return reply
        with self.sink.lock:
            self.sink.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                               bytes(envelope.original_content),
                                               tls=session.ssl is not None, peer=session.peer))
        return "250 2.0.0 Ok: stored"


class Sink:
    """A real SMTP server downstream. ``rcpt_reply(addr)`` / ``data_reply(env)`` may
    return a reply to refuse; None accepts."""

    def __init__(self, *, pipelining: bool = True, tls_context=None) -> None:
        self.port = free_port()
        self.pipelining = pipelining
        self.sessions = 0
        self.protocols: list = []
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.rcpt_reply: Callable[[str], str | None] | None = None
        self.data_reply: Callable[[object], str | None] | None = None
        kwargs = {"tls_context": tls_context} if tls_context is not None else {}
        self.controller = Controller(_SinkHandler(self), hostname="127.0.0.1", port=self.port,
                                     ready_timeout=10, **kwargs)

    def start(self) -> "Sink":
        self.controller.start()
        return self

    def stop(self) -> None:
        # Close sessions the engine keeps open (its connection pool) before the
        # server goes, or their transports are left for the garbage collector.
        done = threading.Event()

        def close_all():
            for proto in self.protocols:
                if proto.transport is not None:
                    proto.transport.close()
            done.set()
        self.controller.loop.call_soon_threadsafe(close_all)
        done.wait(5)
        time.sleep(0.05)
        self.controller.stop()

    @property
    def hop(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        with self.lock:
            raise AssertionError(f"sink got {len(self.messages)} message(s), expected {count}")


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


# ----------------------------------------------------------------------------- gateway
class Gateway:
    """``mailbox-guard serve`` in a subprocess with a throwaway home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = home.parent / f"{home.name}-engine.log"
        self.env = dict(os.environ, MAILBOX_GUARD_HOME=str(home), PYTHONUNBUFFERED="1")

    # The CLI, exactly as an admin runs it.
    def cli(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "mailbox_guard", *args], env=self.env,
                              capture_output=True, text=True, timeout=60, input=input, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"mailbox-guard {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
        return proc

    def configure(self, **settings: str) -> None:
        from mailbox_guard.store.db import PolicyStore, ensure_home
        store = PolicyStore(ensure_home(self.home))
        for key, value in settings.items():
            store.set_setting(key.replace("__", "."), value)

    def policy(self):
        from mailbox_guard.store.db import PolicyStore, ensure_home
        return PolicyStore(ensure_home(self.home))

    def start(self, *extra: str, listeners_from_store: bool = False) -> "Gateway":
        """Start ``serve``; with ``listeners_from_store`` the listeners kept in the
        store are used (``self.port`` must be one of them)."""
        self.policy()        # creates the home and store before the engine does
        self._log = open(self.log_path, "ab")
        flags = [] if listeners_from_store else ["--inbound", f"127.0.0.1:{self.port}"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailbox_guard", "serve", *flags, *extra],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for_banner(self.port, proc=self.proc)
        # engine.json is written once every listener is bound: the inbound banner
        # alone does not mean the submission or SMTPS listener is up yet.
        deadline = time.monotonic() + 15
        while not (self.home / "engine.json").exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the engine did not finish starting")
            time.sleep(0.02)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        self._log.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_with(self, text: str, timeout: float = 10) -> str:
        """The log once it holds ``text`` (lines reach it from the engine's log thread,
        a moment after the event)."""
        self.wait_until(lambda: text in self.log(), timeout, what=f"log line with {text!r}")
        return self.log()

    def smtp(self, timeout: float = 10) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=timeout)

    def db(self):
        import sqlite3
        conn = sqlite3.connect(self.home / "mailbox-guard.db", timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, *args) -> list:
        conn = self.db()
        try:
            return [dict(r) for r in conn.execute(sql, args)]
        finally:
            conn.close()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n--- engine log tail ---\n{self.log()[-3000:]}")

    def engine_state(self) -> dict:
        return json.loads((self.home / "engine.json").read_text())


def new_gateway(home: Path) -> Gateway:
    gw = Gateway(home)
    # Tests run on loopback with no real DNS: never let the engine use the system
    # resolver; retries fast so retry behaviour is observable in seconds.
    gw.configure(**{"smtp.hostname": "gw.test", "smtp.error_sleep": "0",
                    "queue.retry_schedule": "1s", "dns.nameservers": "127.0.0.1:9",
                    "dns.timeout": "1s"})
    return gw


@pytest.fixture
def gateway(tmp_path):
    gw = new_gateway(tmp_path / "home")
    yield gw
    gw.stop()


def make_message(subject: str = "hello", body: str = "Hello there.\r\n", *, sender: str = "alice@sender.test",
                 to: str = "bob@example.test", message_id: str | None = None) -> bytes:
    mid = message_id or f"<{time.time_ns()}.{os.getpid()}@client.test>"
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: {mid}\r\n"
            f"Date: Tue, 01 Dec 2026 08:00:00 +0000\r\n\r\n{body}").encode()
