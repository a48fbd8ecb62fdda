"""The engine: one process with the SMTP listeners, the store, delivery workers and
the policy snapshot, started and drained as one unit.

``serve`` builds an :class:`Engine` for a home folder and runs it until SIGTERM or
SIGINT (drain: stop accepting, let sessions in flight finish within
``engine.drain_timeout``, close the store cleanly). SIGHUP reloads the policy at once;
otherwise a change in the store is picked up within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailbox_guard.queue import ops as q
from mailbox_guard import replies
from mailbox_guard.auth.service import AuthService
from mailbox_guard.auth.users import dummy_hash
from mailbox_guard.checks import default_checks
from mailbox_guard.config import Settings
from mailbox_guard.control.server import SOCKET_NAME, ControlServer
from mailbox_guard.delivery.worker import LEASE_SECONDS, Delivery
from mailbox_guard.lookups.dns import DnsCache
from mailbox_guard.events import EventBus, Stats
from mailbox_guard.model import QueuedMessage, Result, SessionFacts
from mailbox_guard.policy.snapshot import Policy
from mailbox_guard.session.pipeline import Pipeline
from mailbox_guard.session.session import Deps
from mailbox_guard.smtp.handler import Handler, assert_hooks
from mailbox_guard.smtp.server import ConnectionTable, ImplicitTlsServer, Listener, make_protocol
from mailbox_guard.tls import TlsError, TlsManager
from mailbox_guard.store.db import DB_NAME, PolicyStore, Readers, StoreError, ensure_home, policy_sections, state_versions
from mailbox_guard.store.writer import Writer

log = logging.getLogger("mailbox_guard.engine")

DEFAULT_LISTENERS = (("inbound", "inbound", "127.0.0.1", 2525),
                     ("submission", "submission", "127.0.0.1", 2587))


@dataclass(frozen=True)
class ListenerSpec:
    name: str
    kind: str
    host: str
    port: int
    require_auth: bool = False       # only authenticated clients (always so for submission)
    plaintext_auth: bool = False     # PLAIN/LOGIN before TLS: loopback listeners only


def load_policy(conn) -> Policy:
    """The snapshot from the store's named sections."""
    sections = policy_sections(conn)
    return Policy.from_sections(sections.pop("version"), **sections)


class _Observer:
    """The session's reports to the live view (stats and events)."""

    def __init__(self, stats: Stats, events: EventBus) -> None:
        self.stats = stats
        self.events = events

    def result(self, check: str, symbol: str, action: str) -> None:
        self.stats.result(check, symbol, action)

    def refused(self, facts: SessionFacts, phase: str, subject: str, deciding: Result | None,
                reply: str | None) -> None:
        if phase == "auth":
            self.stats.count("auth_failed")
        else:
            self.stats.count("tempfailed" if reply and reply[:1] == "4" else "rejected")
        self.events.publish("reject", connection=facts.connection_id, peer_ip=facts.peer_ip,
                            phase=phase, subject=subject, check=deciding.check if deciding else None,
                            symbol=deciding.symbol if deciding else None, reply=reply)


class EngineLockedError(StoreError):
    pass


