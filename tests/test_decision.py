"""The decision core over real SMTP: delayed and early rejects, scores through
thresholds to one action, forced actions, check modes, per-recipient outcomes at
their own policy levels, header edits applied once, one policy snapshot per
transaction, and `policy test` giving the stored trace of a real session.

One in-process engine for the module (checks registered by the test: "planned"
checks that return what the test plans for each phase) and a real SMTP sink
downstream for what is delivered.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import threading
import time

import pytest

from mailbox_guard.checks import default_checks
from mailbox_guard.engine import Engine, ListenerSpec
from mailbox_guard.model import Action, HeaderRemoval, Mode, Phase, Result
from mailbox_guard.session import whatif
from mailbox_guard.store.db import PolicyStore, connect, ensure_home, state_versions
from tests.conftest import Sink

HOSTNAME = "gw.example.test"


class Planned:
    """A scoring (non-gate) check of one phase returning ``plan[phase]`` (for RCPT a
    dict by recipient), counting its runs."""
    gate = False
    fixed_mode = False
    default_mode = Mode.ENFORCE
    timeout = None

    def __init__(self, phase: Phase, plan: dict) -> None:
        self.phase = phase
        self.name = f"planned_{phase.value}"
        self.phases = frozenset({phase})
        self.description = f"test check of {phase.value}"
        self.plan = plan
        self.runs = 0
        self.seen: list[str] = []

    async def run(self, ctx):
        self.runs += 1
        self.seen = [r.symbol for r in ctx.results]        # what this check was shown
        planned = self.plan.get(self.phase.value, [])
        if self.phase is Phase.RCPT:
            planned = planned.get(ctx.address.address.lower(), []) if planned else []
        return [Result(self.name, *r) if isinstance(r, tuple) else r for r in planned]


class Gateway:
    def __init__(self, home, sink: Sink) -> None:
        self.plan: dict = {}
        self.home = home
        self.checks = {p: Planned(p, self.plan) for p in (Phase.CONNECT, Phase.HELO, Phase.MAIL, Phase.RCPT,
                                                          Phase.DATA)}
        order = default_checks()
        # Planned checks after the real ones of their phase (relay control stays first).
        checks = order + list(self.checks.values())
        self.engine = Engine(home, listeners=[ListenerSpec("inbound", "inbound", "127.0.0.1", 0),
                                              ListenerSpec("submission", "submission", "127.0.0.1", 0)],
                             checks=checks)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.sink = sink

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "Gateway":
        self.thread.start()
        self.call(self.engine.start())
        ports = {b["name"]: b["port"] for b in self.engine.bound}
        self.port, self.submission_port = ports["inbound"], ports["submission"]
        return self

    def stop(self) -> None:
        self.call(self.engine.shutdown(), 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    # ------------------------------------------------------------- policy
    def sql(self, statement: str, args: tuple = ()) -> None:
        conn = connect(self.home / "mailbox-guard.db")
        try:
            conn.execute(statement, args)
        finally:
            conn.close()

    def reload(self) -> None:
        self.call(self.engine.reload_policy())

    def set(self, key: str, value: str, scope: str | None = None) -> None:
        if scope is None:
            self.sql("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))
        else:
            self.sql("INSERT OR REPLACE INTO scoped_settings (scope, key, value) VALUES (?, ?, ?)",
                     (scope, key, value))
        self.reload()

    def mode(self, check: str, mode: str, scope: str = "") -> None:
        self.sql("INSERT OR REPLACE INTO check_modes (check_name, scope, mode) VALUES (?, ?, ?)",
                 (check, scope, mode))
        self.reload()

    def reset(self) -> None:
        # Let the deliveries of the last test land before the sink is emptied.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.rows(
                "SELECT 1 FROM messages WHERE state IN ('incoming', 'active', 'deferred') LIMIT 1"):
            time.sleep(0.05)
        self.plan.clear()
        for table in ("scoped_settings", "check_modes"):
            self.sql(f"DELETE FROM {table}")
        self.sql("DELETE FROM settings WHERE key LIKE 'actions.%' OR key = 'smtp.delay_reject'")
        self.reload()
        with self.sink.lock:
            self.sink.messages.clear()

    # ------------------------------------------------------------- store reads
    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        conn = connect(self.home / "mailbox-guard.db", readonly=True)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def versions(self) -> tuple:
        """(policy_version, bans_version) of the store."""
        conn = connect(self.home / "mailbox-guard.db", readonly=True)
        try:
            return state_versions(conn)
        finally:
            conn.close()

    def message(self, queue_id: str) -> dict:
        row = self.rows("SELECT state, reason, connection_id FROM messages WHERE id = ?", (queue_id,))
        assert row, f"no message {queue_id}"
        rcpts = [r[0] for r in self.rows("SELECT recipient FROM message_recipients WHERE message_id = ?",
                                          (queue_id,))]
        trace = self.rows("SELECT phase, subject, check_name, symbol, action, detail FROM verdicts "
                          "WHERE message_id = ? ORDER BY seq", (queue_id,))
        return {"state": row[0][0], "reason": row[0][1], "connection": row[0][2], "recipients": rcpts,
                "trace": trace}

    def messages_since(self, t: float) -> list[str]:
        return [r[0] for r in self.rows("SELECT id FROM messages WHERE received_at >= ? ORDER BY id", (t,))]

    def last_connection(self, after: float, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows("SELECT id FROM connections WHERE started_at >= ? AND ended_at IS NOT NULL "
                             "ORDER BY started_at DESC LIMIT 1", (after,))
            if rows:
                return rows[0][0]
            time.sleep(0.05)
        raise AssertionError("the connection was not recorded")

    def connection_trace(self, connection_id: str) -> list[tuple]:
        """Every row of the connection once (a transaction's rows are stored with each
        message it became)."""
        rows = self.rows("SELECT phase, subject, check_name, symbol, action, detail, seq FROM verdicts "
                         "WHERE connection_id = ? ORDER BY seq", (connection_id,))
        return list({r[6]: r[:6] for r in rows}.values())


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    home = tmp_path_factory.mktemp("decision") / "home"
    sink = Sink().start()
    store = PolicyStore(ensure_home(home))
    for domain in ("example.test", "a.test", "b.test"):
        store.add_domain(domain, sink.hop)
    store.set_setting("smtp.hostname", HOSTNAME)
    store.set_setting("smtp.error_sleep", "0")
    store.set_setting("engine.drain_timeout", "2s")
    g = Gateway(home, sink).start()
    yield g
    g.stop()
    sink.stop()


@pytest.fixture
def g(gw):
    gw.reset()
    yield gw
    gw.reset()


def _unverified():
    """A client TLS context for the engine's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


