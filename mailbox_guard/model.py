"""The words of the decision model: phases, actions, results, the trace rows, the
facts of a session and of a transaction, and what a check is.

Pure data: nothing here touches a socket, aiosmtpd, SQLite or the store. Checks,
policy and the protocol-free session are written in these words; the SMTP adapter
and the store translate to and from them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class Phase(str, enum.Enum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    QUEUE = "queue"
    DELIVERY = "delivery"


class Action(str, enum.Enum):
    """What a result asks for. Gates answer with ACCEPT/REJECT/TEMPFAIL; ALLOW makes
    one recipient exempt from delayed refusals and from scoring (never from relay
    control, never from a forced action); TAG, QUARANTINE and DISCARD are outcomes of
    a message for a recipient."""
    NONE = "none"              # a fact only (a score, an observation)
    ACCEPT = "accept"          # a gate's positive finding; later checks may still object
    ALLOW = "allow"            # an exception for this recipient (postmaster@, a whitelist)
    TAG = "tag"                # deliver with X-Spam headers (and a subject prefix if set)
    QUARANTINE = "quarantine"  # keep it, do not deliver
    DISCARD = "discard"        # accept and drop, recorded
    TEMPFAIL = "tempfail"      # 4xx
    REJECT = "reject"          # 5xx


# Which outcome wins when several apply to one recipient.
SEVERITY = {Action.NONE: 0, Action.ACCEPT: 0, Action.ALLOW: 0, Action.TAG: 1, Action.DISCARD: 2,
            Action.QUARANTINE: 3, Action.TEMPFAIL: 4, Action.REJECT: 5}
REFUSALS = frozenset({Action.REJECT, Action.TEMPFAIL})


class Mode(str, enum.Enum):
    ENFORCE = "enforce"        # its results act
    WARN = "warn"              # its results are traced as "would ..." and do not act
    OFF = "off"                # it never runs


@dataclass(frozen=True, slots=True)
class HeaderRemoval:
    """Remove header fields named ``name`` (case-insensitive) whose unfolded value
    starts with ``prefix`` (case-insensitive; empty: every such field)."""
    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class Result:
    check: str
    symbol: str
    action: Action = Action.NONE
    score: float = 0.0
    reply: str | None = None          # the SMTP reply for reject/tempfail
    detail: str = ""
    forced: bool = False              # applies even to an exempt recipient (a virus)
    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[HeaderRemoval, ...] = ()


@dataclass(slots=True)
class Verdict:
    """One row of the verdict trace, as stored with the message or the connection."""
    seq: int
    at: float
    phase: str
    subject: str
    check: str
    symbol: str
    score: float
    action: str
    reply: str | None
    detail: str


@dataclass
class QueuedMessage:
    """What the session hands to the queue: one message per group of recipients
    with the same outcome and the same header edits."""
    id: str
    mail_from: str
    recipients: list[tuple[str, str]]        # (address, lower-case domain)
    body: bytes
    received_at: float
    state: str = "incoming"                  # or "quarantine"
    reason: str | None = None                # why it is in quarantine
    message_id: str | None = None
    connection_id: str | None = None
    listener: str | None = None
    client_ip: str | None = None
    helo: str | None = None
    tls: str | None = None                   # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    auth_user: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    # Set by the engine when delivery takes the message straight from memory: it is
    # stored already leased (state active) until then, so a crash gives it back.
    lease_until: float | None = None
    # Every line of ``body`` ends with CRLF and none begins with a dot (found on
    # receipt): delivery sends it as it is, instead of scanning it again for bare CR
    # and LF and for dots to stuff.
    wire_ready: bool = False

    @property
    def size(self) -> int:
        return len(self.body)


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
    auth_mechanism: str | None = None
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


@dataclass(slots=True)
class Context:
    """Everything a check may look at for one phase. ``results`` holds every result
    of the session and transaction so far (for RCPT, this recipient's too): a check
    reads it and never changes it."""
    phase: Phase
    session: SessionFacts
    transaction: TransactionFacts
    policy: Any                      # policy.snapshot.Policy
    dns: Any = None                  # lookups.dns.DnsCache
    subject: str = ""                # the thing under test: a sender, a recipient
    address: Any = None              # mail.addresses.Path for MAIL/RCPT
    results: tuple[Result, ...] = ()
    scope: Any = None                # policy.snapshot.Scope of the recipient (RCPT), else the server's


class Check(Protocol):
    """A check: ``async run(ctx) -> list[Result]``. It returns facts; it never writes
    SMTP replies or the database."""
    name: str
    phases: frozenset[Phase]
    timeout: float | None    # seconds; None for a check that only computes (no I/O,
                             # never awaits), which then runs without a timer
    gate: bool               # its refusal answers the command it judges at once (relay
                             # control, AUTH, sender ownership); otherwise a refusal found
                             # at CONNECT/HELO/MAIL waits for RCPT (delayed reject)
    default_mode: Mode
    fixed_mode: bool         # the admin cannot weaken it (relay control)
    description: str

    async def run(self, ctx: Context) -> list[Result]: ...


CHECK_DEFAULTS = {"gate": False, "default_mode": Mode.ENFORCE, "fixed_mode": False, "description": ""}


def check_attr(check: Any, name: str) -> Any:
    """A check's attribute, with the defaults for the optional ones."""
    return getattr(check, name, CHECK_DEFAULTS[name])
