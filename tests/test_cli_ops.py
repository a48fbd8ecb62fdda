"""Operator commands against a real engine, run as an admin runs them (subprocess):
refused commands found by `rejects` and `messages why`, read-only commands on a home
that does not exist, the raw message, bulk queue actions, the per-domain summary, and
manual retries that leave the retry schedule alone."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime

from tests.conftest import ROOT, free_port, make_message


def mg(home, *args, input=None):
    return subprocess.run([sys.executable, "-m", "mailbox_guard", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, input=input)


def one_error_line(out, text):
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1 and text in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def refuse_two(gw) -> str:
    """One session: a relay-denied and an unknown-user RCPT; its connection id."""
    with gw.smtp() as s:
        s.ehlo()
        s.mail("alice@sender.test")
        assert s.rcpt("x@other.test")[0] == 554
        assert s.rcpt("nobody@example.test")[0] == 550
    gw.wait_until(lambda: gw.query("SELECT rejected FROM connections WHERE rejected = 2"), what="connection row")
    return gw.query("SELECT id FROM connections WHERE rejected = 2")[0]["id"]


def test_rejects_and_why_find_refused_recipients(gateway):
    gateway.policy().add_domain("example.test", "127.0.0.1:9")
    gateway.policy().add_recipient("alice@example.test")      # a recipient list: others get 550
    gateway.start()
    started = time.time()
    conn_id = refuse_two(gateway)
    ended = time.time()

    # Postfix's line, with the client address, for an admin's grep and fail2ban.
    log = gateway.log_with(f"to=<nobody@example.test> proto=ESMTP helo=<client.test> conn={conn_id}")
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 554 5.7.1 <x@other.test>: Relay access denied; "
            f"from=<alice@sender.test> to=<x@other.test> proto=ESMTP helo=<client.test> conn={conn_id}") in log
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 <nobody@example.test>: Recipient address "
            "rejected: User unknown; from=<alice@sender.test> to=<nobody@example.test> proto=ESMTP "
            f"helo=<client.test> conn={conn_id}\n") in log

    out = gateway.cli("rejects")
    assert "x@other.test" in out.stdout and "nobody@example.test" in out.stdout
    assert "rcpt_relay/RELAY_DENIED" in out.stdout and "rcpt_recipients/RCPT_UNKNOWN_USER" in out.stdout
    assert conn_id in out.stdout and "127.0.0.1" in out.stdout and "554 5.7.1" in out.stdout

    rows = json.loads(gateway.cli("rejects", "--json").stdout)
    assert [(r["recipient"], r["symbol"], r["reply"][:9], r["client"], r["connection"], r["phase"])
            for r in rows] == [
        ("nobody@example.test", "RCPT_UNKNOWN_USER", "550 5.1.1", "127.0.0.1", conn_id, "rcpt"),
        ("x@other.test", "RELAY_DENIED", "554 5.7.1", "127.0.0.1", conn_id, "rcpt")]
    # The time column: when each command was refused, local time to the second, the
    # same instant as --json's "at" (seconds since the epoch).
    assert all(started <= r["at"] <= ended for r in rows), (started, [r["at"] for r in rows], ended)
    header, *lines = out.stdout.splitlines()
    assert header.split()[:2] == ["TIME", "CONNECTION"] and len(lines) == 2
    for line, row in zip(lines, rows):
        shown = datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
        assert shown == datetime.fromtimestamp(row["at"]).replace(microsecond=0), (line, row["at"])
        assert line[19:].split()[:2] == [conn_id, "127.0.0.1"], line

    def recipients(*filters):
        return [r["recipient"] for r in json.loads(gateway.cli("rejects", "--json", *filters).stdout)]
    assert recipients("--check", "RELAY_DENIED") == ["x@other.test"]
    assert recipients("--check", "rcpt_recipients") == ["nobody@example.test"]
    assert recipients("--recipient", "@example.test") == ["nobody@example.test"]
    assert recipients("--recipient", "X@Other.test") == ["x@other.test"]
    assert recipients("--client", "127.0.0.1", "--since", "1h") == ["nobody@example.test", "x@other.test"]
    assert recipients("--client", "192.0.2.1") == []
    assert recipients("--limit", "1") == ["nobody@example.test"]
    one_error_line(gateway.cli("rejects", "--since", "soon", check=False), "not a duration")
    assert gateway.cli("rejects", "--client", "not-an-ip", check=False).returncode == 2

    # The connection's whole session, refusals included.
    why = gateway.cli("messages", "why", conn_id).stdout
    assert f"connection {conn_id} from 127.0.0.1" in why and "2 command(s) refused" in why
    assert "RELAY_DENIED" in why and "RCPT_UNKNOWN_USER" in why
    data = json.loads(gateway.cli("messages", "why", conn_id.lower(), "--json").stdout)
    assert data["kind"] == "connection" and data["id"] == conn_id and data["peer_ip"] == "127.0.0.1"
    assert {"RELAY_DENIED", "RCPT_UNKNOWN_USER"} <= {v["symbol"] for v in data["trace"]}

    # By recipient: the most recent of its messages and refusals, and how many matched.
    time.sleep(0.05)
    with gateway.smtp() as s:       # one refused, one accepted: the refusal is kept with the message
        refused = s.sendmail("carol@sender.test", ["nobody2@example.test", "alice@example.test"],
                             make_message(to="alice@example.test"))
    assert list(refused) == ["nobody2@example.test"]
    queue_id = gateway.query("SELECT id FROM messages")[0]["id"]
    [row] = json.loads(gateway.cli("rejects", "--json", "--recipient", "nobody2@example.test").stdout)
    assert (row["sender"], row["queue_id"], row["symbol"]) == ("carol@sender.test", queue_id, "RCPT_UNKNOWN_USER")
    data = json.loads(gateway.cli("messages", "why", "nobody2@example.test", "--json").stdout)
    assert data["kind"] == "message" and data["id"] == queue_id and data["matched"] == 1
    assert data["reject"]["recipient"] == "nobody2@example.test"
    why = gateway.cli("messages", "why", "nobody@example.test").stdout
    assert why.startswith("1 match(es): 0 message(s), 1 refused command(s); showing the most recent, the refusal")
    assert "RCPT_UNKNOWN_USER" in why
    data = json.loads(gateway.cli("messages", "why", "<nobody@example.test>", "--json").stdout)
    assert data["kind"] == "connection" and data["matched"] == 1 and data["id"] == conn_id
    assert data["reject"]["recipient"] == "nobody@example.test" and data["reject"]["reply"].startswith("550 5.1.1")
    data = json.loads(gateway.cli("messages", "why", "alice@example.test", "--json").stdout)
    assert data["kind"] == "message" and data["matched"] == 1
    assert "QUEUED" in [v["symbol"] for v in data["trace"]]
    one_error_line(gateway.cli("messages", "why", "nobody@nowhere.test", check=False), "nothing is known")


def test_rejects_show_the_sender_of_the_transaction(gateway):
    gateway.policy().add_domain("example.test", "127.0.0.1:9")
    gateway.policy().add_recipient("alice@example.test")
    gateway.start()
    refuse_two(gateway)
    with gateway.smtp() as s:       # a second transaction in one session: its own sender
        s.ehlo()
        s.mail("zed@sender.test")
        assert s.rcpt("y@other.test")[0] == 554
        s.rset()
        s.mail("alice@sender.test")
        s.rcpt("alice@example.test")
    gateway.wait_until(lambda: len(gateway.query("SELECT id FROM connections WHERE rejected > 0")) == 2,
                       what="second connection")
    rows = json.loads(gateway.cli("rejects", "--json").stdout)
    assert [(r["sender"], r["recipient"]) for r in rows] == [
        ("zed@sender.test", "y@other.test"), ("alice@sender.test", "nobody@example.test"),
        ("alice@sender.test", "x@other.test")]
    rows = json.loads(gateway.cli("rejects", "--json", "--sender", "zed@sender.test").stdout)
    assert [r["recipient"] for r in rows] == ["y@other.test"]
    why = gateway.cli("messages", "why", "zed@sender.test").stdout
    assert why.startswith("1 match(es)") and "y@other.test" in why


def test_read_only_commands_do_not_create_a_home(tmp_path):
    home = tmp_path / "typo"
    for args in (["status"], ["status", "--json"], ["domains", "list"], ["queue", "list"], ["rejects"],
                 ["queue", "summary"], ["queue", "show", "X"], ["messages", "why", "a@b.test"],
                 ["config", "show"], ["config", "export"], ["networks", "list"], ["users", "list"],
                 ["recipients", "list"], ["listeners", "list"], ["auth", "bans"], ["users", "policy"], ["tls", "show"],
                 ["queue", "delete", "X", "--yes"], ["queue", "flush"]):
        out = mg(home, *args)
        one_error_line(out, f"no mailbox-guard home at {home} (use --home, or start it with `serve`)")
        assert not home.exists(), args
    assert mg(home, "domains", "add", "example.test").returncode == 0    # a policy edit creates it
    assert json.loads(mg(home, "domains", "list", "--json").stdout) == [
        {"name": "example.test", "next_hop": None}]


# Edits that can only change what is there already: on a home that does not exist
# they would fail anyway, so they fail saying why, and make nothing.
EDITS_OF_WHAT_EXISTS = [
    (["recipients", "remove", "bob@example.test"], None), (["recipients", "add", "bob@example.test"], None),
    (["recipients", "import", "-"], "bob@example.test\n"), (["networks", "remove", "10.0.0.0/8"], None),
    (["domains", "remove", "example.test", "--yes"], None),
    (["domains", "set", "example.test", "--anti-impersonation", "off"], None),
    (["listeners", "remove", "mx"], None), (["config", "unset", "actions.reject"], None),
    (["config", "unset", "actions.reject", "--domain", "example.test"], None),
    (["config", "set", "actions.reject", "10", "--domain", "example.test"], None),
    (["config", "set", "actions.reject", "10", "--user", "bob@example.test"], None),
    (["checks", "reset", "rcpt_recipients"], None),
    (["checks", "mode", "rcpt_recipients", "warn", "--domain", "example.test"], None),
    (["auth", "unban", "192.0.2.7"], None), (["users", "remove", "alice@example.test"], None),
    (["users", "unalias", "sales@example.test"], None), (["users", "disable", "alice@example.test"], None),
    (["users", "enable", "alice@example.test"], None),
    (["users", "alias", "alice@example.test", "sales@example.test"], None),
    (["users", "add", "alice@example.test", "--password-stdin"], "Corr3ct-Horse-Battery\n"),
    (["users", "passwd", "alice@example.test", "--password-stdin"], "Corr3ct-Horse-Battery\n"),
    (["users", "mechanism", "example.test", "CRAM-MD5", "on"], None),
    (["users", "policy", "--domain", "example.test", "--min-length", "14"], None)]


def test_edits_of_what_exists_do_not_create_a_home(tmp_path):
    home = tmp_path / "typo" / "deeper"
    for args, stdin in EDITS_OF_WHAT_EXISTS:
        out = mg(home, *args, input=stdin)
        one_error_line(out, f"no mailbox-guard home at {home} (use --home, or start it with `serve`)")
        assert out.stdout == "", (args, out.stdout)
        assert not home.parent.exists(), args
    # The same edits that create something do make the home (the server's own values).
    for args in (["config", "set", "actions.reject", "10"], ["checks", "mode", "rcpt_recipients", "warn"]):
        assert mg(home, *args).returncode == 0, args
    assert mg(home, "config", "get", "actions.reject").stdout.strip() == "10"
    # On a home that exists the same edits answer as before (here: nothing to remove).
    assert "is not a trusted network" in mg(home, "networks", "remove", "10.0.0.0/8").stderr
    assert mg(home, "auth", "unban", "192.0.2.7").stderr.strip() == "mailbox-guard: no ban for 192.0.2.7"


def test_the_commands_named_to_need_a_home_exist():
    """A misspelt name in those sets would quietly let its command create a home."""
    from cli.common import EXISTING_ONLY_COMMANDS, READ_ONLY_COMMANDS
    from tests.test_cli_all import leaf_commands
    commands = leaf_commands()
    assert READ_ONLY_COMMANDS <= commands, READ_ONLY_COMMANDS - commands
    assert EXISTING_ONLY_COMMANDS <= commands, EXISTING_ONLY_COMMANDS - commands
    assert {" ".join(args[:2]) for args, _ in EDITS_OF_WHAT_EXISTS} >= EXISTING_ONLY_COMMANDS


def test_version():
    out = subprocess.run([sys.executable, "-m", "mailbox_guard", "--version"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    from mailbox_guard import __version__
    assert out.returncode == 0 and out.stdout == f"mailbox-guard {__version__}\n"


def deferred(gw, n):
    gw.wait_until(lambda: len(gw.query("SELECT id FROM messages WHERE state = 'deferred'")) == n,
                  what=f"{n} deferred")


def test_raw_message_and_body(gateway):
    gateway.configure(**{"queue.retry_schedule": "1h"})
    gateway.policy().add_domain("example.test", "127.0.0.1:9")
    gateway.start()
    original = make_message(subject="raw", body="line one\r\n.dot\r\n", message_id="<raw-1@client.test>")
    with gateway.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test"], original)
    deferred(gateway, 1)
    queue_id = gateway.query("SELECT id FROM messages")[0]["id"]
    raw = subprocess.run([sys.executable, "-m", "mailbox_guard", "queue", "show", queue_id, "--raw"],
                         env=gateway.env, capture_output=True, timeout=60, cwd=ROOT)
    assert raw.returncode == 0
    assert raw.stdout.startswith(b"Received: from client.test ([127.0.0.1])") and raw.stdout.endswith(original)
    body = subprocess.run([sys.executable, "-m", "mailbox_guard", "queue", "show", "<raw-1@client.test>",
                           "--body"], env=gateway.env, capture_output=True, timeout=60, cwd=ROOT)
    assert body.stdout == b"line one\r\n.dot\r\n"
    assert gateway.cli("queue", "show", queue_id, "--raw", "--json", check=False).returncode == 2
    one_error_line(gateway.cli("queue", "show", "NOSUCH", "--raw", check=False), "no message NOSUCH")


def test_bulk_actions_summary_and_delete_of_many(gateway):
    gateway.configure(**{"queue.retry_schedule": "1h"})
    for domain in ("a.test", "b.test"):
        gateway.policy().add_domain(domain, "127.0.0.1:9")
    gateway.start()
    with gateway.smtp() as s:
        for to in ("u1@a.test", "u2@a.test", "u3@b.test"):
            s.sendmail("alice@sender.test", [to], make_message(to=to))
        s.sendmail("alice@sender.test", ["u4@a.test", "u5@a.test"], make_message())
    deferred(gateway, 4)
    rows = json.loads(gateway.cli("queue", "summary", "--json").stdout)
    assert [(r["domain"], r["messages"], r["recipients"]) for r in rows] == [("a.test", 3, 4), ("b.test", 1, 1)]
    assert all(0 <= r["oldest_age_seconds"] < 60 for r in rows)
    text = gateway.cli("queue", "summary").stdout
    assert text.splitlines()[0].split() == ["DOMAIN", "MESSAGES", "RECIPIENTS", "OLDEST"]
    assert "a.test" in text and "second" in text

    def states():
        return {r["state"]: r["n"] for r in gateway.query("SELECT state, count(*) AS n FROM messages GROUP BY state")}
    assert gateway.cli("queue", "hold", "--all", "--to-domain", "A.test").stdout.strip() == "3 message(s) on hold"
    assert states() == {"hold": 3, "deferred": 1}
    one_error_line(gateway.cli("queue", "release", "--all", "--state", "deferred", check=False),
                   "release applies to hold or quarantine messages, not deferred ones")
    assert gateway.cli("queue", "release", "--all").stdout.strip() == "3 message(s) released"
    gateway.wait_until(lambda: states() == {"deferred": 4}, what="released and deferred again")
    for argv in (["queue", "hold"], ["queue", "hold", "X", "--all"], ["queue", "hold", "X", "--state", "hold"],
                 ["queue", "delete", "--all", "--state", "nonsense"]):
        assert gateway.cli(*argv, check=False).returncode == 2, argv

    # Delete asks first on a terminal and does nothing on "no".
    from tests.test_cli_policy import on_terminal
    code, seen = on_terminal(gateway.home, "queue", "delete", "--all", "--to-domain", "b.test", answer="n")
    assert code == 1 and "delete 1 message(s) without a bounce?" in seen
    assert states() == {"deferred": 4}
    code, seen = on_terminal(gateway.home, "queue", "delete", "--all", "--state", "deferred",
                             "--to-domain", "b.test", answer="y")
    assert code == 0 and "1 message(s) deleted" in seen and states() == {"deferred": 3}

    # Several ids: every known one is deleted, every unknown one reported, exit 1.
    a, b = [r["id"] for r in gateway.query("SELECT id FROM messages ORDER BY id LIMIT 2")]
    out = gateway.cli("queue", "delete", a, "NOSUCH1", b.lower(), "NOSUCH2", "--yes", check=False)
    assert out.returncode == 1 and out.stdout.splitlines() == [f"{a}: deleted", f"{b}: deleted"]
    assert out.stderr.splitlines() == ["mailbox-guard: no message NOSUCH1 in the queue",
                                       "mailbox-guard: no message NOSUCH2 in the queue"]
    assert states() == {"deferred": 1}

    # The same while the engine is stopped: straight on the store.
    gateway.stop()
    assert gateway.cli("queue", "hold", "--all").stdout.strip() == "1 message(s) on hold"
    assert gateway.cli("queue", "delete", "--all", "--yes").stdout.strip() == "1 message(s) deleted"
    assert states() == {}


def test_manual_retry_does_not_use_up_the_schedule(gateway):
    gateway.configure(**{"queue.retry_schedule": "10m,1h"})
    port = free_port()              # nothing listens: connection refused
    gateway.policy().add_domain("example.test", f"127.0.0.1:{port}")
    gateway.start()
    with gateway.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test"], make_message())
    deferred(gateway, 1)

    def row():
        return gateway.query("SELECT id, attempts, next_attempt, last_error, "
                             "(SELECT max(at) FROM delivery_log) AS last, "
                             "(SELECT count(*) FROM delivery_log) AS tries FROM messages")[0]
    first = row()
    assert first["attempts"] == 1 and 590 < first["next_attempt"] - first["last"] < 610
    assert first["last_error"] == f"4.4.1 connection refused by 127.0.0.1:{port}"
    for command, tries in ((["queue", "retry", first["id"]], 2), (["queue", "flush"], 3)):
        gateway.cli(*command)
        gateway.wait_until(lambda: row()["tries"] == tries and gateway.query(
            "SELECT state FROM messages")[0]["state"] == "deferred", what=f"attempt {tries}")
        now = row()
        assert now["attempts"] == 1, command              # the schedule's step is unchanged
        assert 590 < now["next_attempt"] - now["last"] < 610, command


def test_bulk_retry_does_not_use_up_the_schedule(gateway):
    gateway.configure(**{"queue.retry_schedule": "10m,1h"})
    port = free_port()              # nothing listens: connection refused
    for domain in ("a.test", "b.test"):
        gateway.policy().add_domain(domain, f"127.0.0.1:{port}")
    gateway.start()
    with gateway.smtp() as s:
        for to in ("u1@a.test", "u2@a.test", "u3@b.test"):
            s.sendmail("alice@sender.test", [to], make_message(to=to))
    deferred(gateway, 3)

    def rows() -> dict[str, dict]:
        """Recipient domain -> its messages' state, attempts, tries and next attempt."""
        out: dict[str, list] = {}
        for r in gateway.query(
                "SELECT m.state, m.attempts, m.next_attempt, (SELECT domain FROM message_recipients r "
                "WHERE r.message_id = m.id) AS domain, (SELECT count(*) FROM delivery_log l "
                "WHERE l.message_id = m.id) AS tries, (SELECT max(at) FROM delivery_log l "
                "WHERE l.message_id = m.id) AS last FROM messages m ORDER BY m.received_at"):
            out.setdefault(r.pop("domain"), []).append(r)
        return out

    def settled(tries: dict[str, int]) -> bool:
        now = rows()
        return all(r["tries"] == tries[d] and r["state"] == "deferred" for d in tries for r in now[d])

    def schedule_intact() -> None:
        for r in sum(rows().values(), []):
            assert r["attempts"] == 1, r                            # the schedule's step is unchanged
            assert 590 < r["next_attempt"] - r["last"] < 610, r     # still the first step, 10m

    schedule_intact()
    before_b = rows()["b.test"]
    out = gateway.cli("queue", "retry", "--all", "--to-domain", "A.test")
    assert out.stdout.strip() == "2 message(s) will be retried now"
    gateway.wait_until(lambda: settled({"a.test": 2}), what="a.test retried")
    time.sleep(0.3)
    assert rows()["b.test"] == before_b                            # not its domain: left alone
    schedule_intact()
    out = gateway.cli("queue", "retry", "--all", "--state", "deferred")
    assert out.stdout.strip() == "3 message(s) will be retried now"
    gateway.wait_until(lambda: settled({"a.test": 3, "b.test": 2}), what="all retried")
    schedule_intact()

    # The engine stopped: the same on the store, where "due now" can be seen as it is.
    gateway.stop()
    started = time.time()
    out = gateway.cli("queue", "retry", "--all", "--to-domain", "b.test")
    assert out.stdout.strip() == "1 message(s) will be retried now"
    now = rows()
    assert [started - 1 < r["next_attempt"] <= time.time() for r in now["b.test"]] == [True]
    assert [r["next_attempt"] - r["last"] > 590 for r in now["a.test"]] == [True, True]
    out = gateway.cli("queue", "retry", "--all", "--state", "deferred")
    assert out.stdout.strip() == "3 message(s) will be retried now"
    now = rows()
    assert all(started - 1 < r["next_attempt"] <= time.time() and r["attempts"] == 1 and r["state"] == "deferred"
               for r in sum(now.values(), [])), now