MESSAGE = b"From: <s@sender.test>\r\nTo: <r@example.test>\r\nSubject: hello\r\nMessage-ID: <m1@sender.test>\r\n\r\nbody\r\n"


def send(g, rcpts, message=MESSAGE, mail_from="s@sender.test"):
    """(MAIL reply, [RCPT replies], DATA reply or None) of one transaction."""
    with smtplib.SMTP("127.0.0.1", g.port, timeout=20) as s:
        s.ehlo("client.sender.test")
        mail = s.mail(mail_from)
        codes = [s.rcpt(r) for r in rcpts]
        data = None
        if any(c[0] == 250 for c in codes):
            s.putcmd("data")
            code, text = s.getreply()
            if code == 354:
                s.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
                data = s.getreply()
            else:
                data = (code, text)
        return mail, codes, data


# ---------------------------------------------------------------- delayed reject
def test_a_connect_reject_is_answered_at_rcpt_and_postmaster_still_gets_through(g):
    g.plan["connect"] = [("TEST_CONNECT_REJECT", Action.REJECT, 0.0, "554 5.7.1 Client refused by test")]
    t = time.time()
    mail, codes, data = send(g, ["r@example.test", "postmaster@example.test"])
    assert mail[0] == 250                                   # delayed: MAIL is not refused
    assert codes[0] == (554, b"5.7.1 Client refused by test")
    assert codes[1][0] == 250                               # the per-recipient exception applies
    assert data[0] == 250
    queued = g.messages_since(t)
    assert len(queued) == 1 and g.message(queued[0])["recipients"] == ["postmaster@example.test"]
    trace = g.connection_trace(g.last_connection(t))
    connect_rows = [r for r in trace if r[0] == "connect" and r[3] == "TEST_CONNECT_REJECT"]
    assert connect_rows and connect_rows[0][4] == "delayed"
    deciding = [r for r in trace if r[0] == "rcpt" and r[4] == "reject"]
    assert [(r[1], r[2], r[3]) for r in deciding] == [("r@example.test", "planned_connect", "TEST_CONNECT_REJECT")]
    assert deciding[0][5].startswith("found at CONNECT, answered at RCPT")


