"""What-if: one SMTP session through the same protocol-free code the engine runs,
with no socket and no store. ``mailbox-guard policy test`` reads the policy (and the
authenticated user's addresses) from the store and hands them here; nothing is sent
and nothing is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from mailbox_guard import replies
from mailbox_guard.checks import default_checks
from mailbox_guard.mail.addresses import PathError, parse_path
from mailbox_guard.model import SessionFacts, Verdict
from mailbox_guard.session.pipeline import Pipeline
from mailbox_guard.session.session import Deps, Session

_IDS = iter(range(1, 10**9))


def _test_queue_id(now: float) -> str:
    return f"TEST{next(_IDS):06d}"


@dataclass
class WhatIf:
    ip: str
    helo: str
    mail_from: str
    recipients: Sequence[str]
    listener: str = "inbound"
    listener_kind: str = "inbound"
    auth_user: str | None = None
    auth_addresses: frozenset[str] = frozenset()
    tls: bool = False
    message: bytes | None = None
    esmtp: bool = True


@dataclass
class Report:
    steps: list[dict] = field(default_factory=list)        # each command and its reply
    trace: list[Verdict] = field(default_factory=list)     # every result, in order
    outcomes: list[dict] = field(default_factory=list)     # per recipient after DATA
    final: str | None = None


def default_message(w: WhatIf) -> bytes:
    return (f"From: <{w.mail_from}>\r\nTo: {', '.join(f'<{r}>' for r in w.recipients)}\r\n"
            f"Subject: mailbox-guard policy test\r\nMessage-ID: <policy-test@mailbox-guard>\r\n"
            f"\r\nA message of the policy test.\r\n").encode("utf-8", "replace")


async def run(w: WhatIf, policy: Any, checks: Sequence | None = None) -> Report:
    """Run ``w`` through a Session on ``policy``; the report lists each command's
    reply, every result in trace order and each recipient's outcome."""
    facts = SessionFacts(connection_id="TEST", listener=w.listener, listener_kind=w.listener_kind,
                         peer_ip=w.ip, peer_port=0, trusted_network=policy.is_trusted(w.ip))
    session = Session(facts, Deps(pipeline=Pipeline(list(checks) if checks is not None else default_checks()),
                                  policy=lambda: policy, new_queue_id=_test_queue_id, commit=None))
    report = Report()

    def step(command: str, reply: str | None, ok: str) -> bool:
        report.steps.append({"command": command, "reply": reply or ok})
        return reply is None

    done = False
    reply = await session.connect()
    if not step(f"(connect from {w.ip})", reply, "220 (banner)"):
        done = True
    if not done and w.tls:
        session.tls_established("TLSv1.3", "(what-if)", 256)
    if not done:
        reply = await session.helo(w.helo, w.esmtp)
        done = not step(f"{'EHLO' if w.esmtp else 'HELO'} {w.helo}", reply, "250 (hello)")
    if not done and w.auth_user:
        session.authenticated(w.auth_user, w.auth_addresses, "(what-if)")
        step(f"AUTH ({w.auth_user})", None, replies.S235_AUTH_OK)
    accepted = 0
    if not done:
        try:
            sender = parse_path(f"<{w.mail_from}>")
        except PathError:
            step(f"MAIL FROM:<{w.mail_from}>", replies.S501_BAD_ADDRESS, "")
            done = True
        else:
            reply = await session.mail(sender, [])
            done = not step(f"MAIL FROM:<{w.mail_from}>", reply, replies.S250_SENDER_OK)
    if not done:
        for rcpt in w.recipients:
            try:
                path = parse_path(f"<{rcpt}>")
            except PathError:
                step(f"RCPT TO:<{rcpt}>", replies.S501_BAD_ADDRESS, "")
                continue
            reply, _ = await session.rcpt(path, [])
            if step(f"RCPT TO:<{rcpt}>", reply, replies.S250_RECIPIENT_OK):
                accepted += 1
    if not done and accepted:
        result = await session.data(w.message if w.message is not None else default_message(w))
        step("DATA", result.reply, "")
        report.final = result.reply
        for o in result.outcomes:
            report.outcomes.append({"recipient": o.recipient, "outcome": o.action.value, "score": o.score,
                                    "level": o.scope_label, "reason": o.reason,
                                    "headers_added": [f"{n}: {v}" for n, v in o.add_headers]})
        for m in result.messages:
            report.trace.extend(m.verdicts)
    elif not done:
        step("DATA", replies.S554_NO_RECIPIENTS, "")
    session.close()
    report.trace.extend(session.conn_trace)
    # Messages of several groups each carry the transaction's rows: once each here.
    report.trace = sorted({v.seq: v for v in report.trace}.values(), key=lambda v: v.seq)
    return report