def test_status_warns_about_an_open_relay(gateway):
    gateway.policy()
    with gateway.db() as db:       # as an older version (without the --force check) let it in
        db.execute("INSERT INTO networks (cidr, comment, created_at) VALUES ('0.0.0.0/0', '', 0), "
                   "('10.0.0.0/8', '', 0)")
    out = gateway.cli("status", check=False)
    assert out.returncode == 1
    assert "WARNING: trusted network 0.0.0.0/0 lets much of the Internet relay" in out.stdout
    assert "10.0.0.0/8" not in out.stdout
    gateway.start()
    data = json.loads(gateway.cli("status", "--json").stdout)
    assert data["running"] and len(data["warnings"]) == 1 and "0.0.0.0/0" in data["warnings"][0]


def test_quarantine_is_listed_shown_never_delivered_then_released_or_deleted(gateway, sink):
    """Mail the policy keeps back (here: bob's own threshold, below any score) is in the
    queue in state quarantine with its reason and the session's facts; delivery never
    takes it; a release delivers it (asking first on a terminal), a delete drops it."""
    from tests.test_auth import PASSWORD, add_user, submission
    from tests.test_cli_policy import on_terminal
    gateway.policy().add_domain("example.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    out = gateway.cli("config", "set", "--user", "bob@example.test", "--", "actions.quarantine", "-1")
    assert out.stdout.strip() == "actions.quarantine = -1 (user bob@example.test)"
    gateway.sub_port = free_port()
    gateway.start("--submission", f"127.0.0.1:{gateway.sub_port}")
    with submission(gateway) as s:
        s.login("alice@example.test", PASSWORD)
        for n in (1, 2):
            s.sendmail("alice@example.test", ["bob@example.test"],
                       make_message(sender="alice@example.test", subject=f"q{n}", message_id=f"<q{n}@client.test>"))
        s.sendmail("alice@example.test", ["carol@example.test"],
                   make_message(sender="alice@example.test", to="carol@example.test"))
    assert [m.rcpt_tos for m in sink.wait_for(1)] == [["carol@example.test"]]
    held = [r["id"] for r in gateway.query("SELECT id FROM messages WHERE state = 'quarantine' ORDER BY id")]
    assert len(held) == 2
    # Several rounds of the 1 s retry schedule, a flush and a retry: delivery never takes them.
    gateway.cli("queue", "flush")
    one_error_line(gateway.cli("queue", "retry", held[0], check=False),
                   f"{held[0]} is in quarantine; only queued or deferred mail can be retried")
    one_error_line(gateway.cli("queue", "hold", held[0], check=False), "only queued or deferred mail can be held")
    time.sleep(2.5)
    assert gateway.query("SELECT state, attempts FROM messages WHERE state = 'quarantine'") == [
        {"state": "quarantine", "attempts": 0}] * 2
    assert gateway.query("SELECT count(*) AS n FROM delivery_log WHERE message_id IN (?, ?)", *held)[0]["n"] == 0
    assert len(sink.messages) == 1

    rows = json.loads(gateway.cli("queue", "list", "--state", "quarantine", "--json").stdout)
    assert sorted(r["id"] for r in rows) == held and all(r["state"] == "quarantine" for r in rows)
    assert all(r["reason"].startswith("score 0 (") and "quarantine -1" in r["reason"] for r in rows), rows
    text = gateway.cli("queue", "list", "--state", "quarantine").stdout
    assert text.splitlines()[0].split()[-1] == "REASON" and rows[0]["reason"] in text
    assert "REASON" not in gateway.cli("queue", "list", "--state", "delivered").stdout
    shown = gateway.cli("queue", "show", "<q1@client.test>").stdout
    assert f"queue id:    {held[0]}  (quarantine: in quarantine)" in shown
    assert f"quarantined: {rows[0]['reason']}\n" in shown
    assert "session:     HELO client.test, TLS TLSv1." in shown and ", authenticated as alice@example.test" in shown
    detail = json.loads(gateway.cli("queue", "show", held[0], "--json").stdout)
    assert (detail["state"], detail["helo"], detail["auth_user"]) == ("quarantine", "client.test", "alice@example.test")
    assert detail["tls"].startswith("TLSv1.") and detail["reason"] == rows[0]["reason"]
    why = json.loads(gateway.cli("messages", "why", held[0], "--json").stdout)
    assert why["state"] == "quarantine" and why["outcome"] == f"in quarantine ({rows[0]['reason']})"
    assert "QUARANTINED" in [v["symbol"] for v in why["trace"]]
    assert json.loads(gateway.cli("status", "--json").stdout)["queue"]["quarantine"] == 2
    assert "quarantine 2" in gateway.cli("status").stdout
    summary = json.loads(gateway.cli("queue", "summary", "--state", "quarantine", "--json").stdout)
    assert [(r["domain"], r["messages"]) for r in summary] == [("example.test", 2)]

    # A release asks on a terminal; no leaves it where it is.
    code, seen = on_terminal(gateway.home, "queue", "release", held[0], answer="n")
    assert code == 1 and "release 1 quarantined message(s) for delivery? The policy kept them back." in seen
    assert gateway.query("SELECT state FROM messages WHERE id = ?", held[0])[0]["state"] == "quarantine"
    # `--all` takes held mail only: quarantined mail must be named or asked for by state.
    assert gateway.cli("queue", "release", "--all").stdout.strip() == "0 message(s) released"
    code, seen = on_terminal(gateway.home, "queue", "release", held[0], answer="y")
    assert code == 0 and f"{held[0]}: released" in seen
    got = sink.wait_for(2)
    assert got[1].rcpt_tos == ["bob@example.test"] and b"Subject: q1" in got[1].data
    gateway.wait_until(lambda: gateway.query("SELECT state FROM messages WHERE id = ?", held[0])[0]["state"]
                       == "delivered", what="the released message delivered")
    shown = gateway.cli("queue", "show", held[0]).stdout
    assert f"quarantined: {rows[0]['reason']}  (released since)" in shown
    assert "RELEASED_FROM_QUARANTINE" in shown and "released for delivery by an admin" in shown

    # Delete works on quarantined mail too (here on the store, the engine stopped).
    gateway.stop()
    assert gateway.cli("queue", "delete", "--all", "--state", "quarantine", "--yes").stdout.strip() == \
        "1 message(s) deleted"
    assert gateway.query("SELECT id FROM messages WHERE id = ?", held[1]) == []
    assert len(sink.messages) == 2