def test_a_connect_reject_with_nothing_exempt_queues_nothing(g):
    g.plan["connect"] = [("TEST_CONNECT_REJECT", Action.REJECT, 0.0, "554 5.7.1 Client refused by test")]
    t = time.time()
    _, codes, data = send(g, ["r@example.test", "x@a.test"])
    assert [c[0] for c in codes] == [554, 554] and data is None
    assert g.messages_since(t) == []


def test_with_delay_reject_off_a_connect_reject_replaces_the_banner(g):
    g.set("smtp.delay_reject", "no")
    g.plan["connect"] = [("TEST_CONNECT_REJECT", Action.REJECT, 0.0, "554 5.7.1 Client refused by test")]
    with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
        banner = s.recv(1000)
        assert banner == b"554 5.7.1 Client refused by test\r\n"
        assert s.recv(1000) == b""                          # and the connection is closed


def test_a_helo_finding_waits_for_rcpt_too(g):
    g.plan["helo"] = [("TEST_HELO_BAD", Action.REJECT, 0.0, "550 5.7.1 Bad HELO by test")]
    mail, codes, _ = send(g, ["r@example.test"])
    assert mail[0] == 250 and codes[0] == (550, b"5.7.1 Bad HELO by test")


def test_a_mail_finding_waits_for_rcpt_and_postmaster_still_gets_through(g):
    g.plan["mail"] = [("TEST_MAIL_BAD", Action.REJECT, 0.0, "550 5.7.1 Bad sender by test")]
    mail, codes, data = send(g, ["r@example.test", "postmaster@example.test"])
    assert mail[0] == 250 and codes[0] == (550, b"5.7.1 Bad sender by test") and codes[1][0] == 250
    assert data[0] == 250


@pytest.mark.parametrize("phase", ["helo", "mail"])
def test_with_delay_reject_off_a_finding_is_answered_at_its_own_command(g, phase):
    g.set("smtp.delay_reject", "no")
    g.plan[phase] = [("TEST_EARLY", Action.REJECT, 0.0, "550 5.7.1 Refused at once by test")]
    with smtplib.SMTP("127.0.0.1", g.port, timeout=20) as s:
        code, text = s.ehlo("client.sender.test")
        if phase == "helo":
            assert (code, text) == (550, b"5.7.1 Refused at once by test")
            return
        assert code == 250
        assert s.mail("s@sender.test") == (550, b"5.7.1 Refused at once by test")


# ---------------------------------------------------------------- scores
def test_scores_add_up_across_phases_and_tag_adds_the_headers(g):
    g.set("actions.subject_prefix", "[SPAM]")
    g.plan.update(connect=[("TEST_C", Action.NONE, 3.0)], mail=[("TEST_M", Action.NONE, 2.0)],
                  data=[("TEST_D", Action.NONE, 2.0)])
    t = time.time()
    _, codes, data = send(g, ["r@example.test"])
    assert codes[0][0] == 250 and data[0] == 250
    got = g.sink.wait_for(1)[0].data
    head = got.split(b"\r\n\r\n")[0]
    assert b"\r\nX-Spam-Flag: YES\r\n" in b"\r\n" + head
    assert b"X-Spam-Score: 7.00" in head
    assert b"Subject: [SPAM] hello" in head and head.count(b"Subject:") == 1
    m = g.message(g.messages_since(t)[0])
    assert m["state"] in ("incoming", "active", "delivered")
    outcome = [r for r in m["trace"] if r[3].startswith("OUTCOME_")]
    assert [(r[1], r[3], r[4]) for r in outcome] == [("r@example.test", "OUTCOME_TAG", "tag")]


def test_a_score_over_quarantine_leaves_the_message_in_quarantine(g):
    g.set("actions.quarantine", "8")
    g.plan.update(connect=[("TEST_C", Action.NONE, 3.0)], data=[("TEST_D", Action.NONE, 6.0)])
    t = time.time()
    _, _, data = send(g, ["r@example.test"])
    assert data[0] == 250
    m = g.message(g.messages_since(t)[0])
    assert m["state"] == "quarantine" and "score 9" in m["reason"]
    time.sleep(0.5)
    assert g.sink.messages == []                            # never delivered


def test_a_score_over_reject_at_data_is_a_5xx_and_nothing_is_stored(g):
    g.plan.update(data=[("TEST_D", Action.NONE, 16.0)])
    t = time.time()
    _, _, data = send(g, ["r@example.test"])
    assert data[0] == 550 and data[1].startswith(b"5.7.1")
    assert g.messages_since(t) == []


