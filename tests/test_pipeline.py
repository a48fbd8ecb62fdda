"""The check runner fails safe: a check that crashes or times out yields a 4xx,
never an accept and never a 5xx; the first enforced gate refusal decides and stops
the phase; relay control runs first in RCPT. No socket needed."""

from __future__ import annotations

import asyncio

import pytest

from mailbox_guard import replies
from mailbox_guard.mail.addresses import parse_path
from mailbox_guard.checks.rcpt_recipients import RecipientList
from mailbox_guard.checks.rcpt_relay import RelayControl
from mailbox_guard.checks import default_checks
from mailbox_guard.model import REFUSALS, Action, Context, Mode, Phase, Result, SessionFacts, TransactionFacts
from mailbox_guard.policy import decide
from mailbox_guard.policy.snapshot import Policy
from mailbox_guard.session.pipeline import Pipeline


class Crashing:
    name, phases, timeout = "crashing", frozenset({Phase.RCPT}), 1.0

    async def run(self, ctx):
        raise ZeroDivisionError("boom")


class Slow:
    name, phases, timeout = "slow", frozenset({Phase.RCPT}), 0.05

    async def run(self, ctx):
        await asyncio.sleep(5)
        return []


class Rejecting:
    name, phases, timeout, gate = "rejecting", frozenset({Phase.RCPT}), 1.0, True

    async def run(self, ctx):
        return [Result(self.name, "NOPE", Action.REJECT, reply="550 5.7.1 nope")]


def policy(**kw) -> Policy:
    return Policy.from_sections(1, domains=kw.get("domains", [{"name": "example.test"}]),
                                recipients=kw.get("recipients", []), networks=kw.get("networks", []))


def ctx(rcpt: str, pol: Policy | None = None, trusted: bool = False) -> Context:
    facts = SessionFacts("C1", "inbound", "inbound", "192.0.2.1", 1234, trusted_network=trusted)
    return Context(Phase.RCPT, facts, TransactionFacts(), pol or policy(), subject=rcpt,
                   address=parse_path(rcpt))


def run(pipeline, c):
    """(the deciding refusal or None, every result) as the session sees them."""
    enforce = lambda name: Mode.ENFORCE     # noqa: E731
    results = asyncio.run(pipeline.run(c, stop=lambda r: r.action in REFUSALS and r.check in pipeline.gates))
    return decide.refusal(results, enforce), results


def test_crashing_check_tempfails_with_no_exception_text():
    deciding, results = run(Pipeline([Crashing()]), ctx("<a@example.test>"))
    assert deciding.action is Action.TEMPFAIL
    assert decide.reply_for(deciding) == replies.S451_CHECK_UNAVAILABLE and "boom" not in deciding.reply
    assert results[0].symbol == "CHECK_ERROR"


def test_slow_check_tempfails_within_its_timeout():
    deciding, results = run(Pipeline([Slow()]), ctx("<a@example.test>"))
    assert deciding.action is Action.TEMPFAIL and results[0].symbol == "CHECK_TIMEOUT"


def test_first_gate_objection_decides_and_later_checks_do_not_run():
    deciding, results = run(Pipeline([Rejecting(), Crashing()]), ctx("<a@example.test>"))
    assert deciding.action is Action.REJECT and decide.reply_for(deciding) == "550 5.7.1 nope"
    assert [r.check for r in results] == ["rejecting"]


def test_each_check_sees_the_results_before_it():
    seen = []

    class Looking:
        name, phases, timeout = "looking", frozenset({Phase.RCPT}), None

        async def run(self, ctx):
            seen.extend(r.symbol for r in ctx.results)
            return []

    class Scoring:
        name, phases, timeout = "scoring", frozenset({Phase.RCPT}), None

        async def run(self, ctx):
            return [Result(self.name, "SCORED", score=2.0)]
    c = ctx("<a@example.test>")
    c.results = (Result("earlier", "FROM_CONNECT", score=1.0),)
    asyncio.run(Pipeline([Scoring(), Looking()]).run(c))
    assert seen == ["FROM_CONNECT", "SCORED"]
    assert [r.symbol for r in c.results] == ["FROM_CONNECT"]      # read-only for the checks


def test_relay_control_is_first_in_rcpt():
    rcpt_checks = [c.name for c in Pipeline(default_checks()).checks_for(Phase.RCPT)]
    assert rcpt_checks[0] == "rcpt_relay"


@pytest.mark.parametrize("rcpt,symbol,action", [
    ("<a@example.test>", "RELAY_GUARDED_DOMAIN", Action.ACCEPT),
    ("<a@EXAMPLE.test>", "RELAY_GUARDED_DOMAIN", Action.ACCEPT),
    ("<a@other.test>", "RELAY_DENIED", Action.REJECT),
    ("<a%b@example.test>", "RELAY_PERCENT_HACK", Action.REJECT),
    ("<@x.test:a@example.test>", "RELAY_SOURCE_ROUTE", Action.REJECT),
    ('<"a@b"@example.test>', "RELAY_QUOTED_LOCAL", Action.REJECT),
    ("<b!a@example.test>", "RELAY_BANG_PATH", Action.REJECT),
    ("<a@example.test.>", "RELAY_TRAILING_DOT", Action.REJECT),
    ("<a@[192.0.2.1]>", "RELAY_ADDRESS_LITERAL", Action.REJECT),
])
def test_relay_control_symbols(rcpt, symbol, action):
    out = asyncio.run(RelayControl().run(ctx(rcpt)))
    assert [(r.symbol, r.action) for r in out] == [(symbol, action)]


def test_trusted_client_may_relay_but_not_with_tricks():
    assert asyncio.run(RelayControl().run(ctx("<a@other.test>", trusted=True)))[0].symbol == \
        "RELAY_TRUSTED_NETWORK"
    assert asyncio.run(RelayControl().run(ctx("<a%b@other.test>", trusted=True)))[0].action is Action.REJECT


def test_recipient_list_only_applies_when_present():
    assert asyncio.run(RecipientList().run(ctx("<x@example.test>"))) == []
    pol = policy(recipients=["bob@example.test"])
    out = asyncio.run(RecipientList().run(ctx("<x@example.test>", pol)))
    assert out[0].symbol == "RCPT_UNKNOWN_USER" and out[0].reply.startswith("550 5.1.1")
    assert asyncio.run(RecipientList().run(ctx("<BOB@example.test>", pol)))[0].symbol == "RCPT_KNOWN_USER"
