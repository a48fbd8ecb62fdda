"""A session that needs no socket: the order of the phases, delayed rejects, the
decision per recipient, the verdict trace and the messages to queue.

The SMTP adapter (:mod:`mailbox_guard.smtp`) only translates: for each command it
calls the method of that phase here and sends the reply it gets (None: the
adapter's positive reply). ``mailbox-guard policy test`` runs this same code with
no socket and no store (:mod:`mailbox_guard.session.whatif`).

The rules, in the order they apply:

* **Gates answer the command they judge** (relay control at RCPT, sender ownership
  at MAIL, loops and header ownership at DATA): first match, in check order.
* **Delayed reject** (``smtp.delay_reject``, on by default, as Postfix): a refusal
  found by any other check at CONNECT, HELO or MAIL is answered at each RCPT, unless
  the recipient is exempt (an ALLOW result such as postmaster@); off: at once
  (at CONNECT, instead of the banner).
* **Scores** add up over every phase; at RCPT a score that already reaches the
  recipient's reject threshold refuses that recipient.
* **One policy snapshot per transaction**: MAIL takes the current one; RCPT and
  DATA decide with it, whatever changes meanwhile.
* **After DATA**, each recipient gets its own outcome at its own policy level
  (user > domain > server): delivered, tagged, quarantined, discarded, rejected,
  tempfailed; see :func:`mailbox_guard.policy.decide.combine` for the one reply.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence

from mailbox_guard import replies
from mailbox_guard.mail import message as msgs
from mailbox_guard.model import (REFUSALS, Action, Context, Mode, Phase, QueuedMessage, Result,
                                 SessionFacts, TransactionFacts, Verdict)
from mailbox_guard.policy import decide
from mailbox_guard.session.pipeline import Pipeline
from mailbox_guard.text import printable

log = logging.getLogger("mailbox_guard.smtp")

# The trace of refused transactions kept per connection: enough to answer "why",
# bounded so that a client looping MAIL/RCPT/RSET cannot fill memory and disk.
MAX_CONNECTION_TRACE = 1000


class Observer(Protocol):
    """Where a session reports what an operator watches live (stats, events)."""
    def result(self, check: str, symbol: str, action: str) -> None: ...
    def refused(self, facts: SessionFacts, phase: str, subject: str, deciding: Result | None,
                reply: str | None) -> None: ...


class NullObserver:
    def result(self, check: str, symbol: str, action: str) -> None:
        pass

    def refused(self, facts, phase, subject, deciding, reply) -> None:
        pass


@dataclass
class Deps:
    """The few things a session needs from the engine."""
    pipeline: Pipeline
    policy: Callable[[], Any]                                    # the current snapshot
    new_queue_id: Callable[[float], str]
    commit: Callable[[list[QueuedMessage]], Awaitable[None]] | None = None   # None: dry run
    dns: Callable[[], Any] = lambda: None
    observer: Observer = field(default_factory=NullObserver)


@dataclass
class Recipient:
    address: str
    scope: Any
    results: list[Result]
    trace: list[Verdict]
    exempt: bool


@dataclass
class DataResult:
    reply: str
    messages: list[QueuedMessage]
    outcomes: list[decide.Outcome]


def _shown(r: Result, mode: Mode, delayed: bool) -> tuple[str, str]:
    """A result's action and detail as the trace shows them under ``mode``."""
    action, detail = r.action.value, r.detail
    if r.action is not Action.NONE and r.action is not Action.ACCEPT and mode is Mode.WARN:
        return "warn", f"would {r.action.value}" + (f": {detail}" if detail else "")
    if mode is Mode.WARN and r.score:
        return "warn", f"would score {r.score:g}" + (f": {detail}" if detail else "")
    if delayed and r.action in REFUSALS and mode is Mode.ENFORCE:
        return "delayed", f"{r.action.value}, answered at RCPT" + (f": {detail}" if detail else "")
    return action, detail