def test_a_score_reaching_reject_before_data_refuses_the_recipient(g):
    g.plan.update(connect=[("TEST_C", Action.NONE, 10.0)], mail=[("TEST_M", Action.NONE, 6.0)])
    _, codes, data = send(g, ["r@example.test"])
    assert codes[0][0] == 550 and data is None


def test_a_tempfail_threshold_gives_451(g):
    g.set("actions.tempfail", "4")
    g.plan.update(data=[("TEST_D", Action.NONE, 4.5)])
    t = time.time()
    _, _, data = send(g, ["r@example.test"])
    assert data[0] == 451 and g.messages_since(t) == []


def test_a_forced_action_overrides_the_score_and_the_exemption(g):
    g.plan.update(data=[Result("planned_data", "TEST_VIRUS", Action.QUARANTINE, forced=True, detail="Eicar")])
    t = time.time()
    _, codes, data = send(g, ["postmaster@example.test"])
    assert codes[0][0] == 250 and data[0] == 250
    m = g.message(g.messages_since(t)[0])
    assert m["state"] == "quarantine" and "TEST_VIRUS" in m["reason"]


def test_a_forced_action_is_the_outcome_whatever_the_score_reaches(g):
    # Score 16 reaches actions.reject (15), but the forced quarantine (a virus) decides:
    # the message is kept in quarantine, not refused.
    g.plan.update(data=[Result("planned_data", "TEST_VIRUS", Action.QUARANTINE, forced=True, detail="Eicar"),
                        ("TEST_SPAM", Action.NONE, 16.0)])
    t = time.time()
    _, _, data = send(g, ["r@example.test"])
    assert data[0] == 250
    m = g.message(g.messages_since(t)[0])
    assert m["state"] == "quarantine"
    assert "TEST_VIRUS" in m["reason"] and "forced, score 16 not applied" in m["reason"]
    # ... and a forced reject below every threshold still rejects.
    g.plan.update(data=[Result("planned_data", "TEST_VIRUS", Action.REJECT, forced=True,
                               reply="554 5.7.1 virus found by test")])
    t = time.time()
    _, _, data = send(g, ["r@example.test"])
    assert data == (554, b"5.7.1 virus found by test") and g.messages_since(t) == []


def test_a_domain_in_warn_mode_traces_would_for_its_recipient_only(g):
    g.mode("planned_data", "warn", scope="a.test")
    g.plan.update(data=[("TEST_D_REJECT", Action.REJECT, 0.0, "550 5.7.1 test says no")])
    t = time.time()
    _, codes, data = send(g, ["x@a.test", "y@b.test"])
    assert [c[0] for c in codes] == [250, 250] and data[0] == 250
    msgs = {tuple(g.message(i)["recipients"]): g.message(i) for i in g.messages_since(t)}
    # b.test enforces (a reject beside an accepting recipient: quarantined); a.test only warns.
    assert msgs[("y@b.test",)]["state"] == "quarantine"
    passed = msgs[("x@a.test",)]
    assert passed["state"] != "quarantine"
    rows = [r for r in passed["trace"] if r[1] == "x@a.test" and r[3] == "TEST_D_REJECT"]
    assert [(r[4], r[5]) for r in rows] == [("warn", "mode warn at domain a.test: would reject")]
    assert not [r for r in msgs[("y@b.test",)]["trace"] if r[1] == "y@b.test" and r[3] == "TEST_D_REJECT"]


def test_later_checks_see_the_results_of_earlier_phases_and_recipients(g):
    g.plan.update(connect=[("TEST_C", Action.NONE, 1.0)], helo=[("TEST_H", Action.NONE, 1.0)],
                  mail=[("TEST_M", Action.NONE, 1.0)], rcpt={"r@example.test": [("TEST_R", Action.NONE, 1.0)]})
    send(g, ["r@example.test"])
    assert [s for s in g.checks[Phase.DATA].seen if s.startswith("TEST_")] == ["TEST_C", "TEST_H", "TEST_M",
                                                                                "TEST_R"]
    assert [s for s in g.checks[Phase.RCPT].seen if s.startswith("TEST_")] == ["TEST_C", "TEST_H", "TEST_M"]


