"""The dashboard, driven with ``App.run_test()`` and Pilot.

Against a real engine (the ``gateway`` fixture): a connection opened by a test client
shows in the connections screen and goes when it closes; a queued message is found,
inspected (verdict trace) and deleted after a confirmation; a brute-force ban written
to the store shows in the bans screen and is lifted after a confirmation; with the
engine stopped the app says so, still lists the queue and the bans from the store,
refuses actions, and reconnects on ``r``.

Snapshots of every screen at 80x24 use a frozen source (no clocks, ports or pids) and
are compared as text with ``tests/__snapshots__/test_tui/*.txt``. To accept a change
after looking at it: ``TUI_SNAPSHOT_UPDATE=1 pytest tests/test_tui.py -k snapshot``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from rich.console import Console
from textual.worker import WorkerCancelled

from mailbox_guard.queue import states as queue_states
from tests.conftest import make_message
from tui.app import MailboxGuardApp
from tui.feed import LiveState
from tui.screens import BansScreen, ConfirmScreen, ConnectionsScreen, HelpScreen, MessageDetailScreen, QueueScreen
from tui.source import KINDS, ControlCallError, EngineNotRunning, MessagePage, Source
from tui.widgets import BanTable, ConnectionTable, EngineBanner, MessageTable, QuarantineTable, VerdictTrace
from tui.widgets.banner import NOT_RUNNING

SIZE = (80, 24)
SNAPSHOTS = Path(__file__).parent / "__snapshots__" / "test_tui"


# ----------------------------------------------------------------------------- helpers
def screen_text(app: MailboxGuardApp) -> str:
    """What the terminal shows, as text (the modal and the screens under it)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def settle(pilot, rounds: int = 3) -> None:
    """Let workers other than the live feed finish, and the screen repaint."""
    for _ in range(rounds):
        await pilot.pause()
        for worker in list(pilot.app.workers):
            if worker.group != "feed" and not worker.is_finished:
                with contextlib.suppress(WorkerCancelled):     # superseded by a newer load
                    await worker.wait()
        await pilot.pause()