class Engine:
    def __init__(self, home: Path, *, listeners: list[ListenerSpec] | None = None,
                 metrics: tuple[str, int] | None = None, checks: list | None = None) -> None:
        self.home = Path(home)
        self.metrics_at = metrics
        self.metrics = None
        self.listener_override = listeners
        self.db_path = self.home / DB_NAME
        self.policy = Policy(version=0, settings=Settings())
        self.bans_version = -1
        self.table = ConnectionTable(on_open=self._session_opened, on_close=self._session_closed)
        self.servers: list[tuple[ListenerSpec, asyncio.AbstractServer]] = []
        self.bound: list[dict[str, Any]] = []
        # The checks in their order (tests pass their own list; the order is policy).
        self.pipeline = Pipeline(checks if checks is not None else default_checks())
        self.dns: DnsCache | None = None
        self.tls: TlsManager | None = None
        self.gssapi = None
        self.writer: Writer | None = None
        self.readers: Readers | None = None
        self.delivery: Delivery | None = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._bg: list[asyncio.Task] = []
        self._lock_fd: int | None = None
        self.started_at = time.time()
        # Counted here only what Stats does not count (accepted mail is a Stats outcome).
        self.counters = {"connections": 0, "store_errors": 0}
        self.events = EventBus()
        self.stats = Stats()
        self.control: ControlServer | None = None
        self.auth: AuthService | None = None          # made at start, with the store
        self.session_deps = Deps(pipeline=self.pipeline, policy=lambda: self.policy,
                                 new_queue_id=q.new_queue_id, commit=self.commit_messages,
                                 dns=lambda: self.dns, observer=_Observer(self.stats, self.events))

    @property
    def sessions(self) -> dict:
        return self.table.sessions

    @property
    def draining(self) -> bool:
        return self.table.draining

    # ------------------------------------------------------------------ start
    def _lock(self) -> None:
        path = self.home / "engine.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                other = os.read(fd, 32).decode().strip()
            os.close(fd)
            raise EngineLockedError(f"another mailbox-guard engine (pid {other or '?'}) runs "
                                    f"with home {self.home}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def start(self) -> None:
        ensure_home(self.home)
        self._lock()
        self.readers = Readers(self.db_path)
        self.policy = await self.readers.run(load_policy)
        settings = self.policy.settings
        self.writer = Writer(self.db_path, busy_timeout=settings["store.busy_timeout"]).start()
        self.auth = AuthService(policy=lambda: self.policy, readers=self.readers, writer=self.writer,
                                home=self.home)
        self.bans_version = (await self.readers.run(state_versions))[1]
        await self.auth.load_bans()
        await self.auth.load_known()
        await asyncio.to_thread(dummy_hash)     # before any login: failures all take as long
        n = await self.writer.run(q.recover_leases, time.time(), expired_only=False)
        if n:
            log.warning("gave back %d message lease(s) left by an engine that did not stop", n)
        self.dns = DnsCache(list(settings["dns.nameservers"]) or None, timeout=settings["dns.timeout"])
        from mailbox_guard.auth.kerberos import availability
        self.gssapi = await asyncio.to_thread(availability, self.home, settings["auth.gssapi_principal"])
        log.info("GSSAPI: %s", self.gssapi.reason)
        self.tls = TlsManager(self.home, settings["smtp.hostname"])
        try:
            self.tls.ensure_default()
        except OSError as exc:
            raise StoreError(f"cannot create a TLS certificate in {self.tls.folder}: {exc.strerror}") from None
        if not self.policy.domains:
            log.warning("no guarded domains yet: every recipient will be refused "
                        "(add one with `mailbox-guard domains add example.org`)")
        await self._start_listeners()
        self.control = ControlServer(self, self.home / SOCKET_NAME)
        try:
            await self.control.start()
        except OSError as exc:
            await self._close_servers()
            raise StoreError(f"cannot open the control socket {self.control.path}: {exc.strerror or exc}") from None
        if self.metrics_at is not None:
            from mailbox_guard.control.metrics import MetricsServer
            self.metrics = MetricsServer(*self.metrics_at, stats=self.stats, readers=self.readers,
                                         connections=lambda: len(self.sessions),
                                         connections_total=lambda: self.counters["connections"])
            try:
                await self.metrics.start()
            except OSError as exc:
                await self._close_servers()
                await self.control.close()
                raise StoreError(f"cannot serve metrics on {self.metrics_at[0]}:{self.metrics_at[1]}: "
                                 f"{exc.strerror or exc}") from None
        self.delivery = Delivery(policy=lambda: self.policy, dns=lambda: self.dns, readers=self.readers,
                                 writer=self.writer, stats=self.stats, events=self.events,
                                 listening=lambda: self.bound)
        self._bg = [asyncio.ensure_future(self.delivery.run()),
                    asyncio.ensure_future(self._watch_policy()),
                    asyncio.ensure_future(self._housekeeping())]
        self._write_state()
        # Everything built so far lives as long as the engine: keep the cyclic
        # collector from scanning it again and again, and let it run less often
        # (the per-message objects are short-lived and mostly free of cycles).
        gc.freeze()
        gc.set_threshold(20000, 20, 20)

    def _listener_specs(self) -> list[ListenerSpec]:
        if self.listener_override:
            return list(self.listener_override)
        rows = PolicyStore(self.db_path).listeners()
        if rows:
            return [ListenerSpec(r["name"], r["kind"], r["host"], r["port"], r["require_auth"],
                                 r["plaintext_auth"]) for r in rows]
        return [ListenerSpec(*row) for row in DEFAULT_LISTENERS]

    async def _start_listeners(self) -> None:
        loop = asyncio.get_running_loop()
        handler = Handler()
        assert_hooks(handler)
        for spec in self._listener_specs():
            listener = Listener(
                name=spec.name, kind=spec.kind,
                # Submission and SMTPS always want AUTH; an inbound listener only when
                # the admin says so (then it offers AUTH too).
                require_auth=spec.kind != "inbound" or bool(spec.require_auth),
                plaintext_auth=bool(spec.plaintext_auth), policy=lambda: self.policy,
                deps=self.session_deps, table=self.table, auth=self.auth,
                tls_context=lambda n=spec.name: self.tls.context(n), gssapi=lambda: self.gssapi,
                home=self.home)
            try:
                # Every connection gets its TLS context when it arrives (a new
                # certificate is used at once); SMTPS accepts by itself, so that a
                # connection in its handshake counts against the limits.
                self.tls.context(spec.name)     # fail early on a bad certificate
                if spec.kind == "smtps":
                    server = await ImplicitTlsServer.start(listener, handler, spec.host, spec.port)
                else:
                    server = await loop.create_server(
                        lambda lst=listener: make_protocol(lst, handler), spec.host, spec.port,
                        reuse_address=True, backlog=1024)
            except TlsError as exc:
                await self._close_servers()
                raise StoreError(str(exc)) from None
            except OSError as exc:
                await self._close_servers()
                raise StoreError(f"cannot listen on {spec.host}:{spec.port} ({spec.name}): "
                                 f"{exc.strerror or exc}") from None
            self.servers.append((spec, server))
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.bound.append({"name": spec.name, "kind": spec.kind, "host": host, "port": port})
                log.info("listening %s (%s) on %s:%d", spec.name, spec.kind, host, port)

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "started_at": self.started_at, "listeners": self.bound}
        tmp = self.home / "engine.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.home / "engine.json")

    # ------------------------------------------------------------------ running
    async def reload_policy(self) -> bool:
        """Swap in a new snapshot when the store's policy version moved (a cheap
        read each second; the policy itself only when it changed); reload the bans
        when only they changed."""
        assert self.readers is not None
        version, bans = await self.readers.run(state_versions)
        if bans != self.bans_version:
            self.bans_version = bans
            await self.auth.load_bans()
        if version == self.policy.version:
            return False
        policy = await self.readers.run(load_policy)
        old = self.policy
        self.policy = policy      # one atomic swap; a transaction keeps the one it started with
        if policy.settings["store.busy_timeout"] != old.settings["store.busy_timeout"] and self.writer:
            self.writer.set_busy_timeout(policy.settings["store.busy_timeout"])
        if policy.settings["auth.gssapi_principal"] != old.settings["auth.gssapi_principal"]:
            from mailbox_guard.auth.kerberos import availability
            self.gssapi = await asyncio.to_thread(availability, self.home, policy.settings["auth.gssapi_principal"])
            log.info("GSSAPI: %s", self.gssapi.reason)
        if (policy.settings["dns.nameservers"] != old.settings["dns.nameservers"]
                or policy.settings["dns.timeout"] != old.settings["dns.timeout"]):
            self.dns = DnsCache(list(policy.settings["dns.nameservers"]) or None,
                                timeout=policy.settings["dns.timeout"])
        log.info("policy version %d loaded", policy.version)
        return True

    async def _watch_policy(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
            try:
                await self.reload_policy()
            except Exception as exc:     # a locked or broken store: keep the snapshot we have
                log.error("policy reload failed: %s", exc)
            self.tls.refresh()

    async def _housekeeping(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 3600)
            before = time.time() - self.policy.settings["queue.keep_done"]
            try:
                n = await self.writer.run(q.purge_done, before)
                if n:
                    log.info("purged %d finished message record(s)", n)
            except Exception as exc:
                log.error("purge failed: %s", exc)

    async def commit_messages(self, msgs: list[QueuedMessage]) -> None:
        """Durable before the 250: the messages of one DATA in one commit."""
        assert self.writer is not None
        started = time.monotonic()
        # Delivery takes what it has room for straight from memory: stored leased,
        # it needs no lease query and no second read of its body.
        handed: list[QueuedMessage] = []
        if self.delivery is not None:
            for m in msgs:
                if m.state == "incoming" and self.delivery.reserve():
                    m.lease_until = time.time() + LEASE_SECONDS
                    handed.append(m)
        try:
            await self.writer.run_many(q.insert_messages, [q.message_rows(m) for m in msgs])
        except BaseException as exc:
            if handed:
                self.delivery.unreserve(len(handed))
            if isinstance(exc, Exception):
                self.counters["store_errors"] += 1
            raise
        for m in handed:
            self.delivery.take(m)
        self.stats.commit_seconds.append(time.monotonic() - started)
        self.stats.count("accepted")
        self.stats.sender(msgs[0].mail_from)
        for msg in msgs:
            self.events.publish("message", id=msg.id, mail_from=msg.mail_from,
                                recipients=[r for r, _ in msg.recipients], size=msg.size,
                                connection=msg.connection_id, message_id=msg.message_id, state=msg.state)
        if self.delivery is not None and len(handed) < sum(m.state == "incoming" for m in msgs):
            self.delivery.kick()

    def _session_opened(self, proto) -> None:
        self.counters["connections"] += 1
        self.events.publish("connection", action="opened", **self._connection_row(proto))

    def _session_closed(self, proto) -> None:
        self.events.publish("connection", action="closed", id=proto.facts.connection_id,
                            messages=proto.messages, rejected=proto.rejected)
        if self.writer is None:
            return
        facts = proto.facts
        tls = facts.tls or {}
        row = {"id": facts.connection_id, "listener": facts.listener, "peer_ip": facts.peer_ip,
               "peer_port": facts.peer_port, "helo": facts.helo, "started_at": facts.started_at,
               "ended_at": time.time(), "messages": proto.messages, "rejected": proto.rejected,
               "tls_version": tls.get("version"), "tls_cipher": tls.get("cipher"),
               "auth_user": facts.auth_user, "auth_mechanism": facts.auth_mechanism}
        trace = q.verdict_rows(facts.connection_id, None, proto.guard.conn_trace)
        task = asyncio.ensure_future(self._record_connection(row, trace))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_connection(self, row: dict, trace: list) -> None:
        try:
            await self.writer.run(q.record_connection, row, trace)
        except Exception as exc:    # the trace of a finished connection is not worth a crash
            log.warning("could not record connection %s: %s", row["id"], exc)

    # ------------------------------------------------------------------ live view
    @staticmethod
    def _connection_row(proto) -> dict:
        facts = proto.facts
        env = proto.envelope
        tls = facts.tls or None
        return {"id": facts.connection_id, "listener": facts.listener, "kind": facts.listener_kind,
                "peer_ip": facts.peer_ip, "peer_port": facts.peer_port, "helo": facts.helo,
                "user": facts.auth_user, "tls": tls, "phase": proto.phase,
                "started_at": facts.started_at, "age": round(time.time() - facts.started_at, 1),
                "messages": proto.messages, "rejected": proto.rejected,
                "mail_from": env.mail_from if env is not None else None,
                "recipients": len(env.rcpt_tos) if env is not None else 0}

    def connections_from(self, ip: str) -> int:
        return self.table.count_from(ip)

    def live_connections(self) -> list[dict]:
        return [self._connection_row(p) for p in list(self.sessions.values())]

    def kill_connection(self, connection_id: str) -> bool:
        proto = self.sessions.get(connection_id)
        if proto is None:
            return False
        proto.close_with(replies.S421_KILLED.format(hostname=proto.hostname))
        log.info("conn=%s killed by the administrator", connection_id)
        return True

    async def status(self) -> dict:
        counts = await self.readers.run(q.counts_by_state)
        from mailbox_guard import __version__
        return {"version": __version__, "pid": os.getpid(), "home": str(self.home),
                "started_at": self.started_at, "uptime": round(time.time() - self.started_at, 1),
                "draining": self.draining, "policy_version": self.policy.version,
                "listeners": self.bound, "connections": len(self.sessions), "queue": counts,
                "counters": dict(self.counters), "totals": dict(self.stats.totals),
                "delivery": {"active": len(self.delivery.active) if self.delivery else 0,
                             "agent_pid": self.delivery.agent.pid if self.delivery else None},
                "store": {"commits": self.writer.commits if self.writer else 0,
                          "failures": self.writer.failures if self.writer else 0,
                          "fsyncs": self.writer.fsyncs if self.writer else 0,
                          "writer_pid": self.writer.pid if self.writer else None},
                "dns": self.dns.stats() if self.dns else {},
                "subscribers": self.events.subscribers,
                "gssapi": {"offered": bool(self.gssapi and self.gssapi.available),
                           "reason": self.gssapi.reason if self.gssapi else "not checked"}}

    # ------------------------------------------------------------------ stop
    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._sighup()))
        try:
            await self._stop.wait()
        finally:
            # A second SIGTERM or SIGINT while draining (systemd and a terminal both
            # may send more than one) must not kill the engine in mid-shutdown: the
            # handlers stay until the shutdown is done.
            loop.remove_signal_handler(signal.SIGHUP)
            try:
                await self.shutdown()
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def _sighup(self) -> None:
        try:
            if not await self.reload_policy():
                log.info("SIGHUP: policy unchanged (version %d)", self.policy.version)
        except Exception as exc:
            log.error("SIGHUP reload failed: %s", exc)

    async def _close_servers(self) -> None:
        for _, server in self.servers:
            server.close()
        for _, server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.servers = []

    async def shutdown(self) -> None:
        log.info("draining: no new connections, %d session(s) in flight", len(self.sessions))
        self.table.draining = True
        for _, server in self.servers:
            server.close()
        # Sessions between transactions are told to come back later; sessions in a
        # transaction get engine.drain_timeout to finish it.
        for proto in list(self.sessions.values()):
            if proto.idle():
                proto.close_with(replies.S421_SHUTTING_DOWN.format(hostname=proto.hostname))
        deadline = time.monotonic() + self.policy.settings["engine.drain_timeout"]
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proto in list(self.sessions.values()):
            proto.close_with(replies.S421_SHUTTING_DOWN.format(hostname=proto.hostname))
        await asyncio.sleep(0)
        self.servers = []
        if self.control is not None:
            await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.delivery is not None:
            await self.delivery.stop(timeout=min(10.0, self.policy.settings["engine.drain_timeout"]))
        for task in self._bg:
            task.cancel()
        for task in self._bg:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self.writer is not None:
            self.writer.close()
        if self.readers is not None:
            self.readers.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                (self.home / "engine.json").unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped cleanly")


def run_engine(home: Path, listeners: list[ListenerSpec] | None = None,
               metrics: tuple[str, int] | None = None) -> int:
    """Run until stopped; returns the process exit code."""
    # aiosmtpd logs every command at INFO (addresses included) and lists its AUTH
    # mechanisms per connection: our own log lines say what an admin needs.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # The store, keys and socket are the gateway's own: group-readable at most.
    os.umask(0o027)

    async def main() -> int:
        engine = Engine(home, listeners=listeners, metrics=metrics)
        try:
            await engine.start()
        except StoreError as exc:
            log.error("%s", exc)
            if engine.writer:
                engine.writer.close()
            return 1
        await engine.run()
        return 0

    try:
        import uvloop   # optional: a faster event loop where installed
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())
