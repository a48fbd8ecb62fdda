"""The delivery agent: the SMTP client work of delivery, in a process of its own.

Relaying a message costs about as much CPU as receiving it (writes, reads and TLS
to the next hop). On the engine's event loop that work took the GIL from the
listeners (a third of it, measured at 2 KB x 10); in its own process it runs on the
other core, as Postfix's smtp(8) runs beside its smtpd(8). The engine keeps what
decides (routing, DNS, loop detection, the outcome per recipient, retries, bounces,
the store); the agent keeps the connections to next hops (reused for a while) and
sends one transaction per request.

The agent starts with the first delivery and exits when its socket closes (the
engine stopped or died). If it dies, the deliveries it had not answered are
deferred (retried on the schedule: a duplicate at worst, never a loss) and the next
delivery starts a new agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from mailbox_guard import childproc
from mailbox_guard.delivery.client import (Connection, Reply, SmtpClientError, Transaction,
                                           opportunistic_tls_context)
from mailbox_guard.text import printable

log = logging.getLogger("mailbox_guard.delivery")

_CODE = "from mailbox_guard.delivery.agent import agent_main; agent_main()"


@dataclass
class Target:
    ip: str
    port: int
    name: str


class RouteFailure(Exception):
    """No target could take the message: defer (temp) or bounce (perm) everyone."""

    def __init__(self, permanent: bool, reply: str, status: str, remote: str | None = None):
        super().__init__(reply)
        self.permanent, self.reply, self.status, self.remote = permanent, reply, status, remote


def one_line(value: object) -> str:
    """One printable line, its runs of whitespace made one space: nothing a remote
    server or an address could use to forge a log line."""
    return printable(" ".join(str(value).split()), 500)


# --------------------------------------------------------------------- in the agent
class _Pool:
    """Idle SMTP client connections per (ip, port), reused for a short while."""

    IDLE = 10.0
    MAX_USES = 100

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[tuple[Connection, float, int]]] = {}

    def take(self, key: tuple[str, int]) -> tuple[Connection, int] | None:
        now = time.monotonic()
        stack = self._idle.get(key) or []
        while stack:
            client, since, uses = stack.pop()
            if now - since < self.IDLE and client.usable:
                return client, uses
            client.close()
        return None

    def give(self, key: tuple[str, int], client: Connection, uses: int) -> None:
        if uses >= self.MAX_USES or not client.usable:
            client.close()
            return
        self._idle.setdefault(key, []).append((client, time.monotonic(), uses))

    def prune(self) -> None:
        now = time.monotonic()
        for key, stack in list(self._idle.items()):
            keep = []
            for client, since, uses in stack:
                if now - since < self.IDLE and client.usable:
                    keep.append((client, since, uses))
                else:
                    client.close()
            self._idle[key] = keep

    def close_all(self) -> None:
        for stack in self._idle.values():
            for client, _, _ in stack:
                client.close()
        self._idle.clear()


class Sender:
    """One SMTP transaction to one target, on a reused connection where one is idle."""

    def __init__(self) -> None:
        self.pool = _Pool()
        self._tls = opportunistic_tls_context()
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}

    async def _client(self, target: Target, helo: str, connect_timeout: float,
                      command_timeout: float) -> tuple[Connection, int]:
        reused = self.pool.take((target.ip, target.port))
        if reused is not None:
            return reused
        try:
            conn = await Connection.open(target.ip, target.port, helo=helo, connect_timeout=connect_timeout,
                                         command_timeout=command_timeout, name=target.name, tls=self._tls)
        except SmtpClientError as exc:      # its text names the address already
            where = f"{target.name}: " if target.name != target.ip else ""
            raise RouteFailure(False, f"4.4.1 {where}{one_line(exc)}", "4.4.1", target.name) from None
        return conn, 0

    async def send(self, target: Target, helo: str, connect_timeout: float, command_timeout: float,
                   mail_from: str, rcpts: list[str], wire: bytes, wire_ready: bool,
                   per_destination: int = 10) -> Transaction:
        """At most ``per_destination`` transactions to one address at a time: a burst
        (the queue after a restart, say) waits for connections to come free and
        reuses them, rather than opening one per message."""
        key = (target.ip, target.port)
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(per_destination)
        async with slots:
            return await self._send(target, helo, connect_timeout, command_timeout,
                                    mail_from, rcpts, wire, wire_ready)

    async def _send(self, target: Target, helo: str, connect_timeout: float, command_timeout: float,
                    mail_from: str, rcpts: list[str], wire: bytes, wire_ready: bool) -> Transaction:
        for tries in (0, 1):
            conn, uses = await self._client(target, helo, connect_timeout, command_timeout)
            try:
                tx = await conn.send(mail_from, rcpts, wire, wire_ready=wire_ready)
            except SmtpClientError as exc:
                conn.close()
                if uses and tries == 0:
                    continue     # a reused connection the next hop had dropped: once more
                raise RouteFailure(False, f"4.4.2 {target.name}[{target.ip}]:{target.port}: {one_line(exc)}",
                                   "4.4.2", target.name) from None
            key = (target.ip, target.port)
            if tx.data is not None and tx.data.code == 250:
                self.pool.give(key, conn, uses + 1)
            else:
                # A refused transaction leaves state behind on the next hop: reset it
                # before the connection is used again (in the background).
                asyncio.ensure_future(self._reset_and_return(key, conn, uses + 1))
            return tx
        raise RouteFailure(False, "4.4.2 connection lost", "4.4.2", target.name)

    async def _reset_and_return(self, key: tuple[str, int], conn: Connection, uses: int) -> None:
        if await conn.rset():
            self.pool.give(key, conn, uses)
        else:
            conn.close()


def _tx_tuple(tx: Transaction) -> tuple:
    return ((tx.mail.code, tx.mail.text), [(r.code, r.text) for r in tx.rcpts],
            (tx.data.code, tx.data.text) if tx.data is not None else None)


async def _serve(sock: socket.socket) -> None:
    sender = Sender()
    done = asyncio.Event()
    tasks: set[asyncio.Task] = set()
    channel: childproc.Channel

    async def handle(request) -> None:
        (req_id, (ip, port, name), (helo, connect_timeout, command_timeout, per_destination),
         mail_from, rcpts, wire, ready) = request
        try:
            tx = await sender.send(Target(ip, port, name), helo, connect_timeout, command_timeout,
                                   mail_from, rcpts, wire, ready, per_destination)
            answer: tuple = ("tx", _tx_tuple(tx))
        except RouteFailure as fail:
            answer = ("fail", fail.permanent, fail.reply, fail.status, fail.remote)
        except Exception as exc:     # a bug here: that delivery is deferred, the agent lives on
            log.exception("delivery agent: sending failed unexpectedly")
            answer = ("error", f"{type(exc).__name__}")
        if channel.open:
            channel.send((req_id, answer))

    def on_frame(request) -> None:
        if request is None:
            done.set()
            return
        task = asyncio.ensure_future(handle(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    channel = childproc.Channel(sock, on_frame, lambda exc: done.set())
    try:
        while not done.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), 5.0)
            sender.pool.prune()
    finally:
        # The engine is gone or stopping: what is in flight is not wanted any more
        # (its messages keep their leases; the next start gives them back).
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(list(tasks), timeout=5)
        sender.pool.close_all()
        if channel.open:
            channel.lost(None)


def agent_main() -> None:
    """The agent process: ``python -c ... FD`` (Agent)."""
    childproc.ignore_stop_signals()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        import uvloop   # optional, as for the engine
    except ImportError:
        asyncio.run(_serve(sock))
    else:
        uvloop.run(_serve(sock))


# --------------------------------------------------------------------- in the engine
class Agent:
    """The engine's handle on the delivery agent process."""

    def __init__(self) -> None:
        self._proc = None
        self._channel: childproc.Channel | None = None
        self._pending = childproc.Pending()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _open(self) -> childproc.Channel:
        if self._channel is not None and self._channel.open:
            return self._channel
        if self._proc is not None:        # an agent that died: reap it, start anew
            childproc.reap(self._proc, 1.0)
            log.error("delivery agent ended unexpectedly (exit %s); starting a new one", self._proc.returncode)
        try:
            self._proc, sock = childproc.spawn(_CODE)
        except OSError as exc:
            self._proc = None
            raise RouteFailure(False, f"4.3.0 cannot start the delivery agent ({exc})", "4.3.0") from None
        self._channel = childproc.Channel(sock, self._answer, self._lost)
        return self._channel

    def start(self) -> None:
        """Start the agent now (else the first delivery starts it)."""
        if not self._closed:
            self._open()

    async def send(self, target: Target, *, helo: str, connect_timeout: float, command_timeout: float,
                   per_destination: int, mail_from: str, rcpts: list[str], wire: bytes,
                   wire_ready: bool) -> Transaction:
        """One transaction by the agent; RouteFailure as the agent's own would raise."""
        if self._closed:
            raise RouteFailure(False, "4.3.0 delivery is stopping", "4.3.0", target.name)
        channel = self._open()
        req_id, future = self._pending.add()
        channel.send((req_id, (target.ip, target.port, target.name),
                      (helo, connect_timeout, command_timeout, per_destination), mail_from, rcpts, wire, wire_ready))
        # Every read and write of the agent has its deadline; this one only catches an
        # agent that stopped answering altogether (a timer, not wait_for: no task per
        # message).
        deadline = connect_timeout * 3 + command_timeout * (len(rcpts) + 6) + 30
        timer = asyncio.get_running_loop().call_later(deadline, self._pending.settle, req_id, ("timeout",))
        try:
            answer = await future
        finally:
            timer.cancel()
            self._pending.drop(req_id)
        kind = answer[0]
        if kind == "timeout":
            raise RouteFailure(False, "4.4.2 no answer from the delivery agent", "4.4.2", target.name)
        if kind == "tx":
            mail, rcpt_replies, data = answer[1]
            return Transaction(Reply(*mail), [Reply(*r) for r in rcpt_replies],
                               Reply(*data) if data is not None else None)
        if kind == "fail":
            raise RouteFailure(*answer[1:])
        raise RouteFailure(False, f"4.3.0 internal error in delivery ({answer[1]})", "4.3.0", target.name)

    def _answer(self, frame) -> None:
        self._pending.settle(*frame)

    def _lost(self, exc: BaseException | None) -> None:
        if not self._closed:
            log.error("delivery agent connection lost%s", f": {exc}" if exc else "")
        self._pending.fail_all(value=("fail", False, "4.4.2 the delivery agent stopped before it answered",
                                      "4.4.2", None))

    async def close(self) -> None:
        """Stop the agent (what it had in flight is abandoned; see the module's text)."""
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:
            sock = channel.detach()
            if sock is not None:
                sock.close()
            self._lost(None)
        proc, self._proc = self._proc, None
        if proc is not None:
            await asyncio.to_thread(childproc.reap, proc, 10.0)
