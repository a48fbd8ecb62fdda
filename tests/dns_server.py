"""A small authoritative DNS server on loopback for tests.

``ZoneServer`` serves one zone, given as zone-file text, over UDP *and* TCP on
the same ephemeral port of 127.0.0.1.  It is built on ``dnslib``'s server
framework and is meant to be shared by every test that needs DNS, so nothing
in the test suite ever touches the system resolver or the network.

What it answers (enough for mail checks, deliberately not a full server):

* the records of the queried name and type (``NOERROR``);
* ``NOERROR`` with an empty answer (NODATA) when the name exists with other
  types only, or is an empty non-terminal (RFC 8020);
* ``NXDOMAIN`` when the name does not exist;
* a CNAME at the name is returned (and followed inside the zone) when the
  queried type is absent;
* the zone's SOA in the authority section of negative answers when the zone
  has one, so clients can do RFC 2308 negative caching.

Test knobs, all safe to change while the server runs:

* ``set_zone(text)`` replaces the served data atomically;
* ``fail_mode``: ``None`` | ``"servfail"`` | ``"drop"`` (no reply at all, so
  the client times out);
* ``truncate_udp``: answer every UDP query with an empty, TC-flagged reply so
  that clients must retry over TCP;
* ``query_count`` / ``tcp_query_count`` / ``queries_for(name, rdtype)``.
"""

from __future__ import annotations

import collections
import errno
import socket
import socketserver
import struct
import threading

from dnslib import QTYPE, RCODE, RR, DNSError, DNSRecord
from dnslib.server import DNSServer

__all__ = ["ZoneServer"]

_FAIL_MODES = (None, "servfail", "drop")
# serve_forever() only notices shutdown() between polls; the default 0.5 s
# would make every server stop cost up to a second across both protocols.
_POLL_INTERVAL = 0.02


def _key(name) -> str:
    """Normalise a name for lookups: lower-case, no trailing dot."""
    text = str(name).lower().rstrip(".")
    return text


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    # No SO_REUSEADDR for UDP: on Linux it would let two sockets share a port.
    allow_reuse_address = False
    # Non-daemon, tracked handler threads: server_close() joins them, so no
    # handler can outlive the test that started it.
    daemon_threads = False
    block_on_close = True


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True  # tolerate TIME_WAIT leftovers
    daemon_threads = False
    block_on_close = True


class _QuietLogger:
    """dnslib logs to stdout by default; tests only need errors, kept here."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def log_recv(self, handler, data) -> None:
        return None

    log_send = log_request = log_reply = log_truncated = log_data = log_recv

    def log_error(self, handler, e) -> None:
        self.errors.append(str(e))


class _Handler(socketserver.BaseRequestHandler):
    """Like dnslib's DNSHandler, but able to stay silent ("drop")."""

    def handle(self) -> None:
        server = self.server
        tcp = server.socket_type == socket.SOCK_STREAM
        if tcp:
            self.request.settimeout(2.0)
            data = self._read_tcp()
            if data is None:
                return
        else:
            data, sock = self.request
        try:
            request = DNSRecord.parse(data)
        except DNSError as e:
            server.logger.log_error(self, e)
            return
        reply = server.resolver.resolve(request, tcp=tcp)
        if reply is None:  # fail_mode == "drop"
            return
        wire = reply.pack()
        if tcp:
            self.request.sendall(struct.pack("!H", len(wire)) + wire)
        else:
            sock.sendto(wire, self.client_address)

    def _read_tcp(self) -> bytes | None:
        buf = b""
        try:
            while len(buf) < 2:
                chunk = self.request.recv(65537)
                if not chunk:
                    return None
                buf += chunk
            (length,) = struct.unpack("!H", buf[:2])
            while len(buf) - 2 < length:
                chunk = self.request.recv(65537)
                if not chunk:
                    return None
                buf += chunk
        except OSError as e:
            self.server.logger.log_error(self, e)
            return None
        return buf[2 : 2 + length]


class _ZoneResolver:
    def __init__(self, owner: "ZoneServer") -> None:
        self._owner = owner

    def resolve(self, request: DNSRecord, *, tcp: bool) -> DNSRecord | None:
        owner = self._owner
        qname = _key(request.q.qname)
        qtype = request.q.qtype
        owner._count(qname, qtype, tcp)

        mode = owner.fail_mode
        if mode == "drop":
            return None
        reply = request.reply()
        if mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if owner.truncate_udp and not tcp:
            reply.header.tc = 1
            return reply

        records, names = owner._data  # one consistent snapshot of the zone
        name = qname
        for _ in range(8):  # bounded CNAME chasing inside the zone
            rrs = records.get(name, [])
            matching = [rr for rr in rrs if rr.rtype == qtype or qtype == QTYPE.ANY]
            if matching:
                for rr in matching:
                    reply.add_answer(rr)
                return reply
            cnames = [rr for rr in rrs if rr.rtype == QTYPE.CNAME]
            if not cnames or qtype == QTYPE.CNAME:
                break
            reply.add_answer(cnames[0])
            name = _key(cnames[0].rdata.label)

        exists = name in names
        if not exists and not reply.rr:
            reply.header.rcode = RCODE.NXDOMAIN
        soa = owner._soa_for(name)
        if soa is not None:
            reply.add_auth(soa)
        return reply