async def until(pilot, predicate, timeout: float, what: str) -> float:
    """Wait (letting the app run) until ``predicate()``; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{screen_text(pilot.app)}")
        await pilot.pause(0.05)
    return time.monotonic() - start


def table_keys(table) -> list[str]:
    return [row.key.value for row in table.ordered_rows]


# ----------------------------------------------------------------------------- real engine
def test_connection_appears_within_2s_and_goes_when_closed(gateway):
    gateway.start()

    async def scenario():
        app = MailboxGuardApp(gateway.home)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("c")
            assert isinstance(app.screen, ConnectionsScreen)
            await until(pilot, lambda: app.live.running is True, 10, "the engine")
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            try:
                assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220")
                writer.write(b"EHLO tui-probe.test\r\n")
                await writer.drain()
                while not (line := await asyncio.wait_for(reader.readline(), 5)).startswith(b"250 "):
                    assert line.startswith(b"250-")
                port = writer.get_extra_info("sockname")[1]
                table = app.screen.query_one(ConnectionTable)
                took = await until(pilot, lambda: any(r.get("peer_port") == port for r in table._rows.values()),
                                   2.0, f"the connection from port {port}")
                assert took <= 2.0
                await pilot.pause(0.2)
                text = screen_text(app)
                assert f"127.0.0.1:{port}" in text and "tui-probe.test" in text, text
            finally:
                writer.write(b"QUIT\r\n")
                writer.close()
                await writer.wait_closed()
            await until(pilot, lambda: not any(r.get("peer_port") == port for r in table._rows.values()),
                        2.0, "the closed connection to go")
            assert f"127.0.0.1:{port}" not in screen_text(app)

    asyncio.run(scenario())


def send(gateway, message_id: str, sender: str = "alice@sender.test", to: str = "bob@example.test") -> None:
    with gateway.smtp() as s:
        s.sendmail(sender, [to], make_message(sender=sender, to=to, message_id=message_id))


def test_queued_message_found_inspected_and_deleted_with_confirmation(gateway):
    # A guarded domain whose next hop is dead: the message stays deferred (for an hour).
    gateway.policy().add_domain("example.test", "127.0.0.1:9")
    gateway.configure(queue__retry_schedule="1h")
    gateway.start()
    token = f"tuitest{time.time_ns()}"
    send(gateway, f"<{token}@client.test>")
    send(gateway, "<other@client.test>")       # a second message the filter must hide
    gateway.wait_until(lambda: len(gateway.query("SELECT id FROM messages WHERE state = 'deferred'")) == 2,
                       what="both messages deferred")
    queue_id = gateway.query("SELECT id FROM messages WHERE message_id = ?", f"<{token}@client.test>")[0]["id"]

    async def scenario():
        app = MailboxGuardApp(gateway.home)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.live.running is True, 10, "the engine")
            await pilot.press("q")
            assert isinstance(app.screen, QueueScreen)
            table = app.screen.query_one(MessageTable)
            await until(pilot, lambda: len(table_keys(table)) == 2, 5, "two messages listed")
            # Filter by the Message-ID, typed (letters that are also view keys go to the input).
            await pilot.press("slash", *token)
            await pilot.press("enter")
            await until(pilot, lambda: table_keys(table) == [queue_id], 5, "the filtered list")
            assert queue_id in screen_text(app)
            await pilot.press("enter")
            assert isinstance(app.screen, MessageDetailScreen)
            trace = app.screen.query_one(VerdictTrace)
            await until(pilot, lambda: bool(trace.trace), 5, "the verdict trace")
            await settle(pilot)
            text = screen_text(app)
            assert "Verdict trace" in text and "RELAY_GUARDED_DOMAIN" in text, text
            assert "QUEUED" in [v["symbol"] for v in trace.trace]        # further down the trace
            assert queue_id in text and "deferred" in text
            # No: nothing happens.
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            await settle(pilot)
            assert isinstance(app.screen, MessageDetailScreen)
            assert gateway.query("SELECT id FROM messages WHERE id = ?", queue_id)
            # Yes: gone from the store, back on the list, which no longer shows it.
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmScreen)
            assert queue_id in screen_text(app)
            await pilot.press("y")
            await until(pilot, lambda: isinstance(app.screen, QueueScreen), 5, "back to the list")
            await until(pilot, lambda: table_keys(app.screen.query_one(MessageTable)) == [], 5,
                        "the deleted message to leave the list")
        assert gateway.query("SELECT id FROM messages WHERE id = ?", queue_id) == []
        assert gateway.query("SELECT count(*) AS n FROM message_bodies WHERE message_id = ?", queue_id)[0]["n"] == 0
        assert len(gateway.query("SELECT id FROM messages")) == 1     # the other one is untouched

    asyncio.run(scenario())


def test_quarantined_message_listed_with_its_reason_and_released_after_confirmation(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    # Below any score: everything for example.test is kept back.
    gateway.cli("config", "set", "--domain", "example.test", "--", "actions.quarantine", "-1")
    gateway.start()
    send(gateway, "<held@client.test>", sender="mallory@sender.test")
    gateway.wait_until(lambda: gateway.query("SELECT state FROM messages WHERE state = 'quarantine'"),
                       what="the message in quarantine")
    queue_id = gateway.query("SELECT id FROM messages")[0]["id"]

    async def scenario():
        app = MailboxGuardApp(gateway.home)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.live.running is True, 10, "the engine")
            await pilot.press("q")                      # not in the queue's list
            table = app.screen.query_one(MessageTable)
            await settle(pilot)
            assert queue_id not in table_keys(table)
            await pilot.press("u")
            table = app.screen.query_one(QuarantineTable)
            await until(pilot, lambda: table_keys(table) == [queue_id], 5, "the quarantined message")
            await settle(pilot)
            text = screen_text(app)
            assert "mallory@sender.te" in text and "reason score 0 (reject 15, quarantine -1" in text, text
            await pilot.press("enter")
            trace = app.screen.query_one(VerdictTrace)
            await until(pilot, lambda: bool(trace.trace), 5, "the verdict trace")
            await settle(pilot)
            text = screen_text(app)
            assert "Quarantined" in text and "OUTCOME_QUARANTINE" in text and "HELO client.test, no TLS" in text, text
            await pilot.press("h")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
            await settle(pilot)
            assert gateway.query("SELECT state FROM messages")[0]["state"] == "quarantine"
            await pilot.press("h", "y")
            await until(pilot, lambda: bool(sink.messages), 10, "the released message delivered")
        assert [m.rcpt_tos for m in sink.messages] == [["bob@example.test"]]
        assert gateway.query("SELECT symbol FROM verdicts WHERE message_id = ? AND check_name = 'admin'",
                             queue_id) == [{"symbol": "RELEASED_FROM_QUARANTINE"}]

    asyncio.run(scenario())


def insert_ban(gateway, kind: str, key: str, until: float, failures: int = 10) -> None:
    conn = gateway.db()
    try:
        conn.execute("INSERT INTO auth_bans (kind, key, until, failures, created_at) VALUES (?, ?, ?, ?, ?)",
                     (kind, key, until, failures, time.time()))
        conn.commit()
    finally:
        conn.close()


def test_ban_shows_within_2s_and_is_lifted_with_confirmation(gateway):
    gateway.start()

    async def scenario():
        app = MailboxGuardApp(gateway.home)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.live.running is True, 10, "the engine")
            await pilot.press("b")
            assert isinstance(app.screen, BansScreen)
            table = app.screen.query_one(BanTable)
            await settle(pilot)
            assert table_keys(table) == [] and "No bans in force" in screen_text(app)
            await asyncio.to_thread(insert_ban, gateway, "ip", "192.0.2.7", time.time() + 3600)
            took = await until(pilot, lambda: table_keys(table) == ["ip:192.0.2.7"], 2.0, "the ban listed")
            assert took <= 2.0
            await settle(pilot)
            text = screen_text(app)
            assert "192.0.2.7" in text and " 10 " in text and ("59m" in text or "1h00m" in text), text
            # No: nothing happens.
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmScreen)
            assert "192.0.2.7" in screen_text(app)
            await pilot.press("n")
            await settle(pilot)
            assert isinstance(app.screen, BansScreen)
            assert len(gateway.query("SELECT * FROM auth_bans")) == 1
            # Yes (with the other key): lifted in the store, and gone from the list.
            await pilot.press("delete")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: table_keys(table) == [], 5, "the lifted ban to leave the list")
        assert gateway.query("SELECT * FROM auth_bans") == []

    asyncio.run(scenario())


def test_engine_not_running_shows_it_lists_the_store_and_retries(gateway):
    gateway.policy().add_domain("example.test", "127.0.0.1:9")
    gateway.configure(queue__retry_schedule="1h")
    gateway.start()
    send(gateway, "<stored@client.test>", sender="carol@sender.test")
    gateway.wait_until(lambda: gateway.query("SELECT state FROM messages")[0]["state"] == "deferred",
                       what="the message deferred")
    queue_id = gateway.query("SELECT id FROM messages")[0]["id"]
    gateway.stop()
    insert_ban(gateway, "user", "mallory@example.test", time.time() + 3600, failures=7)
    insert_ban(gateway, "ip", "192.0.2.99", time.time() - 60)         # ran out: not shown

    async def scenario():
        app = MailboxGuardApp(gateway.home, retry_interval=0.5)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.live.running is False, 5, "the not-running state")
            await settle(pilot)
            text = screen_text(app)
            assert NOT_RUNNING in text and "deferred 1" in text, text
            await pilot.press("q")
            table = app.screen.query_one(MessageTable)
            await until(pilot, lambda: table_keys(table) == [queue_id], 5, "the queue from the store")
            await settle(pilot)
            text = screen_text(app)
            assert NOT_RUNNING in text and "carol@sender.test" in text and "from the store" in text, text
            # The detail (with its trace) is read from the store too.
            await pilot.press("enter")
            trace = app.screen.query_one(VerdictTrace)
            await until(pilot, lambda: bool(trace.trace), 5, "the verdict trace from the store")
            # Actions need the engine, and say so.
            await pilot.press("x", "y")
            await settle(pilot)
            assert gateway.query("SELECT id FROM messages WHERE id = ?", queue_id)
            await pilot.press("escape")
            # The bans in force are read from the store too; unban refuses at once.
            await pilot.press("b")
            table = app.screen.query_one(BanTable)
            await until(pilot, lambda: table_keys(table) == ["user:mallory@example.test"], 5,
                        "the bans from the store")
            await settle(pilot)
            text = screen_text(app)
            assert "mallory@example.test" in text and "192.0.2.99" not in text and "from the store" in text, text
            await pilot.press("x")
            await settle(pilot)
            assert isinstance(app.screen, BansScreen)
            assert any("unban needs it" in n.message for n in app._notifications)
            assert len(gateway.query("SELECT * FROM auth_bans")) == 2
            # The engine comes back; r reconnects at once.
            await asyncio.to_thread(gateway.start)
            await pilot.press("r")
            await until(pilot, lambda: app.live.running is True, 5, "the engine again")
            await settle(pilot)
            assert NOT_RUNNING not in screen_text(app)
            assert "engine up" in str(app.screen.query_one(EngineBanner).render())

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- snapshots
FROZEN = 1_900_000_000.0          # a fixed "now"; every time below is relative to it


def frozen_clock() -> float:
    return FROZEN


def _rates(pattern: list[int]) -> list[int]:
    return (pattern * 30)[:30]


class FrozenSource(Source):
    """The same data every time: a busy little gateway, frozen at FROZEN."""

    def __init__(self, running: bool = True) -> None:
        self.home = Path("/var/lib/mailbox-guard")
        self.running = running
        self.actions: list[tuple[str, dict]] = []
        self.rows = [
            {"id": "1BA5E0F4C00000000A1", "state": "deferred", "mail_from": "alice@sender.test",
             "message_id": "<a1@sender.test>", "size": 2345, "received_at": FROZEN - 754,
             "next_attempt": FROZEN + 300, "attempts": 2, "last_error": "4.4.1 connection refused by 192.0.2.7",
             "recipients": "bob@example.test"},
            {"id": "1BA5E0F0000000000A0", "state": "hold", "mail_from": "",
             "message_id": None, "size": 812, "received_at": FROZEN - 7300, "next_attempt": FROZEN - 7300,
             "attempts": 0, "last_error": None, "recipients": "postmaster@example.test, abuse@example.test"},
            {"id": "1BA5E0EC000000000F9", "state": "incoming", "mail_from": "[red]not-markup[/]@evil.test",
             "message_id": "<x@evil.test>", "size": 120000, "received_at": FROZEN - 3,
             "next_attempt": FROZEN - 3, "attempts": 0, "last_error": None, "recipients": "carol@example.test"},
            {"id": "1BA5E0E8000000000Q1", "state": "quarantine", "mail_from": "promo@bulk.test",
             "message_id": "<q1@bulk.test>", "size": 5120, "received_at": FROZEN - 1800,
             "next_attempt": FROZEN - 1800, "attempts": 0, "last_error": None, "recipients": "dave@example.test",
             "reason": "score 12.5 >= actions.quarantine 10 (\x07[b]bulk[/b])"},
        ]
        self.ban_rows = [
            {"kind": "ip", "key": "192.0.2.7", "until": FROZEN + 3541, "failures": 10, "created_at": FROZEN - 59},
            {"kind": "user", "key": "[red]root[/]@example.test", "until": FROZEN + 125, "failures": 5,
             "created_at": FROZEN - 3475},
            {"kind": "ip", "key": "2001:db8::bad", "until": FROZEN + 93784, "failures": 20,
             "created_at": FROZEN - 816},
            {"kind": "user", "key": "gone@example.test", "until": FROZEN - 1, "failures": 5,
             "created_at": FROZEN - 3601},                       # ran out: never listed
        ]

    def _engine(self) -> None:
        if not self.running:
            raise EngineNotRunning("no engine is running with home /var/lib/mailbox-guard")

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in queue_states.ALL}
        for r in self.rows:
            out[r["state"]] += 1
        out["delivered"] = 41
        return out

    async def status(self) -> dict:
        self._engine()
        return {"version": "0.1.0", "pid": 4242, "home": str(self.home), "uptime": 3723.4,
                "started_at": FROZEN - 3723.4, "draining": False, "policy_version": 7,
                "listeners": [{"name": "inbound", "kind": "inbound", "host": "0.0.0.0", "port": 25},
                              {"name": "submission", "kind": "submission", "host": "0.0.0.0", "port": 587}],
                "connections": 2, "queue": self.counts(),
                "totals": {"accepted": 44, "rejected": 17, "delivered": 41}}

    async def connections(self) -> list[dict]:
        self._engine()
        return [
            {"id": "C0FFEE01", "listener": "inbound", "kind": "inbound", "peer_ip": "198.51.100.23",
             "peer_port": 40123, "helo": "mail.sender.test", "user": None, "tls": {"version": "TLSv1.3"},
             "phase": "rcpt", "started_at": FROZEN - 12, "age": 12.3, "messages": 1, "rejected": 0,
             "mail_from": "alice@sender.test", "recipients": 2},
            {"id": "C0FFEE02", "listener": "submission", "kind": "submission", "peer_ip": "2001:db8::5",
             "peer_port": 51000, "helo": "[bad helo]\x07", "user": "dave", "tls": None,
             "phase": "helo", "started_at": FROZEN - 200, "age": 200.0, "messages": 0, "rejected": 1,
             "mail_from": None, "recipients": 0},
        ]

    async def stats(self, minutes: int = 30) -> dict:
        self._engine()
        return {"since": FROZEN - 3723.4, "totals": {"accepted": 44, "rejected": 17, "delivered": 41},
                "per_minute": {"accepted": _rates([0, 1, 3, 2, 0, 5]), "rejected": _rates([0, 0, 1, 0, 0, 0]),
                               "deferred": [0] * 30, "delivered": _rates([1]), "bounced": [0] * 30,
                               "tempfailed": [0] * 30},
                "top_senders": [["sender.test", 20], ["example.org", 9], ["<>", 3]],
                "top_rejecting_checks": [["rcpt_relay:RELAY_NOT_GUARDED", 12], ["helo:HELO_INVALID", 5]],
                "delivery_p50_ms": 12.5, "commit_p50_ms": 1.2}

    async def events(self, topics: list[str] | None = None) -> AsyncIterator[dict]:
        self._engine()
        for event in [
            {"seq": 1, "at": FROZEN - 20, "topic": "connection", "action": "opened", "id": "C0FFEE01",
             "listener": "inbound", "peer_ip": "198.51.100.23", "peer_port": 40123},
            {"seq": 2, "at": FROZEN - 15, "topic": "reject", "connection": "C0FFEE02", "peer_ip": "2001:db8::5",
             "phase": "rcpt", "subject": "x@other.test", "check": "rcpt_relay", "symbol": "RELAY_NOT_GUARDED",
             "reply": "554 5.7.1 Relay access denied"},
            {"seq": 3, "at": FROZEN - 10, "topic": "message", "id": "1BA5E0EC000000000F9",
             "mail_from": "[red]not-markup[/]@evil.test", "recipients": ["carol@example.test"], "size": 120000},
            {"seq": 4, "at": FROZEN - 5, "topic": "delivery", "id": "1BA5E0F4C00000000A1",
             "recipient": "bob@example.test", "outcome": "deferred", "remote": "192.0.2.7:25",
             "reply": "4.4.1 connection refused", "dropped": 3},
            {"seq": 5, "at": FROZEN - 1, "topic": "connection", "action": "closed", "id": "C0FFEE03",
             "messages": 1, "rejected": 0},
        ]:
            yield event
        await asyncio.Event().wait()

    async def action(self, method: str, **params: Any) -> Any:
        self._engine()
        self.actions.append((method, params))
        if method == "queue.delete":
            self.rows = [r for r in self.rows if r["id"] != params["id"]]
        if method == "queue.release":
            self.rows = [dict(r, state="deferred") if r["id"] == params["id"] else r for r in self.rows]
        if method == "auth.unban":
            if not any(r["key"] == params["id"] for r in self.ban_rows):
                raise ControlCallError("not_found", f"no ban for {params['id']}")
            self.ban_rows = [r for r in self.ban_rows if r["key"] != params["id"]]
            return {"unbanned": params["id"]}
        return {"ok": True}

    async def store_counts(self) -> dict[str, int]:
        return self.counts()

    def _in_force(self, now: float) -> list[dict]:
        return sorted((dict(r) for r in self.ban_rows if r["until"] > now), key=lambda r: -r["until"])

    async def bans(self) -> list[dict]:
        self._engine()
        return self._in_force(FROZEN)

    async def store_bans(self, now: float) -> list[dict]:
        return self._in_force(now)

    async def list_messages(self, kind: str, *, states=None, search: str = "", limit: int = 500) -> MessagePage:
        wanted = [s for s in (states or KINDS[kind].states) if s in KINDS[kind].states]
        rows = [r for r in self.rows if r["state"] in wanted and search in str(r)]
        return MessagePage(rows, "engine" if self.running else "store", KINDS[kind].empty_note)

    async def show_message(self, kind: str, key: str) -> dict | None:
        row = next((r for r in self.rows if r["id"] == key), None)
        if row is None:
            return None
        return {"helo": "mail.sender.test", "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384", "auth_user": None, "reason": None,
                **row, "connection_id": "C0FFEE00", "listener": "inbound", "client_ip": "198.51.100.23",
                "recipients": [{"recipient": "bob@example.test", "domain": "example.test", "state": "pending",
                                "attempts": 2, "last_reply": "4.4.1 connection refused", "remote": "192.0.2.7:25"}],
                "deliveries": [{"at": FROZEN - 700, "recipient": "bob@example.test", "outcome": "deferred",
                                "remote": "192.0.2.7:25", "reply": "4.4.1 connection refused"}],
                "headers": "Received: from mail.sender.test ([198.51.100.23])\r\n\tby gw.test (mailbox_guard)"
                           "\r\nFrom: <alice@sender.test>\r\nSubject: [bold]quarterly[/bold] report\r\n"
                           "Message-ID: <a1@sender.test>",
                "trace": [
                    {"seq": 1, "at": FROZEN - 760, "phase": "connect", "subject": "198.51.100.23",
                     "check": "access", "symbol": "ACCESS_DEFAULT", "score": 0.0, "action": "accept",
                     "reply": None, "detail": ""},
                    {"seq": 2, "at": FROZEN - 758, "phase": "rcpt", "subject": "bob@example.test",
                     "check": "rcpt_relay", "symbol": "RELAY_GUARDED_DOMAIN", "score": 0.0, "action": "accept",
                     "reply": None, "detail": "example.test"},
                    {"seq": 3, "at": FROZEN - 755, "phase": "data", "subject": "", "check": "queue",
                     "symbol": "QUEUED", "score": 0.0, "action": "accept", "reply": None, "detail": ""}]}


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("TUI_SNAPSHOT_UPDATE"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"no snapshot {path}; run with TUI_SNAPSHOT_UPDATE=1 and review it"
    expected = path.read_text()
    if text != expected:
        diff = "\n".join(f"{i:2} - {a}\n{i:2} + {b}" for i, (a, b) in
                         enumerate(zip(expected.splitlines(), text.splitlines())) if a != b)
        raise AssertionError(f"screen differs from {path.name}:\n{diff}\n--- now ---\n{text}")


async def _snap(name: str, *keys: str, running: bool = True) -> FrozenSource:
    source = FrozenSource(running)
    app = MailboxGuardApp(source.home, source=source, clock=frozen_clock, interval=3600, retry_interval=3600)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.live.running is running and app.events_seen >= (6 if running else 1),
                    5, "the frozen feed")
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)
        text = screen_text(app)
        assert app.size == SIZE
        check_snapshot(name, text)
    return source


SNAPSHOT_CASES = {
    "dashboard": (),
    "dashboard_engine_down": (),
    "connections": ("c",),
    "connections_kill_confirm": ("c", "k"),
    "queue": ("q",),
    "queue_engine_down": ("q",),
    "queue_filtered_by_state": ("q", "s", "s", "s"),
    "message_detail": ("q", "enter"),
    "message_delete_confirm": ("q", "enter", "x"),
    "quarantine": ("u",),
    "quarantine_detail": ("u", "enter"),
    "quarantine_release_confirm": ("u", "h"),
    "events": ("e",),
    "help": ("question_mark",),
    "bans": ("b",),
    "bans_engine_down": ("b",),
    "bans_unban_confirm": ("b", "down", "x"),
}


@pytest.mark.parametrize("name", sorted(SNAPSHOT_CASES))
def test_snapshot(name, utc):
    asyncio.run(_snap(name, *SNAPSHOT_CASES[name], running=not name.endswith("_engine_down")))


def test_snapshot_files_are_all_used():
    stored = {p.stem for p in SNAPSHOTS.glob("*.txt")}
    assert stored == set(SNAPSHOT_CASES)


# ----------------------------------------------------------------------------- keys and modals (frozen)
def test_kill_asks_first_and_only_yes_kills(utc):
    async def scenario():
        source = FrozenSource()
        app = MailboxGuardApp(source.home, source=source, clock=frozen_clock, interval=3600)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.live.running is True, 5, "the frozen feed")
            await pilot.press("c")
            await settle(pilot)
            await pilot.press("k")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("escape")
            await settle(pilot)
            assert source.actions == []
            await pilot.press("down", "k", "enter")      # enter is on Cancel: a reflex does not kill
            await settle(pilot)
            assert source.actions == []
            await pilot.press("k", "y")
            await settle(pilot)
            assert source.actions == [("connections.kill", {"id": "C0FFEE01"})]   # the one moved to

    asyncio.run(scenario())


def test_queue_keys_retry_hold_release_and_help(utc):
    async def scenario():
        source = FrozenSource()
        app = MailboxGuardApp(source.home, source=source, clock=frozen_clock, interval=3600)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.live.running is True, 5, "the frozen feed")
            await pilot.press("q")
            await settle(pilot)
            await pilot.press("R", "h", "down", "h")
            await settle(pilot)
            assert source.actions == [("queue.retry", {"id": "1BA5E0F4C00000000A1"}),
                                      ("queue.hold", {"id": "1BA5E0F4C00000000A1"}),
                                      ("queue.release", {"id": "1BA5E0F0000000000A0"})]
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press("escape")
            assert isinstance(app.screen, QueueScreen)
            # The quarantine offers no retry (it has no such action).
            await pilot.press("u")
            await settle(pilot)
            assert app.screen.check_action("retry_message", ()) is False
            # Markup in a sender is shown as text, not obeyed.
            await pilot.press("q")
            await settle(pilot)
            assert "[red]not-markup[/" in screen_text(app)

    asyncio.run(scenario())


def test_quarantine_lists_reasons_and_release_asks_first(utc):
    async def scenario():
        source = FrozenSource()
        app = MailboxGuardApp(source.home, source=source, clock=frozen_clock, interval=3600)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.live.running is True, 5, "the frozen feed")
            await pilot.press("q")
            await settle(pilot)
            # The queue's "all" is not the quarantine; the quarantine is only that.
            assert "1BA5E0E8000000000Q1" not in table_keys(app.screen.query_one(MessageTable))
            await pilot.press("u")
            await settle(pilot)
            table = app.screen.query_one(QuarantineTable)
            assert table_keys(table) == ["1BA5E0E8000000000Q1"]
            assert "score 12.5 >= actions.quarantine 10 (?[b]bulk[/b])" in screen_text(app)   # as text
            # Release asks: no, escape and a reflexive enter do nothing.
            await pilot.press("h")
            assert isinstance(app.screen, ConfirmScreen) and "The policy kept it back" in screen_text(app)
            await pilot.press("n")
            await pilot.press("h", "escape", "h", "enter")
            await settle(pilot)
            assert source.actions == []
            # Delete asks too; then yes releases, through the queue's own method.
            await pilot.press("x", "n")
            await settle(pilot)
            assert source.actions == []
            await pilot.press("h", "y")
            await settle(pilot)
            assert source.actions == [("queue.release", {"id": "1BA5E0E8000000000Q1"})]
            await until(pilot, lambda: table_keys(table) == [], 5, "the released message to leave the list")
            assert "Nothing is in quarantine" in screen_text(app)
            # Back in the queue, deferred and due.
            await pilot.press("q")
            await settle(pilot)
            assert "1BA5E0E8000000000Q1" in table_keys(app.screen.query_one(MessageTable))

    asyncio.run(scenario())


def test_unban_asks_first_only_yes_unbans_and_needs_the_engine(utc):
    async def scenario():
        source = FrozenSource()
        app = MailboxGuardApp(source.home, source=source, clock=frozen_clock, interval=3600, retry_interval=3600)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.live.running is True, 5, "the frozen feed")
            await pilot.press("b")
            await settle(pilot)
            table = app.screen.query_one(BanTable)
            assert table_keys(table) == ["ip:2001:db8::bad", "ip:192.0.2.7", "user:[red]root[/]@example.test"]
            await pilot.press("x")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("escape")
            await pilot.press("down", "down", "delete", "enter")   # enter is on Cancel
            await settle(pilot)
            assert source.actions == []
            await pilot.press("x", "y")
            await settle(pilot)
            assert source.actions == [("auth.unban", {"id": "[red]root[/]@example.test"})]   # the one moved to
            await until(pilot, lambda: len(table_keys(table)) == 2, 5, "the lifted ban to leave the list")
            assert "[red]root[/]@example.test unbanned." in [n.message for n in app._notifications]
            # Lifted meanwhile (by the CLI): said plainly.
            table.move_cursor(row=table_keys(table).index("ip:192.0.2.7"), animate=False)
            source.ban_rows = [r for r in source.ban_rows if r["key"] != "192.0.2.7"]
            await pilot.press("x", "y")
            await settle(pilot)
            assert any("No ban for 192.0.2.7 any more" in n.message for n in app._notifications)
            # With the engine down, unban refuses at once, without asking.
            source.running = False
            app.feed.retry_now()
            await until(pilot, lambda: app.live.running is False, 5, "the engine down")
            await settle(pilot)
            assert table_keys(table) == ["ip:2001:db8::bad"]
            before = len(source.actions)
            await pilot.press("x")
            await settle(pilot)
            assert isinstance(app.screen, BansScreen) and len(source.actions) == before
            assert any("unban needs it" in n.message for n in app._notifications)

    asyncio.run(scenario())


def test_feed_coalesces_while_the_app_is_busy():
    from tui.feed import LiveFeed
    from tui.messages import FeedUpdate

    class Target:
        def __init__(self):
            self.posted = []

        def post_message(self, message):
            self.posted.append(message)

    target = Target()
    feed = LiveFeed(target, FrozenSource())
    feed.state = LiveState(running=True)
    feed._events = [{"topic": "message", "seq": 1}]
    feed._publish()
    feed.state = LiveState(running=False, reason="gone")
    feed._events = [{"topic": "message", "seq": 2}]
    feed._publish()
    assert len(target.posted) == 1 and isinstance(target.posted[0], FeedUpdate)
    assert target.posted[0].state.running is False and [e["seq"] for e in target.posted[0].events] == [1, 2]
    target.posted[0].taken = True
    feed._publish()
    assert len(target.posted) == 2