def test_warn_mode_traces_would_and_delivers(g):
    g.mode("planned_data", "warn")
    g.plan.update(data=[("TEST_D_REJECT", Action.REJECT, 0.0, "550 5.7.1 test says no")])
    t = time.time()
    _, _, data = send(g, ["r@example.test"])
    assert data[0] == 250
    g.sink.wait_for(1)
    m = g.message(g.messages_since(t)[0])
    rows = [r for r in m["trace"] if r[3] == "TEST_D_REJECT"]
    assert rows and rows[0][4] == "warn" and rows[0][5].startswith("would reject")


def test_warn_mode_traces_would_quarantine(g):
    g.mode("planned_data", "warn")
    g.plan.update(data=[("TEST_D_HOLD", Action.QUARANTINE)])
    t = time.time()
    _, _, data = send(g, ["r@example.test"])
    assert data[0] == 250
    m = g.message(g.messages_since(t)[0])
    assert m["state"] != "quarantine"
    assert [(r[4], r[5]) for r in m["trace"] if r[3] == "TEST_D_HOLD"] == [("warn", "would quarantine")]


def test_off_mode_never_runs_the_check(g):
    g.mode("planned_data", "off")
    g.plan.update(data=[("TEST_D_REJECT", Action.REJECT, 0.0, "550 5.7.1 test says no")])
    before = g.checks[Phase.DATA].runs
    _, _, data = send(g, ["r@example.test"])
    assert data[0] == 250 and g.checks[Phase.DATA].runs == before


# ---------------------------------------------------------------- per recipient
def test_two_recipients_at_different_levels_end_differently_each_with_its_trace(g):
    g.set("actions.quarantine", "5", scope="a.test")
    g.plan.update(data=[("TEST_D", Action.NONE, 5.5)])
    t = time.time()
    _, codes, data = send(g, ["x@a.test", "y@b.test"])
    assert [c[0] for c in codes] == [250, 250] and data[0] == 250
    msgs = {tuple(g.message(i)["recipients"]): g.message(i) for i in g.messages_since(t)}
    assert set(msgs) == {("x@a.test",), ("y@b.test",)}
    held, passed = msgs[("x@a.test",)], msgs[("y@b.test",)]
    assert held["state"] == "quarantine"
    assert passed["state"] != "quarantine"
    assert [r[1] for r in held["trace"] if r[3].startswith("OUTCOME_")] == ["x@a.test"]
    assert [r[1] for r in passed["trace"] if r[3].startswith("OUTCOME_")] == ["y@b.test"]
    assert "level domain a.test" in [r[5] for r in held["trace"] if r[3] == "OUTCOME_QUARANTINE"][0]
    assert [r.rcpt_tos for r in g.sink.wait_for(1)] == [["y@b.test"]]


def test_a_message_all_of_whose_recipients_reject_gets_5xx_and_is_not_stored(g):
    g.set("actions.reject", "5", scope="a.test")
    g.set("actions.reject", "5", scope="b.test")
    g.plan.update(data=[("TEST_D", Action.NONE, 6.0)])
    t = time.time()
    _, _, data = send(g, ["x@a.test", "y@b.test"])
    assert data[0] == 550 and g.messages_since(t) == []


def test_a_recipient_rejecting_while_another_accepts_is_quarantined_not_bounced(g):
    g.set("actions.reject", "5", scope="a.test")
    g.plan.update(data=[("TEST_D", Action.NONE, 6.0)])
    t = time.time()
    _, _, data = send(g, ["x@a.test", "y@b.test"])
    assert data[0] == 250
    states = {g.message(i)["recipients"][0]: g.message(i)["state"] for i in g.messages_since(t)}
    assert states["x@a.test"] == "quarantine"


# ---------------------------------------------------------------- headers
def test_a_checks_header_appears_once_and_a_forged_auth_results_is_removed(g):
    g.plan.update(data=[Result("planned_data", "TEST_HEADER", add_headers=(("X-Test-Check", "added"),))])
    message = (b"Authentication-Results: " + HOSTNAME.encode() + b"; spf=pass smtp.mailfrom=forged\r\n"
               b"Authentication-Results: other.example; spf=fail\r\n" + MESSAGE)
    send(g, ["r@example.test"], message=message)
    got = g.sink.wait_for(1)[0].data
    head = got.split(b"\r\n\r\n")[0]
    assert head.count(b"X-Test-Check: added") == 1
    assert HOSTNAME.encode() + b"; spf=pass" not in head
    assert b"Authentication-Results: other.example; spf=fail" in head
    assert head.count(b"Received: from") == 1 and got.endswith(b"\r\nbody\r\n")