class ZoneServer:
    """Authoritative loopback DNS server for one zone (UDP + TCP, same port)."""

    def __init__(self, zone_text: str) -> None:
        self._fail_mode: str | None = None
        self.truncate_udp = False
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()
        self._tcp_count = 0
        self._data: tuple[dict, frozenset] = ({}, frozenset())
        self._soas: list = []
        self._udp: DNSServer | None = None
        self._tcp: DNSServer | None = None
        self._threads: list[threading.Thread] = []
        self.logger = _QuietLogger()
        self.port = 0
        self.set_zone(zone_text)

    @property
    def fail_mode(self) -> str | None:
        return self._fail_mode

    @fail_mode.setter
    def fail_mode(self, mode: str | None) -> None:
        if mode not in _FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {_FAIL_MODES!r}")
        self._fail_mode = mode

    # -- zone data -----------------------------------------------------
    def set_zone(self, zone_text: str) -> None:
        """Replace the served zone; takes effect for the next query."""
        records: dict[str, list] = collections.defaultdict(list)
        soas = []
        for rr in RR.fromZone(zone_text):
            records[_key(rr.rname)].append(rr)
            if rr.rtype == QTYPE.SOA:
                soas.append(rr)
        names = set()
        for owner in records:
            # Every ancestor of an owner name exists too (empty
            # non-terminals answer NODATA, not NXDOMAIN: RFC 8020).
            labels = owner.split(".")
            for i in range(len(labels)):
                names.add(".".join(labels[i:]))
        soas.sort(key=lambda rr: -len(_key(rr.rname)))  # most specific first
        # Swap in one assignment so handler threads never see a half zone.
        self._soas = soas
        self._data = (dict(records), frozenset(names))

    def _soa_for(self, name: str):
        for soa in self._soas:
            apex = _key(soa.rname)
            if name == apex or name.endswith("." + apex) or apex == "":
                return soa
        return None

    # -- counters ------------------------------------------------------
    def _count(self, name: str, qtype: int, tcp: bool) -> None:
        with self._lock:
            self._counts[(name, str(QTYPE[qtype]))] += 1
            if tcp:
                self._tcp_count += 1

    @property
    def query_count(self) -> int:
        """Total queries received (UDP + TCP, including dropped ones)."""
        with self._lock:
            return sum(self._counts.values())

    @property
    def tcp_query_count(self) -> int:
        with self._lock:
            return self._tcp_count

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        """Snapshot {(name, "TYPE"): n}; names lower-case without dot."""
        with self._lock:
            return dict(self._counts)

    def queries_for(self, name: str, rdtype: str) -> int:
        with self._lock:
            return self._counts[(_key(name), rdtype.upper())]

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._tcp_count = 0

    # -- lifecycle -----------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> "ZoneServer":
        if self._udp is not None:
            raise RuntimeError("ZoneServer already started")
        resolver = _ZoneResolver(self)
        last_error: OSError | None = None
        for _ in range(10):
            udp = DNSServer(resolver, address="127.0.0.1", port=0, logger=self.logger,
                            handler=_Handler, server=_UDPServer)
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(resolver, address="127.0.0.1", port=port, tcp=True,
                                logger=self.logger, handler=_Handler, server=_TCPServer)
            except OSError as e:
                udp.server.server_close()
                if e.errno != errno.EADDRINUSE:
                    raise
                last_error = e
                continue
            break
        else:
            raise RuntimeError("could not bind UDP and TCP to one port") from last_error
        self._udp, self._tcp, self.port = udp, tcp, port
        for srv, proto in ((udp, "udp"), (tcp, "tcp")):
            t = threading.Thread(target=srv.server.serve_forever,
                                 kwargs={"poll_interval": _POLL_INTERVAL},
                                 name=f"ZoneServer-{proto}-{port}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        servers = [s for s in (self._udp, self._tcp) if s is not None]
        self._udp = self._tcp = None
        for srv in servers:
            srv.server.shutdown()  # ends serve_forever()
        for srv in servers:
            srv.server.server_close()  # closes the socket, joins handlers
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> "ZoneServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
