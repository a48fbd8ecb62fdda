"""The phase pipeline: checks emit named results, a policy step turns them into one
decision per phase.

A check is an object with ``name``, ``phases``, ``timeout`` and ``async run(ctx) ->
list[Result]``. It returns facts; it never writes SMTP replies or the database. The
pipeline runs the checks that serve a phase, fails safe (a check that times out or
crashes yields a tempfail, never an accept and never a 5xx), and the decision is
first-match like a Postfix restriction list: the first reject or tempfail wins, in
check order. Relay control is the first check of RCPT and nothing skips it. Every
result is kept for the verdict trace.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from . import replies

log = logging.getLogger("mailbox_guard.pipeline")


class Phase(str, enum.Enum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    QUEUE = "queue"
    DELIVERY = "delivery"


class Action(str, enum.Enum):
    NONE = "none"            # a fact only (a score, an observation)
    ACCEPT = "accept"        # a gate's positive finding (evaluation goes on: a later
                             # check may still object; relay control always runs first)
    REJECT = "reject"        # 5xx
    TEMPFAIL = "tempfail"    # 4xx


@dataclass(frozen=True)
class Result:
    check: str
    symbol: str
    action: Action = Action.NONE
    score: float = 0.0
    reply: str | None = None         # the SMTP reply for reject/tempfail/accept
    detail: str = ""


@dataclass
class SessionFacts:
    """What is known about the connection; grows phase by phase."""
    connection_id: str
    listener: str
    listener_kind: str
    peer_ip: str
    peer_port: int
    started_at: float = field(default_factory=time.time)
    helo: str | None = None
    esmtp: bool = False
    tls: dict[str, Any] | None = None
    auth_user: str | None = None
    auth_addresses: frozenset[str] = frozenset()   # lower-case: may send as these
    trusted_network: bool = False


@dataclass
class TransactionFacts:
    """One MAIL ... DATA transaction."""
    mail_from: str | None = None
    mail_from_domain: str = ""
    mail_options: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)      # accepted so far
    size: int | None = None
    headers: Any = None                                      # email.message.Message (headers only)
    raw_headers: bytes = b""                                 # the header section as received
    headers_complete: bool = True                            # ended by an empty line within the cap


@dataclass
class Context:
    """Everything a check may look at for one phase."""
    phase: Phase
    session: SessionFacts
    transaction: TransactionFacts
    policy: Any                      # policy.Policy
    dns: Any = None                  # dns.DnsCache
    subject: str = ""                # the thing under test: a sender, a recipient
    address: Any = None              # addresses.Path for MAIL/RCPT


class Check(Protocol):
    name: str
    phases: frozenset[Phase]
    timeout: float | None    # seconds; None for a check that only computes (no I/O,
                             # never awaits), which then runs without a timer

    async def run(self, ctx: Context) -> list[Result]: ...


@dataclass(frozen=True)
class Decision:
    action: Action                   # ACCEPT (default when nothing objects), REJECT, TEMPFAIL
    reply: str | None
    results: tuple[Result, ...]
    deciding: Result | None = None


class Pipeline:
    def __init__(self, checks: Sequence[Check]) -> None:
        for check in checks:
            for attr in ("name", "phases", "timeout", "run"):
                if not hasattr(check, attr):
                    raise TypeError(f"check {check!r} lacks {attr!r}")
        self.checks = tuple(checks)
        self._by_phase = {p: tuple(c for c in self.checks if p in c.phases) for p in Phase}

    def checks_for(self, phase: Phase) -> tuple[Check, ...]:
        return self._by_phase[phase]

    async def run(self, ctx: Context) -> Decision:
        results: list[Result] = []
        deciding: Result | None = None
        for check in self._by_phase[ctx.phase]:
            try:
                if check.timeout is None:
                    out = await check.run(ctx)      # computes only: nothing to wait for
                else:
                    # asyncio.timeout, not wait_for: no extra task per check and phase.
                    async with asyncio.timeout(check.timeout):
                        out = await check.run(ctx)
            except TimeoutError:
                out = [Result(check.name, "CHECK_TIMEOUT", Action.TEMPFAIL,
                              reply=replies.S451_CHECK_UNAVAILABLE,
                              detail=f"no answer within {check.timeout}s")]
            except Exception as exc:   # fail safe: a crashing check defers, never accepts
                log.exception("check %s crashed", check.name)
                out = [Result(check.name, "CHECK_ERROR", Action.TEMPFAIL,
                              reply=replies.S451_CHECK_UNAVAILABLE,
                              detail=type(exc).__name__)]
            results.extend(out)
            for r in out:
                if r.action in (Action.REJECT, Action.TEMPFAIL):
                    deciding = r
                    break
            if deciding is not None:
                break
        if deciding is None:
            return Decision(Action.ACCEPT, None, tuple(results), None)
        reply = deciding.reply or (replies.S550_REJECTED if deciding.action is Action.REJECT
                                   else replies.S451_CHECK_UNAVAILABLE)
        return Decision(deciding.action, reply, tuple(results), deciding)