# ---------------------------------------------------------------- snapshots and versions
def test_a_policy_change_mid_transaction_does_not_change_its_decisions(g):
    g.plan.update(connect=[("TEST_C", Action.NONE, 3.0)])
    with smtplib.SMTP("127.0.0.1", g.port, timeout=20) as s:
        s.ehlo("client.sender.test")
        assert s.mail("s@sender.test")[0] == 250
        g.set("actions.reject", "2")                        # now 3 would reject at RCPT
        assert s.rcpt("r@example.test")[0] == 250           # the transaction keeps its snapshot
        assert s.data(MESSAGE)[0] == 250
        s.rset()
        assert s.mail("s@sender.test")[0] == 250
        assert s.rcpt("r@example.test")[0] == 550           # a new transaction sees the change


def test_runtime_state_leaves_policy_version_alone(g):
    from mailbox_guard.auth.users import UserStore, hash_password, set_password_hash
    db = g.home / "mailbox-guard.db"
    users = UserStore(PolicyStore(db))
    users.add("carol@example.test", "correct horse battery staple 42")
    before = g.versions()
    g.sql("INSERT INTO auth_bans (kind, key, until, failures, created_at) VALUES ('ip', '192.0.2.9', ?, 10, ?)",
          (time.time() + 60, time.time()))
    conn = connect(db)
    try:
        conn.execute("BEGIN")
        set_password_hash(conn, "carol@example.test", hash_password("another horse battery 43"),
                          "another horse battery 43")
        conn.execute("UPDATE users SET changed_at = ? WHERE name = ?", (time.time(), "carol@example.test"))
        conn.execute("COMMIT")
    finally:
        conn.close()
    after = g.versions()
    assert after[0] == before[0]                            # no policy reload
    assert after[1] > before[1]                             # the bans are reloaded
    g.reload()
    assert g.engine.auth.refused("192.0.2.9")
    g.sql("DELETE FROM auth_bans")


def test_an_auth_brute_force_ban_does_not_bump_policy_version(g, tmp_path):
    before = g.versions()
    for _ in range(3):
        g.call(g.engine.auth.failed("192.0.2.77", "nobody@example.test"))
    g.set("auth.ban_after", "3")
    for _ in range(3):
        g.call(g.engine.auth.failed("192.0.2.77", "nobody@example.test"))
    after = g.versions()
    assert g.rows("SELECT count(*) FROM auth_bans WHERE key = '192.0.2.77'")[0][0] == 1
    assert after[0] == before[0] + 1                        # only the auth.ban_after edit above
    g.sql("DELETE FROM settings WHERE key = 'auth.ban_after'")
    g.sql("DELETE FROM auth_bans")


# ---------------------------------------------------------------- what-if = real
def _comparable(rows):
    """(phase, subject, check, symbol, action) in order; the queue id differs."""
    return [(r[0], "" if r[0] == "queue" and r[2] == "queue" else r[1], r[2], r[3], r[4]) for r in rows]


CASES = [
    ("plain", {}, ["r@example.test"]),
    ("relay denied and one accepted", {}, ["x@elsewhere.test", "r@example.test"]),
    ("delayed connect reject, postmaster exempt",
     {"connect": [("TEST_CONNECT_REJECT", Action.REJECT, 0.0, "554 5.7.1 Client refused by test")]},
     ["r@example.test", "postmaster@example.test"]),
    ("scored and tagged", {"connect": [("TEST_C", Action.NONE, 4.0)], "data": [("TEST_D", Action.NONE, 3.0)]},
     ["r@example.test"]),
    ("two levels", {"data": [("TEST_D", Action.NONE, 5.5)]}, ["x@a.test", "y@b.test"]),
]


@pytest.mark.parametrize("name,plan,rcpts", CASES, ids=[c[0] for c in CASES])
def test_policy_test_gives_the_stored_trace_of_a_real_session(g, name, plan, rcpts):
    g.set("actions.quarantine", "5", scope="a.test")
    g.plan.update(plan)
    t = time.time()
    send(g, rcpts)
    real = g.connection_trace(g.last_connection(t))
    real = [r for r in real if r[0] != "tls"]
    w = whatif.WhatIf(ip="127.0.0.1", helo="client.sender.test", mail_from="s@sender.test", recipients=rcpts,
                      message=MESSAGE)
    report = asyncio.run(whatif.run(w, g.engine.policy, checks=list(g.engine.pipeline.checks)))
    simulated = [(v.phase, v.subject, v.check, v.symbol, v.action, v.detail) for v in report.trace]
    assert _comparable(simulated) == _comparable(real)
    assert report.final is not None or not any(r == "r@example.test" for r in rcpts[:1])