class Session:
    def __init__(self, facts: SessionFacts, deps: Deps) -> None:
        self.facts = facts
        self.deps = deps
        self.pipeline = deps.pipeline
        self.tx = TransactionFacts()
        self.tx_policy = None
        self.connect_results: list[Result] = []
        self.helo_results: list[Result] = []            # of the last HELO/EHLO only
        self.tx_results: list[Result] = []
        self.connect_delayed: list[tuple[str, Result]] = []   # (phase, refusal) waiting for RCPT
        self.helo_delayed: list[tuple[str, Result]] = []
        self.tx_delayed: list[tuple[str, Result]] = []   # of MAIL
        self.recipients: list[Recipient] = []
        self.conn_trace: list[Verdict] = []
        self.tx_trace: list[Verdict] = []
        self.tx_refused: list[Verdict] = []             # rows of refused recipients
        self._seq = 0
        self.trace_truncated = False
        self.messages = 0
        self.rejected = 0
        self.refused_at_connect: str | None = None

    @property
    def session_results(self) -> list[Result]:
        return self.connect_results + self.helo_results

    @property
    def delayed(self) -> list[tuple[str, Result]]:
        return self.connect_delayed + self.helo_delayed

    def _delayable(self, phase: str, results: Sequence[Result], delay: bool) -> list[tuple[str, Result]]:
        """The refusals of non-gate checks that wait for RCPT (whatever their mode at
        the server: a recipient's own level may enforce them)."""
        if not delay:
            return []
        gates = self.pipeline.gates
        return [(phase, r) for r in results if r.action in REFUSALS and r.check not in gates]

    # ----------------------------------------------------------- the trace
    def seq(self) -> int:
        self._seq += 1
        return self._seq

    def _room(self, into: list[Verdict]) -> bool:
        kept = len(self.conn_trace) + (len(self.tx_trace) if into is not self.conn_trace else 0)
        if kept < MAX_CONNECTION_TRACE:
            return True
        if not self.trace_truncated:
            self.trace_truncated = True
            self.conn_trace.append(Verdict(self.seq(), time.time(), "trace", "", "trace",
                                           "TRACE_TRUNCATED", 0.0, "none", None,
                                           f"more than {MAX_CONNECTION_TRACE} results"))
        # A transaction's own rows are kept up to a larger bound (they go with its message).
        return into is not self.conn_trace and len(self.tx_trace) < MAX_CONNECTION_TRACE * 3

    def note(self, into: list[Verdict], phase: str, subject: str, check: str, symbol: str,
             action: str = "none", reply: str | None = None, detail: str = "", score: float = 0.0) -> None:
        if self._room(into):
            into.append(Verdict(self.seq(), time.time(), phase, subject, check, symbol, score,
                                action, reply, detail))

    def _trace(self, into: list[Verdict], phase: Phase, subject: str, results: Sequence[Result],
               mode_of, *, delayed: bool = False) -> None:
        now = time.time()
        observer = self.deps.observer
        room = self._room(into)
        for r in results:
            action, detail = _shown(r, mode_of(r.check), delayed)
            if room:
                into.append(Verdict(self.seq(), now, phase.value, subject, r.check, r.symbol, r.score,
                                    action, r.reply, detail))
            observer.result(r.check, r.symbol, action)

    def _refused(self, phase: Phase, subject: str, deciding: Result | None, reply: str,
                 rcpt: str = "") -> None:
        self.rejected += 1
        self.deps.observer.refused(self.facts, phase.value, subject, deciding, reply)
        facts = self.facts
        # Postfix's NOQUEUE line, so that an admin's habits and fail2ban-style tools
        # find every refused command by client address.
        log.info("NOQUEUE: reject: %s from unknown[%s]: %s; from=<%s> to=<%s> proto=%s helo=<%s> conn=%s",
                 phase.value.upper(), facts.peer_ip, printable(reply or "", 300),
                 printable(self.tx.mail_from or ""), printable(rcpt),
                 "ESMTP" if facts.esmtp else "SMTP", printable(facts.helo or "", 128), facts.connection_id)

    # ----------------------------------------------------------- helpers
    def _server_modes(self, policy):
        scope = policy.scope()
        return scope, self.pipeline.mode_of(scope)

    def _runs(self, policy):
        defaults = self.pipeline.defaults
        fixed = self.pipeline.fixed
        if not policy.modes:
            return None                      # nothing switched off anywhere: every check runs
        return lambda name: name in fixed or policy.runs(name, defaults.get(name, Mode.ENFORCE))

    def _ctx(self, phase: Phase, policy, subject: str = "", address=None, results=(), scope=None) -> Context:
        return Context(phase=phase, session=self.facts, transaction=self.tx, policy=policy,
                       dns=self.deps.dns(), subject=subject, address=address, results=tuple(results),
                       scope=scope)

    def _stop(self, mode_of):
        """First match: after an enforced gate refusal no further check runs."""
        gates = self.pipeline.gates
        return lambda r: r.action in REFUSALS and r.check in gates and mode_of(r.check) is Mode.ENFORCE

    def _gate_refusal(self, results: Sequence[Result], mode_of) -> Result | None:
        gates = self.pipeline.gates
        return decide.refusal((r for r in results if r.check in gates), mode_of)

    async def _before_rcpt(self, phase: Phase, policy, subject: str, earlier: Sequence[Result],
                           into: list[Verdict], address=None):
        """A phase before RCPT (CONNECT, HELO, MAIL): its results, the refusals that wait
        for RCPT, and the refusal to answer now (a gate's, or any with delay_reject off)."""
        scope, mode_of = self._server_modes(policy)
        results = await self.pipeline.run(self._ctx(phase, policy, subject, address, earlier, scope),
                                          runs=self._runs(policy), stop=self._stop(mode_of))
        delay = policy.settings["smtp.delay_reject"]
        gates = self.pipeline.gates
        now = self._gate_refusal(results, mode_of)
        other = None if now is not None else decide.refusal(
            (r for r in results if r.check not in gates), mode_of)
        if other is not None and not delay:
            now, other = other, None
        if phase is Phase.MAIL and not results:
            # The sender of the transaction, for "rejects" and "messages why" even
            # when no check had anything to say about it.
            self.note(into, "mail", subject, "smtp", "MAIL_FROM")
        self._trace(into, phase, subject, results, mode_of, delayed=other is not None)
        return results, self._delayable(phase.value, results, delay), now

    def _level_rows(self, rcpt: "Recipient", results: Sequence[Result], server_mode, rcpt_mode,
                    now: float) -> None:
        """Rows for the results traced with the server's mode (CONNECT to MAIL, DATA)
        whose check has another mode at this recipient's own level: what they did
        for this recipient (a domain in warn: "would reject")."""
        label = rcpt.scope.label
        for r in results:
            if r.action is Action.NONE and not r.score:
                continue
            mode = rcpt_mode(r.check)
            if mode is server_mode(r.check):
                continue
            if mode is Mode.OFF:
                action, detail = "off", "not applied"
            else:
                action, detail = _shown(r, mode, False)
            rcpt.trace.append(Verdict(self.seq(), now, "queue", rcpt.address, r.check, r.symbol, r.score,
                                      action, r.reply, f"mode {mode.value} at {label}: {detail}"))

    # ----------------------------------------------------------- phases
    async def connect(self) -> str | None:
        """CONNECT checks; a reply to send instead of the banner (then close), or None."""
        policy = self.deps.policy()
        self.connect_results, self.connect_delayed, now = await self._before_rcpt(
            Phase.CONNECT, policy, self.facts.peer_ip, (), self.conn_trace)
        if now is not None:
            reply = decide.reply_for(now)
            self.refused_at_connect = reply
            self._refused(Phase.CONNECT, self.facts.peer_ip, now, reply)
            return reply
        return None

    async def helo(self, name: str, esmtp: bool) -> str | None:
        self.facts.helo = printable(name)
        self.facts.esmtp = esmtp
        # A repeated HELO replaces what the last one found (its scores are not added twice).
        self.helo_results, self.helo_delayed, now = await self._before_rcpt(
            Phase.HELO, self.deps.policy(), self.facts.helo, self.connect_results, self.conn_trace)
        if now is not None:
            reply = decide.reply_for(now)
            self._refused(Phase.HELO, self.facts.helo, now, reply)
            return reply
        return None

    def tls_established(self, version: str, cipher: str, bits: int, client_cert: Any = None) -> None:
        self.facts.tls = {"version": version, "cipher": cipher, "bits": bits, "client_cert": client_cert}
        self.note(self.conn_trace, "tls", self.facts.listener, "tls", "TLS_ESTABLISHED",
                  detail=f"{version} {cipher} {bits} bits")

    def new_tls_session(self) -> None:
        """STARTTLS: a new SMTP session (RFC 3207 4.2): the EHLO and the transaction
        are forgotten, the CONNECT findings stay."""
        self.end_transaction()
        self.facts.helo = None
        self.facts.esmtp = False
        self.helo_results = []
        self.helo_delayed = []

    def authenticated(self, user: str, addresses: frozenset[str], mechanism: str) -> None:
        self.facts.auth_user = user
        self.facts.auth_mechanism = mechanism
        self.facts.auth_addresses = addresses
        self.note(self.conn_trace, "auth", printable(user, 128), "auth", "AUTH_OK", "accept", None, mechanism)

    def auth_failed(self, shown_login: str, mechanism: str, reply: str) -> None:
        self.note(self.conn_trace, "auth", shown_login, "auth", "AUTH_FAILED", "reject", reply, mechanism)
        self.deps.observer.refused(self.facts, "auth", shown_login,
                                   Result("auth", "AUTH_FAILED", Action.REJECT, reply=reply), reply)

    async def mail(self, path, options: list[str]) -> str | None:
        """MAIL FROM: starts a transaction with the current policy snapshot."""
        self.end_transaction()
        policy = self.tx_policy = self.deps.policy()
        self.tx = TransactionFacts(mail_from=path.address, mail_from_domain=path.domain_lc,
                                   mail_options=list(options))
        subject = path.address or "<>"
        results, delayed, now = await self._before_rcpt(Phase.MAIL, policy, subject, self.session_results,
                                                        self.tx_trace, path)
        if now is not None:
            reply = decide.reply_for(now)
            self._refused(Phase.MAIL, subject, now, reply)
            self.end_transaction()
            return reply
        self.tx_results, self.tx_delayed = results, delayed
        return None

    async def rcpt(self, path, options: list[str]) -> tuple[str | None, str]:
        """RCPT TO: (reply or None for accepted, the address as it will be queued)."""
        policy = self.tx_policy
        if len(self.recipients) >= policy.settings["smtp.max_recipients"]:
            return replies.S452_TOO_MANY_RECIPIENTS, ""
        address = (f"{path.local}@{path.domain_lc}" if not path.quoted_local
                   else path.address.rpartition("@")[0] + "@" + path.domain_lc)
        scope = policy.scope(address)
        pipeline = self.pipeline
        mode_of = pipeline.mode_of(scope)
        earlier = self.session_results + self.tx_results
        results = await pipeline.run(
            self._ctx(Phase.RCPT, policy, path.address, path, earlier, scope),
            runs=(lambda name: mode_of(name) is not Mode.OFF) if policy.modes else None,
            stop=self._stop(mode_of))
        trace: list[Verdict] = []
        self._trace(trace, Phase.RCPT, path.address, results, mode_of)
        deciding = decide.refusal(results, mode_of)          # gates first: relay control leads
        found_at = "rcpt"
        allowed = None
        if deciding is None:
            allowed = decide.exempt(results, mode_of)
            if allowed is None:
                for phase, r in self.delayed + self.tx_delayed:
                    if mode_of(r.check) is Mode.ENFORCE:
                        deciding, found_at = r, phase
                        break
            if deciding is None and allowed is None:
                score = decide.rcpt_score_refusal(earlier + results, scope, mode_of)
                if score is not None:
                    deciding = Result("decide", "SCORE_REJECT", Action.REJECT, reply=replies.S550_SPAM,
                                      detail=f"score {score:g} reaches actions.reject at {scope.label}")
        if deciding is not None:
            reply = decide.reply_for(deciding)
            if found_at != "rcpt" or deciding.check == "decide":
                detail = (f"found at {found_at.upper()}, answered at RCPT: {deciding.detail}"
                          if found_at != "rcpt" else deciding.detail)
                trace.append(Verdict(self.seq(), time.time(), "rcpt", path.address, deciding.check,
                                     deciding.symbol, deciding.score, deciding.action.value, reply, detail))
            # A refused recipient's rows stay with the transaction: stored with its
            # (first) message if one is queued, else with the connection.
            for v in trace:
                if self._room(self.tx_trace):
                    self.tx_refused.append(v)
            self._refused(Phase.RCPT, path.address, deciding, reply, rcpt=path.address)
            return reply, address
        self.recipients.append(Recipient(address, scope, results, trace, allowed is not None))
        self.tx.recipients.append(address)
        return None, address

    async def data(self, body: bytes, *, wire_ready: bool = False) -> DataResult:
        """End of DATA: DATA checks, an outcome per recipient, the messages queued
        (committed before the reply), and the one reply. ``wire_ready``: the
        receiver found every line of ``body`` ending with CRLF and none beginning
        with a dot."""
        policy = self.tx_policy
        tx = self.tx
        raw_headers, complete = msgs.header_section(body)      # found once, used twice
        tx.size = len(body)
        tx.headers = msgs.parse_headers(raw_headers)
        tx.raw_headers, tx.headers_complete = raw_headers, complete
        scope, mode_of = self._server_modes(policy)
        earlier = self.session_results + self.tx_results
        # DATA checks see every earlier result, the recipients' own included.
        seen = earlier + [r for rcpt in self.recipients for r in rcpt.results]
        results = await self.pipeline.run(self._ctx(Phase.DATA, policy, "", None, seen, scope),
                                          runs=self._runs(policy), stop=self._stop(mode_of))
        self._trace(self.tx_trace, Phase.DATA, "", results, mode_of)
        gate = self._gate_refusal(results, mode_of)
        if gate is not None:
            reply = decide.reply_for(gate)
            self._refused(Phase.DATA, "", gate, reply)
            return DataResult(reply, [], [])
        # Gates acted at their own command; what is left concerns the recipients.
        gates = self.pipeline.gates
        common = [r for r in earlier + results if r.check not in gates or r.action not in REFUSALS]
        outcomes = []
        rcpt_modes = [self.pipeline.mode_of(rcpt.scope) for rcpt in self.recipients]
        for rcpt, rcpt_mode in zip(self.recipients, rcpt_modes):
            own = [r for r in rcpt.results if r.check not in gates or r.action not in REFUSALS]
            outcomes.append(decide.outcome(rcpt.address, common + own, rcpt.scope, rcpt_mode,
                                           is_exempt=rcpt.exempt))
        kind, first = decide.combine(outcomes)
        now = time.time()
        for rcpt, rcpt_mode, o in zip(self.recipients, rcpt_modes, outcomes):
            if rcpt.scope.modes != scope.modes:      # its level has modes of its own
                self._level_rows(rcpt, common, mode_of, rcpt_mode, now)
            action = o.action
            if kind == "accept" and action is Action.REJECT:
                action = Action.QUARANTINE
            rcpt.trace.append(Verdict(self.seq(), now, "queue", rcpt.address, "decide",
                                      "OUTCOME_" + ("DELIVER" if action is Action.ACCEPT else action.value.upper()),
                                      o.score, action.value, o.reply,
                                      f"{o.reason}; level {o.scope_label}" +
                                      ("; rejected for this recipient while others accept: quarantined"
                                       if action is not o.action else "")))
        if kind != "accept":
            reply = first.reply or replies.S550_SPAM
            self._refused(Phase.DATA, first.recipient, first.deciding, reply)
            return DataResult(reply, [], outcomes)
        messages = self._build(body, outcomes, now, wire_ready)
        if self.deps.commit is not None and messages:
            try:
                await self.deps.commit(messages)
            except Exception as exc:     # storage failure: 451, never 250, never 5xx
                log.error("conn=%s queueing failed: %s", self.facts.connection_id, exc)
                self.note(self.tx_trace, "queue", "", "queue", "STORAGE_ERROR", "tempfail",
                          replies.S451_STORAGE, type(exc).__name__)
                return DataResult(replies.S451_STORAGE, [], outcomes)
        queue_id = messages[0].id if messages else self.deps.new_queue_id(now)
        self.messages += 1
        for m in messages:
            log.info("conn=%s %s %s from=<%s> rcpts=%d size=%d%s", self.facts.connection_id,
                     "quarantined" if m.state == "quarantine" else "queued", m.id,
                     printable(m.mail_from), len(m.recipients), m.size,
                     f" reason={printable(m.reason, 200)}" if m.reason else "")
        if messages:
            self.recipients = []       # their rows are stored with the messages now
            self.tx_trace = []
            self.tx_refused = []
        return DataResult(replies.S250_QUEUED.format(queue_id=queue_id), messages, outcomes)

    def _build(self, body: bytes, outcomes: list[decide.Outcome], now: float,
               wire_ready: bool = False) -> list[QueuedMessage]:
        """One message per group of recipients with the same state and header edits;
        a discarded recipient is only recorded."""
        policy = self.tx_policy
        hostname = policy.settings["smtp.hostname"]
        groups: dict[tuple, list[tuple[Recipient, decide.Outcome]]] = {}
        dropped: list[Recipient] = []
        for rcpt, o in zip(self.recipients, outcomes):
            if o.action is Action.DISCARD:
                dropped.append(rcpt)
                continue
            state = "incoming" if o.delivered else "quarantine"
            key = (state, o.add_headers, o.remove_headers, o.subject_prefix,
                   o.reason if state == "quarantine" else "")
            groups.setdefault(key, []).append((rcpt, o))
        facts = self.facts
        tls = f"{facts.tls['version']} {facts.tls['cipher']}" if facts.tls else None
        mail_from = self.tx.mail_from or ""
        message_id = msgs.message_id(self.tx.headers)
        out: list[QueuedMessage] = []
        for (state, adds, removes, prefix, reason), members in groups.items():
            queue_id = self.deps.new_queue_id(now)
            addresses = [r.address for r, _ in members]
            received = msgs.received_header(facts, addresses, queue_id, now, hostname)
            data = msgs.edit(body, prepend=received, add=adds, remove=removes, subject_prefix=prefix)
            trace = list(self.tx_trace)
            for rcpt, _ in members:
                trace.extend(rcpt.trace)
            if not out:
                trace.extend(self.tx_refused)
                for rcpt in dropped:
                    trace.extend(rcpt.trace)
            trace.append(Verdict(self.seq(), now, "queue", queue_id, "queue",
                                 "QUARANTINED" if state == "quarantine" else "QUEUED", 0.0,
                                 "quarantine" if state == "quarantine" else "accept", None, reason))
            trace.sort(key=lambda v: v.seq)
            out.append(QueuedMessage(
                id=queue_id, mail_from=mail_from, recipients=[(a, a.rpartition("@")[2]) for a in addresses],
                body=data, received_at=now, state=state, reason=reason or None, message_id=message_id,
                connection_id=facts.connection_id, listener=facts.listener, client_ip=facts.peer_ip,
                helo=facts.helo, tls=tls, auth_user=facts.auth_user, verdicts=trace,
                wire_ready=wire_ready and msgs.wire_ready_head(data)))
        return out          # nothing queued (all discarded): end_transaction keeps the rows

    def end_transaction(self) -> None:
        """RSET, the end of DATA, a new MAIL: what was not queued stays with the
        connection (within its bound)."""
        pending = self.tx_trace + self.tx_refused
        for rcpt in self.recipients:
            pending.extend(rcpt.trace)
        if pending:
            pending.sort(key=lambda v: v.seq)
            room = max(0, MAX_CONNECTION_TRACE - len(self.conn_trace))
            self.conn_trace.extend(pending[:room])
        self.tx_trace = []
        self.tx_refused = []
        self.recipients = []
        self.tx_results = []
        self.tx_delayed = []
        self.tx = TransactionFacts()

    def close(self) -> None:
        self.end_transaction()
