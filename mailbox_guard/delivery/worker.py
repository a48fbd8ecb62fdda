"""Delivery: lease due messages, relay them onward, record the outcome.

Recipients are grouped by route: a guarded domain's next hop, or the domain's MX
hosts (by preference, A/AAAA fallback, RFC 7505 null MX honoured). The SMTP client
work is done by the delivery agent (:mod:`mailbox_guard.delivery.agent`, a process of
its own), which reuses connections to a next hop for a few seconds. A 4xx or an unreachable host defers the
recipient on the retry schedule; a 5xx or expiry bounces it, with one DSN from the
null sender per attempt that failed recipients (never for a bounce). Whatever arrived,
what leaves has CRLF line endings only and correct dot-stuffing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
import sqlite3
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from mailbox_guard.config import parse_hostport
from mailbox_guard.lookups.dns import DnsError, DnsTempError
from mailbox_guard.mail.dsn import FailedRecipient, build_dsn, human_duration, message_id_of
from mailbox_guard.delivery.agent import Agent, RouteFailure, Target, one_line
from mailbox_guard.delivery.client import Reply, Transaction
from mailbox_guard.queue.ops import (Attempt, Leased, NewMessage, RcptOutcome, finish_attempts, lease_due, load_leased,
                                     message_rows, new_queue_id, next_due, recover_leases)

if TYPE_CHECKING:   # pragma: no cover
    from mailbox_guard.events import EventBus, Stats
    from mailbox_guard.lookups.dns import DnsCache
    from mailbox_guard.store.db import Readers
    from mailbox_guard.store.writer import Writer

log = logging.getLogger("mailbox_guard.delivery")

LEASE_SECONDS = 1800.0
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")
_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def to_wire(body: bytes) -> bytes:
    """Every line end as CRLF (a bare CR or LF never leaves us: the outbound half
    of SMTP smuggling), ending with CRLF. Dot-stuffing happens at send time."""
    crlf = body.count(b"\r\n")
    if body.count(b"\n") == crlf and body.count(b"\r") == crlf:
        out = body            # the usual case: already clean, skip the costly rewrite
    else:
        out = _BARE_LINE_END.sub(b"\r\n", body)
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def retry_delay(schedule: tuple[float, ...], attempts: int) -> float:
    """Delay after the ``attempts``-th failed attempt (1-based); the last repeats."""
    return schedule[min(max(attempts, 1), len(schedule)) - 1]


class Delivery:
    """The delivery loop and its tasks. What it needs from the engine is given to it:
    the current policy snapshot and DNS cache (both swapped on reload, hence
    callables), the store's readers and writer, the live counters and events, and the
    addresses the engine listens on (mail routed back to them would loop)."""

    def __init__(self, *, policy: Callable[[], Any], dns: Callable[[], "DnsCache"], readers: "Readers",
                 writer: "Writer", stats: "Stats", events: "EventBus",
                 listening: Callable[[], list[dict]]) -> None:
        self.policy = policy
        self.dns = dns
        self.readers = readers
        self.writer = writer
        self.stats = stats
        self.events = events
        self.listening = listening
        self.wake = asyncio.Event()
        # The store may hold due messages nobody has leased yet (a message committed
        # while delivery was busy, a bounce, an admin's retry or flush, start-up).
        # Only then does a finished delivery wake the loop to look: a message handed
        # over from memory leaves nothing to look for, and a look costs a store
        # transaction on the writer every 250 waits for.
        self._backlog = True
        self.agent = Agent()        # the SMTP client work, in a process of its own
        self.active: set[asyncio.Task] = set()
        self.stopping = False
        self._reserved = 0          # slots promised to messages being committed

    # ------------------------------------------------------------------ hand-off
    def reserve(self) -> bool:
        """A slot for a message about to be committed, taken straight from memory
        (no lease query, no reading its body back); False when delivery is busy."""
        if self.stopping:
            return False
        if len(self.active) + self._reserved >= self.policy().settings["delivery.concurrency"]:
            return False
        self._reserved += 1
        return True

    def kick(self) -> None:
        """The store may have due messages: look now, and again whenever a slot frees
        up, until a look finds fewer than it had room for."""
        self._backlog = True
        self.wake.set()

    def unreserve(self, n: int = 1) -> None:
        self._reserved = max(0, self._reserved - n)

    def take(self, msg) -> None:
        """Deliver a message just committed as leased (model.QueuedMessage with
        lease_until set); its slot was reserved."""
        self.unreserve()
        rcpts = sorted(dict.fromkeys(msg.recipients), key=lambda r: (r[1], r[0]))
        leased = Leased(msg.id, msg.mail_from, msg.received_at, 1, msg.body, rcpts, fresh=True,
                        wire_ready=msg.wire_ready)
        task = asyncio.ensure_future(self._deliver_one(leased))
        self.active.add(task)
        task.add_done_callback(self._task_done)

    # ------------------------------------------------------------------ loop
    async def run(self) -> None:
        """The delivery loop; an unexpected error is logged and the loop goes on (a
        dead loop would leave the gateway answering 250 and delivering nothing)."""
        try:
            self.agent.start()        # booted before the first message needs it
        except RouteFailure as exc:   # the first delivery tries again
            log.error("%s", exc.reply)
        while not self.stopping:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivery loop failed; restarting it in 1s")
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        last_sweep = 0.0
        while not self.stopping:
            self.wake.clear()       # a kick from now on is seen by the wait below
            settings = self.policy().settings
            free = settings["delivery.concurrency"] - len(self.active) - self._reserved
            now = time.time()
            if now - last_sweep > 30:
                last_sweep = now
                try:
                    n = await self.writer.run(recover_leases, now, expired_only=True)
                except sqlite3.Error as exc:     # the next sweep tries again
                    log.error("lease sweep failed: %s", exc)
                else:
                    if n:
                        log.warning("gave back %d expired lease(s)", n)
            ids: list[str] = []
            if free > 0:
                self._backlog = False     # set again by a kick while we look
                try:
                    ids = await self.writer.run(lease_due, now, min(free, 64), LEASE_SECONDS)
                except Exception as exc:     # store trouble: try again shortly
                    log.error("leasing failed: %s", exc)
                    self._backlog = True
                    await asyncio.sleep(1.0)
                    continue
            if ids:
                # One trip to a reader thread for the whole batch, not one per message.
                loaded = await self._persist(ids[0], f"load {len(ids)} leased message(s)",
                                             lambda: self.readers.run(
                                                 lambda c: [load_leased(c, i) for i in ids]))
            else:
                loaded = []
            for msg in loaded:
                if msg is None:
                    continue
                task = asyncio.ensure_future(self._deliver_one(msg))
                self.active.add(task)
                task.add_done_callback(self._task_done)
            if ids and len(ids) == min(free, 64):
                self._backlog = True
                continue           # more may be due right now
            timeout = 1.0
            if not ids and free > 0:
                try:
                    due = await self.readers.run(next_due)
                except sqlite3.Error as exc:     # wake up in a second and look again
                    log.error("cannot read the next due time: %s", exc)
                    due = None
                if due is not None:
                    timeout = min(1.0, max(0.0, due - time.time()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    def _task_done(self, task: asyncio.Task) -> None:
        self.active.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed: %r", task.exception())
        if self._backlog:
            self.wake.set()

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        self.kick()
        if self.active:
            # Deliveries in flight get a moment; whatever is cut off keeps its lease,
            # which the next start gives back (at worst a duplicate, never a loss).
            await asyncio.wait(list(self.active), timeout=timeout)
            for task in list(self.active):
                task.cancel()
        await self.agent.close()

    # ------------------------------------------------------------------ one message
    async def _persist(self, message_id: str, what: str, op):
        """Run a store operation of a leased message until it succeeds.

        If it gave up (store locked, disk full, even reads fail when SQLite cannot
        grow its shared-memory index), the message would stay leased until the lease
        runs out and then be delivered again. So keep trying until the store takes
        it or the engine stops (then the next start gives the lease back: a
        duplicate at worst, never a loss).
        """
        pause = 0.2
        while True:
            try:
                return await op()
            except sqlite3.Error as exc:
                if self.stopping:
                    raise
                log.warning("%s: cannot %s yet (%s); retrying in %.1fs", message_id, what, exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)

    async def _deliver_one(self, msg: Leased) -> None:
        started = time.monotonic()
        try:
            await self._deliver_leased(msg)
        finally:
            self.stats.delivery_attempts += 1
            self.stats.delivery_seconds.append(time.monotonic() - started)

    async def _deliver_leased(self, msg: Leased) -> None:
        policy = self.policy()
        groups: dict[str, list[str]] = {}
        hops: dict[str, str | None] = {}
        for rcpt, domain in msg.recipients:
            dom = policy.guarded(domain)
            hop = dom.next_hop if dom is not None else None
            key = f"hop:{hop}" if hop else f"mx:{domain}"
            groups.setdefault(key, []).append(rcpt)
            hops[key] = hop
        wire = msg.body if msg.wire_ready else to_wire(msg.body)
        if len(groups) == 1:             # the usual case: no task per route
            (key, rcpts), = groups.items()
            outcomes = await self._deliver_group(msg, wire, key, hops[key], rcpts)
        else:
            outcomes = []
            for r in await asyncio.gather(*(self._deliver_group(msg, wire, key, hops[key], rcpts)
                                            for key, rcpts in groups.items())):
                outcomes.extend(r)
        await self._finish(msg, outcomes)

    async def _finish(self, msg: Leased, outcomes: list[RcptOutcome]) -> None:
        settings = self.policy().settings
        now = time.time()
        lifetime = settings["queue.max_lifetime"]
        pending = [o for o in outcomes if o.outcome == "deferred"]
        expired = pending and now - msg.received_at >= lifetime
        if expired:
            for o in pending:
                o.outcome = "bounced"
                o.reply = (f"4.4.7 message expired after {human_duration(lifetime)} in the queue; "
                           f"last reply: {o.reply}")
        delay = retry_delay(settings["queue.retry_schedule"], msg.attempts)
        next_attempt = min(now + delay, msg.received_at + lifetime) if pending else None
        failed = [o for o in outcomes if o.outcome == "bounced"]
        dsn = self._dsn(msg, failed, now) if failed and msg.mail_from else None
        last_error = pending[0].reply if pending and not expired else (failed[0].reply if failed else None)
        attempt = Attempt(msg.id, [(o.recipient, o.outcome, o.reply, o.remote) for o in outcomes], now,
                          next_attempt, last_error, message_rows(dsn) if dsn is not None else None, msg.fresh)
        await self._persist(msg.id, "record the delivery attempt",
                            lambda: self.writer.run_many(finish_attempts, attempt, lazy=True))
        stats, events = self.stats, self.events
        for o in outcomes:
            stats.count(o.outcome)
            events.publish("delivery", id=msg.id, recipient=o.recipient, outcome=o.outcome,
                           remote=o.remote, reply=o.reply[:300])
            log.info("%s to=<%s> %s remote=%s reply=%s", msg.id, one_line(o.recipient), o.outcome,
                     o.remote or "-", one_line(o.reply[:200]))
        if dsn is not None:
            self.kick()
        elif failed:
            log.info("%s: no bounce for a bounce (null sender)", msg.id)

    def _dsn(self, msg: Leased, failed: list[RcptOutcome], now: float) -> NewMessage | None:
        hostname = self.policy().settings["smtp.hostname"]
        recipients = []
        for o in failed:
            if o.reply.startswith("4.4.7"):
                status = "4.4.7"          # expired (RFC 3463), reported as failed
            else:
                m = _STATUS.search(o.reply)
                status = "5" + m.group(0)[1:] if m else "5.0.0"
            recipients.append(FailedRecipient(
                recipient=o.recipient, status=status,
                diagnostic=o.reply, remote_mta=o.remote,
                last_attempt=datetime.fromtimestamp(now, timezone.utc)))
        try:
            data = build_dsn(reporting_mta=hostname, original_sender=msg.mail_from, queue_id=msg.id,
                             arrival_date=datetime.fromtimestamp(msg.received_at, timezone.utc),
                             recipients=recipients, original_message=msg.body,
                             now=datetime.fromtimestamp(now, timezone.utc))
        except ValueError as exc:
            log.warning("%s: cannot build a bounce to <%s>: %s", msg.id, msg.mail_from, exc)
            return None
        domain = msg.mail_from.rpartition("@")[2].lower()
        return NewMessage(id=new_queue_id(now), mail_from="", recipients=[(msg.mail_from, domain)],
                          body=data, received_at=now, message_id=message_id_of(data), listener="bounce")

    # ------------------------------------------------------------------ one route
    async def _targets(self, key: str, hop: str | None) -> list[Target]:
        dns = self.dns()
        port = self.policy().settings["delivery.port"]
        if hop:
            host, hop_port, literal = _hop(hop)
            if literal:
                return [Target(host, hop_port, host)]
            try:
                addrs = await dns.resolve_addresses(host)
            except DnsTempError as exc:
                raise RouteFailure(False, f"4.4.3 next hop {host}: DNS lookup failed ({exc})", "4.4.3")
            if not addrs:
                raise RouteFailure(False, f"4.4.4 next hop {host} has no address", "4.4.4")
            return [Target(a, hop_port, host) for a in addrs]
        domain = key[3:]
        try:
            mx = await dns.resolve_mx(domain)
        except DnsTempError as exc:
            raise RouteFailure(False, f"4.4.3 {domain}: MX lookup failed ({exc})", "4.4.3")
        if mx.status == "null_mx":
            raise RouteFailure(True, f"556 5.1.10 {domain} does not accept mail (null MX)", "5.1.10")
        if mx.status in ("nxdomain", "no_host"):
            raise RouteFailure(True, f"550 5.1.2 {domain}: host or domain name not found", "5.1.2")
        targets: list[Target] = []
        temp_errors = 0
        for _pref, host in mx.hosts:
            try:
                addrs = await dns.resolve_addresses(host)
            except DnsTempError:
                temp_errors += 1
                continue
            targets.extend(Target(a, port, host) for a in addrs)
        if not targets:
            if temp_errors:
                raise RouteFailure(False, f"4.4.3 {domain}: MX host lookup failed", "4.4.3")
            raise RouteFailure(True, f"550 5.4.4 {domain}: MX hosts have no address", "5.4.4")
        return targets

    async def _deliver_group(self, msg: Leased, wire: bytes, key: str, hop: str | None,
                             rcpts: list[str]) -> list[RcptOutcome]:
        """Never raises: every recipient leaves with an outcome, so the attempt is
        always recorded (a task that died here would keep its lease and deliver the
        other recipients again and again)."""
        try:
            return await self._route_group(msg, wire, key, hop, rcpts)
        except DnsError as exc:      # not a temporary error: the name cannot exist
            return [RcptOutcome(r, "bounced", f"550 5.1.2 {key[3:]}: bad destination name ({exc})", None)
                    for r in rcpts]
        except Exception as exc:
            log.exception("%s: delivery to %s failed unexpectedly", msg.id, key)
            return [RcptOutcome(r, "deferred", f"4.3.0 internal error ({type(exc).__name__})", None)
                    for r in rcpts]

    async def _route_group(self, msg: Leased, wire: bytes, key: str, hop: str | None,
                           rcpts: list[str]) -> list[RcptOutcome]:
        try:
            targets = await self._targets(key, hop)
        except RouteFailure as fail:
            outcome = "bounced" if fail.permanent else "deferred"
            return [RcptOutcome(r, outcome, fail.reply, fail.remote) for r in rcpts]
        last = "4.4.1 no next hop could be reached"
        remote = None
        for target in targets:
            if self._is_myself(target):
                return [RcptOutcome(r, "bounced", f"554 5.4.6 mail for {key[3:]} loops back to myself "
                                    f"({target.name}[{target.ip}]:{target.port})", target.name) for r in rcpts]
            try:
                return await self._send(target, msg, wire, rcpts)
            except RouteFailure as fail:
                last, remote = fail.reply, fail.remote
                if fail.permanent:
                    return [RcptOutcome(r, "bounced", fail.reply, fail.remote) for r in rcpts]
        return [RcptOutcome(r, "deferred", last, remote) for r in rcpts]

    def _is_myself(self, target: Target) -> bool:
        """An MX or next hop that is one of our own listeners would loop forever."""
        for lst in self.listening():
            if lst["port"] != target.port:
                continue
            if lst["host"] == target.ip:
                return True
            if lst["host"] in ("0.0.0.0", "::"):
                try:
                    addr = ipaddress.ip_address(target.ip)
                except ValueError:
                    continue
                if addr.is_loopback:
                    return True
        return False

    async def _send(self, target: Target, msg: Leased, wire: bytes, rcpts: list[str]) -> list[RcptOutcome]:
        settings = self.policy().settings
        tx = await self.agent.send(target, helo=settings["smtp.hostname"],
                                   connect_timeout=settings["delivery.connect_timeout"],
                                   command_timeout=settings["delivery.command_timeout"],
                                   per_destination=settings["delivery.destination_concurrency"],
                                   mail_from=msg.mail_from, rcpts=rcpts, wire=wire, wire_ready=msg.wire_ready)
        return self._outcomes(target, tx, rcpts)

    def _outcomes(self, target: Target, tx: Transaction, rcpts: list[str]) -> list[RcptOutcome]:
        remote = target.name
        if not tx.mail.ok:
            if tx.mail.code < 500:
                raise RouteFailure(False, _reply(tx.mail), "4.0.0", remote)
            return [RcptOutcome(r, "bounced", _reply(tx.mail), remote) for r in rcpts]
        out = []
        for rcpt, reply in zip(rcpts, tx.rcpts):
            if not reply.ok:
                out.append(RcptOutcome(rcpt, "bounced" if reply.code >= 500 else "deferred",
                                       _reply(reply), remote))
            elif tx.data is None or tx.data.code >= 400:
                data = tx.data or reply
                out.append(RcptOutcome(rcpt, "bounced" if data.code >= 500 else "deferred",
                                       _reply(data), remote))
            else:
                out.append(RcptOutcome(rcpt, "delivered", _reply(tx.data), remote))
        return out


@functools.lru_cache(maxsize=1024)
def _hop(hop: str) -> tuple[str, int, bool]:
    """A next hop's host, port and whether the host is an address (parsed once)."""
    host, port = parse_hostport(hop, default_port=25)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host, port, False
    return host, port, True


def _reply(reply: Reply) -> str:
    return f"{reply.code} {one_line(reply.text)}"