def test_policy_test_gives_the_stored_trace_of_an_authenticated_tls_session(g):
    from mailbox_guard.auth.users import UserStore
    password = "whatif horse battery staple 45"
    UserStore(PolicyStore(g.home / "mailbox-guard.db")).add("erin@example.test", password)
    g.plan.update(mail=[("TEST_M", Action.NONE, 2.0)], data=[("TEST_D", Action.NONE, 4.5)])
    message = MESSAGE.replace(b"s@sender.test", b"erin@example.test")
    context = _unverified()
    t = time.time()
    with smtplib.SMTP("127.0.0.1", g.submission_port, timeout=20) as s:
        s.ehlo("client.sender.test")
        s.starttls(context=context)
        s.ehlo("client.sender.test")
        s.login("erin@example.test", password)
        s.sendmail("erin@example.test", ["r@example.test", "x@elsewhere.test"], message)
    real = [r for r in g.connection_trace(g.last_connection(t)) if r[0] != "tls"]
    assert ("auth", "erin@example.test", "auth", "AUTH_OK", "accept") in [r[:5] for r in real]
    w = whatif.WhatIf(ip="127.0.0.1", helo="client.sender.test", mail_from="erin@example.test",
                      recipients=["r@example.test", "x@elsewhere.test"], listener="submission",
                      listener_kind="submission", auth_user="erin@example.test",
                      auth_addresses=frozenset({"erin@example.test"}), tls=True, message=message)
    report = asyncio.run(whatif.run(w, g.engine.policy, checks=list(g.engine.pipeline.checks)))
    simulated = [(v.phase, v.subject, v.check, v.symbol, v.action, v.detail) for v in report.trace
                 if v.phase != "tls"]
    assert _comparable(simulated) == _comparable(real)
    assert [(o["recipient"], o["outcome"]) for o in report.outcomes] == [("r@example.test", "tag"),
                                                                         ("x@elsewhere.test", "tag")]


def test_the_policy_test_command_shows_phases_and_outcomes_and_stores_nothing(tmp_path):
    import json
    from tests.conftest import new_gateway
    gw = new_gateway(tmp_path / "home")
    gw.cli("domains", "add", "example.org")
    gw.cli("config", "set", "actions.reject", "15")
    before = gw.query("SELECT count(*) AS n FROM messages")[0]["n"], gw.query("SELECT count(*) AS n FROM verdicts")[0]["n"]
    eml = tmp_path / "m.eml"
    eml.write_bytes(b"From: <a@example.net>\nSubject: hi\n\nhello\n")
    out = gw.cli("policy", "test", "--ip", "192.0.2.7", "--helo", "mx.example.net", "--from", "a@example.net",
                 "--to", "bob@example.org", "--to", "eve@elsewhere.test", str(eml), "--json")
    report = json.loads(out.stdout)
    assert [s["reply"][:3] for s in report["steps"]] == ["220", "250", "250", "250", "554", "250"]
    assert ("rcpt", "eve@elsewhere.test", "rcpt_relay", "RELAY_DENIED") in \
        [(r["phase"], r["subject"], r["check"], r["symbol"]) for r in report["results"]]
    assert [(o["recipient"], o["outcome"], o["level"]) for o in report["recipients"]] == \
        [("bob@example.org", "accept", "server")]
    after = gw.query("SELECT count(*) AS n FROM messages")[0]["n"], gw.query("SELECT count(*) AS n FROM verdicts")[0]["n"]
    assert after == before
    text = gw.cli("policy", "test", "--ip", "192.0.2.7", "--helo", "h", "--from", "a@example.net",
                  "--to", "bob@example.org").stdout
    assert "rcpt_relay/RELAY_GUARDED_DOMAIN" in text and "bob@example.org: accept" in text
    bad = gw.cli("policy", "test", "--ip", "not-an-ip", "--helo", "h", "--from", "a@x", "--to", "b@y", check=False)
    assert bad.returncode != 0 and "not an IP address" in bad.stderr
    nouser = gw.cli("policy", "test", "--ip", "192.0.2.7", "--helo", "h", "--from", "a@x", "--to", "b@y",
                    "--auth", "ghost@example.org", check=False)
    assert nouser.returncode == 1 and "no such user" in nouser.stderr
    gw.cli("users", "add", "bob@example.org", "--password-stdin", input="policy horse battery staple 46\n")
    authed = json.loads(gw.cli("policy", "test", "--ip", "192.0.2.7", "--helo", "laptop", "--from",
                               "bob@example.org", "--to", "eve@elsewhere.test", "--auth", "bob@example.org",
                               "--tls", "--json").stdout)
    assert [s["command"].split(" ")[0] for s in authed["steps"]][:3] == ["(connect", "EHLO", "AUTH"]
    assert authed["steps"][-1]["reply"][:3] == "250"      # an authenticated user may relay
    assert ("tls", "TLS_ESTABLISHED") in [(r["phase"], r["symbol"]) for r in authed["results"]]
    assert [(o["recipient"], o["outcome"]) for o in authed["recipients"]] == [("eve@elsewhere.test", "accept")]


