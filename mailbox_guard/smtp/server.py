"""The SMTP listeners: what a listener's sessions need from the engine (a
:class:`Listener`, nothing more), the live connection table, the refusals made
before any SMTP object exists, and the SMTPS accept loop.

A connection is in the table from accept to close, TLS handshake included, and
leaves it exactly once however it ends.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aiosmtpd.smtp import TLSSetupException

from mailbox_guard import replies
from mailbox_guard.model import SessionFacts
from mailbox_guard.session.session import Deps
from mailbox_guard.smtp.protocol import GuardSMTP

log = logging.getLogger("mailbox_guard.smtp")

_CONN_IDS = itertools.count(1)


class ConnectionTable:
    """The live sessions of every listener: counted by client address, shown by
    ``connections``, told to go on shutdown. ``on_open``/``on_close`` report to the
    engine (events, the stored connection record)."""

    def __init__(self, on_open: Callable[[Any], None] = lambda p: None,
                 on_close: Callable[[Any], None] = lambda p: None) -> None:
        self.sessions: dict[str, Any] = {}
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.draining = False
        self._on_open = on_open
        self._on_close = on_close

    def __len__(self) -> int:
        return len(self.sessions)

    def count_from(self, ip: str) -> int:
        return self.per_ip[ip]

    def opened(self, proto) -> None:
        self.sessions[proto.facts.connection_id] = proto
        self.per_ip[proto.facts.peer_ip] += 1
        self._on_open(proto)

    def closed(self, proto) -> None:
        if self.sessions.pop(proto.facts.connection_id, None) is not None:
            self.per_ip[proto.facts.peer_ip] -= 1
            if self.per_ip[proto.facts.peer_ip] <= 0:
                del self.per_ip[proto.facts.peer_ip]
        self._on_close(proto)


@dataclass
class Listener:
    """What the sessions of one listener need from the engine, and nothing more."""
    name: str
    kind: str                                   # inbound | submission | smtps
    require_auth: bool
    plaintext_auth: bool
    policy: Callable[[], Any]                   # the current policy snapshot
    deps: Deps                                  # for the protocol-free session
    table: ConnectionTable
    auth: Any                                   # auth.service.AuthService
    tls_context: Callable[[], Any]              # a fresh ssl.SSLContext (a new certificate at once)
    gssapi: Callable[[], Any] = lambda: None    # auth.kerberos availability, or None
    home: Path | None = None


class Refuse(asyncio.Protocol):
    """Answers one line (none on an SMTPS port, where the client expects TLS) and
    closes: connection-level refusals before any SMTP object is built (draining now;
    access rules and flow control later)."""

    def __init__(self, reply: str | None, why: str) -> None:
        self.reply = reply
        self.why = why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("?",)
        log.info("refused connection from [%s]: %s", peer[0], self.why)
        if self.reply is not None:
            transport.write(self.reply.encode("ascii") + b"\r\n")   # type: ignore[attr-defined]
        transport.close()


def make_protocol(listener: Listener, handler: Any) -> asyncio.Protocol:
    """The protocol factory of a listener: refusals first, then a GuardSMTP."""
    settings = listener.policy().settings
    hostname = settings["smtp.hostname"]
    plain = listener.kind != "smtps"
    if listener.table.draining:
        return Refuse(replies.S421_SHUTTING_DOWN.format(hostname=hostname) if plain else None, "shutting down")
    if len(listener.table) >= settings["smtp.max_connections"]:
        return Refuse(replies.S421_TOO_MANY_CONNECTIONS.format(hostname=hostname) if plain else None,
                      "too many connections in all")
    return SmtpSession(listener, handler)


class SmtpSession(GuardSMTP):
    """GuardSMTP bound to the live connection table: a connection is in the table
    from accept to close, TLS handshake included, and leaves it exactly once
    (:meth:`release`) however it ends."""

    def __init__(self, listener: Listener, handler: Any) -> None:
        settings = listener.policy().settings
        facts = SessionFacts(connection_id="", listener=listener.name,
                             listener_kind=listener.kind, peer_ip="", peer_port=0)
        # Submission and SMTPS: AUTH before MAIL. Inbound (MX): no AUTH at all.
        # aiosmtpd knows TLS only as STARTTLS: on SMTPS the whole connection is TLS,
        # so its "AUTH only after STARTTLS" rule is lifted there (and its warning
        # about that, meant for plain-text listeners, silenced).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            super().__init__(handler, listener, facts=facts, data_size_limit=settings["smtp.max_message_size"],
                             enable_SMTPUTF8=True, decode_data=False, hostname=settings["smtp.hostname"],
                             ident="mailbox_guard", timeout=settings["smtp.timeout"],
                             tls_context=listener.tls_context() if listener.kind != "smtps" else None,
                             auth_required=listener.require_auth,
                             auth_require_tls=listener.kind != "smtps" and not listener.plaintext_auth,
                             loop=asyncio.get_running_loop())
        if not listener.require_auth:
            self._auth_methods.clear()
        self.implicit_tls = listener.kind == "smtps"
        self.smtp_started = False      # aiosmtpd's connection_made has run
        self.handshake: asyncio.Task | None = None     # SMTPS: the task doing it, until done

    def _tls_facts(self, transport: asyncio.BaseTransport) -> None:
        obj = transport.get_extra_info("ssl_object")
        if obj is None:
            return
        cipher = obj.cipher() or ("?", "?", 0)
        peer = obj.getpeercert() or None
        self.guard.tls_established(obj.version(), cipher[0], cipher[2], peer.get("subject") if peer else None)

    def admit(self, peer: tuple) -> bool:
        """Take a new connection from ``peer`` into the engine's table; False (and a
        log line) when its address already has too many."""
        now = time.time()
        self.facts.peer_ip = str(peer[0])
        self.facts.peer_port = int(peer[1]) if len(peer) > 1 else 0
        self.facts.started_at = now
        policy = self.listener.policy()
        self.facts.trusted_network = policy.is_trusted(self.facts.peer_ip)
        per_ip = policy.settings["smtp.max_connections_per_ip"]
        if not self.facts.trusted_network and self.listener.table.count_from(self.facts.peer_ip) >= per_ip:
            log.info("refused connection from [%s]: too many connections from the address", self.facts.peer_ip)
            self.released = True
            return False
        self.facts.connection_id = f"C{int(now * 1000):011X}{next(_CONN_IDS):05X}"
        self.listener.table.opened(self)
        return True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.released:                         # killed during its SMTPS handshake
            transport.abort()
            return
        if not self.facts.connection_id:          # SMTPS sessions were admitted before TLS
            if not self.admit(transport.get_extra_info("peername") or ("?", 0)):
                # Refused before any command is read: the banner is the only reply.
                transport.write(replies.S421_TOO_MANY_FROM_IP.format(hostname=self.hostname).encode() + b"\r\n")
                transport.close()
                return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._begin(transport)
        if self.implicit_tls:
            self.session.ssl = self._ssl_info(transport)

    def _begin(self, transport: asyncio.BaseTransport) -> None:
        self.smtp_started = True
        self.phase = "connect"
        if self.implicit_tls:
            self._tls_protocol = transport      # aiosmtpd's "TLS is on" flag
        super().connection_made(transport)     # aiosmtpd: reader, writer, the command loop
        self._tls_facts(transport)             # an SMTPS listener: TLS from the first byte
        self.connect_task = asyncio.ensure_future(self.guard.connect())

    def connection_lost(self, error: Exception | None) -> None:
        try:
            if self.smtp_started:
                super().connection_lost(error)
        finally:
            self.release()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        if self.handshake is not None and self.handshake is not asyncio.current_task():
            self.handshake.cancel()         # killed or stopped during its SMTPS handshake
        self.guard.close()
        self.listener.table.closed(self)


class ImplicitTlsServer:
    """An SMTPS listener that accepts by itself: a connection is admitted (counted by
    its address, or refused) before its TLS handshake, which has a deadline. The
    loop's own ``create_server(ssl=...)`` only shows a connection once its handshake
    is done, so half-open handshakes were neither counted nor limited."""

    def __init__(self, listener: Listener, handler: Any, sockets: list[socket.socket]) -> None:
        self.listener = listener
        self.handler = handler
        self.sockets = sockets
        self._accepting = [asyncio.ensure_future(self._accept(s)) for s in sockets]
        self._handshakes: set[asyncio.Task] = set()

    @classmethod
    async def start(cls, listener: Listener, handler: Any, host: str, port: int) -> "ImplicitTlsServer":
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(1024)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return cls(listener, handler, sockets)

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listening)
            except OSError as exc:        # out of file descriptors, say: breathe, go on
                log.warning("SMTPS accept failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.ensure_future(self._handshake(conn, peer))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, peer: tuple) -> None:
        listener = self.listener
        refused = make_protocol(listener, self.handler)
        if not isinstance(refused, SmtpSession):
            log.info("refused connection from [%s]: %s", peer[0], refused.why)   # type: ignore[attr-defined]
            conn.close()
            return
        session = refused
        if not session.admit(peer):
            conn.close()               # no plain-text reply: the client expects TLS
            return
        session.phase = "tls"
        session.handshake = asyncio.current_task()
        deadline = listener.policy().settings["smtp.tls_handshake_timeout"]
        try:
            async with asyncio.timeout(deadline + 1):
                await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: session, conn, ssl=listener.tls_context(),
                    ssl_handshake_timeout=deadline)
        except asyncio.CancelledError:
            conn.close()
            session.release()
            raise
        except Exception as exc:         # whatever the handshake raised: the client's failure
            conn.close()
            session._tls_failed(TLSSetupException(str(exc)))
            session.release()
        finally:
            session.handshake = None

    def close(self) -> None:
        for task in (*self._accepting, *self._handshakes):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._accepting, return_exceptions=True)