def test_messages_and_connections_keep_the_facts_a_replay_needs(g):
    """Listener, HELO, TLS version and cipher, the authenticated user and mechanism;
    the login rehashes an old password hash on the way, and policy_version stays."""
    from argon2 import PasswordHasher
    from mailbox_guard.auth.users import UserStore
    db = g.home / "mailbox-guard.db"
    password = "replay horse battery staple 44"
    UserStore(PolicyStore(db)).add("dave@example.test", password)
    g.sql("UPDATE users SET password_hash = ? WHERE name = 'dave@example.test'",
          (PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(password),))

    before = g.versions()
    t = time.time()
    context = _unverified()
    with smtplib.SMTP("127.0.0.1", g.submission_port, timeout=20) as s:
        s.ehlo("replay.sender.test")
        s.starttls(context=context)
        s.ehlo("replay.sender.test")
        s.login("dave@example.test", password)
        s.sendmail("dave@example.test", ["r@example.test"], MESSAGE.replace(b"s@sender.test", b"dave@example.test"))
    queue_id = g.messages_since(t)[0]
    helo, tls, listener, auth_user = g.rows("SELECT helo, tls, listener, auth_user FROM messages WHERE id = ?",
                                            (queue_id,))[0]
    assert (helo, listener, auth_user) == ("replay.sender.test", "submission", "dave@example.test")
    assert tls.startswith("TLSv1.")
    conn_id = g.last_connection(t)
    row = g.rows("SELECT tls_version, tls_cipher, helo, listener, auth_user, auth_mechanism FROM connections "
                 "WHERE id = ?", (conn_id,))[0]
    version, cipher = row[:2]
    assert version.startswith("TLSv1.") and cipher and tls == f"{version} {cipher}"
    assert row[2:] == ("replay.sender.test", "submission", "dave@example.test", "PLAIN")
    deadline = time.monotonic() + 10
    while not g.rows("SELECT password_hash FROM users WHERE name = 'dave@example.test'")[0][0].startswith(
            "$argon2id$v=19$m=19456,t=2,"):
        assert time.monotonic() < deadline, "the old hash was not upgraded at login"
        time.sleep(0.05)
    assert g.versions()[0] == before[0]           # the rehash (and the login's bookkeeping): no reload


def test_a_repeated_ehlo_replaces_its_findings_and_scores_are_not_added_twice(g):
    g.plan.update(helo=[("TEST_H", Action.NONE, 4.0)])
    with smtplib.SMTP("127.0.0.1", g.port, timeout=20) as s:
        s.ehlo("one.sender.test")
        s.ehlo("two.sender.test")
        s.sendmail("s@sender.test", ["r@example.test"], MESSAGE)
    head = g.sink.wait_for(1)[0].data.split(b"\r\n\r\n")[0]
    assert b"X-Spam-Flag" not in head                       # 4, not 8: under the tag threshold (6)


def test_a_discarded_message_is_accepted_recorded_and_not_queued(g):
    g.plan.update(data=[("TEST_DISCARD", Action.DISCARD)])
    t = time.time()
    _, _, data = send(g, ["r@example.test"])
    assert data[0] == 250
    assert g.messages_since(t) == []
    trace = g.connection_trace(g.last_connection(t))
    assert ("queue", "r@example.test", "decide", "OUTCOME_DISCARD", "discard") in [r[:5] for r in trace]
