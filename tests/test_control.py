"""The control socket of a running engine: roles by SO_PEERCRED (a non-admin uid
reads, cannot act), garbage and 1 MB lines get error replies, and the engine keeps
serving SMTP throughout; metrics are served when asked for."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import tempfile
import urllib.request
from pathlib import Path

import pytest

from mailbox_guard.control.client import ControlClient
from tests.conftest import free_port, make_message, new_gateway


def raw_exchange(path, payload: bytes, replies: int, timeout: float = 10) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(payload)
        data = b""
        while data.count(b"\n") < replies:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def running():
    # Other users must be able to reach the home folder's parent (pytest's own
    # temporary folders are root-only), as /var/lib is on a real system.
    base = Path(tempfile.mkdtemp(prefix="mg-control-"))
    base.chmod(0o755)
    gateway = new_gateway(base / "home")
    gateway.policy().add_domain("example.test", "127.0.0.1:9")     # keeps mail deferred
    gateway.start()
    with gateway.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test"], make_message(message_id="<ctl-1@client.test>"))
    gateway.wait_until(lambda: gateway.query("SELECT state FROM messages")[0]["state"] == "deferred",
                       what="first delivery attempt")
    yield gateway
    gateway.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_socket_and_home_permissions(running):
    sock = running.home / "control.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) & 0o007 == 0          # 0660 at most
    assert stat.S_IMODE(sock.stat().st_mode) & 0o111 == 0
    assert stat.S_IMODE(running.home.stat().st_mode) & 0o007 == 0  # 0750 at most


def test_admin_can_read_and_act(running):
    c = ControlClient(running.home)
    assert c.call("hello")["protocol"] == 1
    status = c.call("status")
    assert status["queue"]["deferred"] + status["queue"]["incoming"] + status["queue"]["active"] == 1
    msg = c.call("queue.show", id="<ctl-1@client.test>")
    assert [v["symbol"] for v in msg["trace"]][-1] == "QUEUED"
    assert c.call("queue.hold", id=msg["id"]) == {"held": msg["id"]}
    assert running.query("SELECT state FROM messages")[0]["state"] == "hold"
    assert c.call("queue.release", id=msg["id"]) == {"released": msg["id"]}


def test_garbage_and_huge_lines_get_errors_and_smtp_goes_on(running):
    path = running.home / "control.sock"
    replies = raw_exchange(path, b"garbage\n" + b"[1,2]\n" + b'{"method": 5}\n' + b"x" * (1 << 20) + b"\n"
                           + b'{"v": 1, "id": 3, "method": "status"}\n', 5)
    assert [r["ok"] for r in replies] == [False, False, False, False, True]
    assert [r.get("error", {}).get("code") for r in replies[:4]] == ["bad_request", "bad_request",
                                                                      "bad_request", "too_large"]
    assert replies[4]["id"] == 3
    assert raw_exchange(path, b'{"method": "no.such"}\n', 1)[0]["error"]["code"] == "unknown_method"
    with running.smtp() as s:
        s.ehlo()
        assert s.noop()[0] == 250
    assert running.proc.poll() is None


def _as_user(user: str, home, method: str, **params) -> dict:
    """One control request from a child process running as another uid (fork, drop
    privileges, speak the protocol with the standard library only)."""
    pw = pwd.getpwnam(user)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:      # child: never return into pytest
        result = {"ok": False, "code": "child-crashed"}
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(10)
                    s.connect(str(home / "control.sock"))
                    s.sendall(json.dumps({"v": 1, "id": 1, "method": method, "params": params}).encode() + b"\n")
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                reply = json.loads(data)
                result = {"ok": True} if reply["ok"] else {"ok": False, "code": reply["error"]["code"]}
            except PermissionError:
                result = {"ok": False, "code": "no-access"}
        finally:
            os.write(write_fd, json.dumps(result).encode())
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def test_non_admin_uid_reads_but_cannot_act(running):
    nobody = pwd.getpwnam("nobody")
    # An admin grants the socket's group (the home folder's) to an operator account.
    os.chown(running.home, -1, nobody.pw_gid)
    os.chown(running.home / "control.sock", -1, nobody.pw_gid)
    assert _as_user("nobody", running.home, "status") == {"ok": True}
    assert _as_user("nobody", running.home, "connections") == {"ok": True}
    msg_id = running.query("SELECT id FROM messages")[0]["id"]
    assert _as_user("nobody", running.home, "queue.show", id=msg_id) == {"ok": True}
    for method, params in (("queue.flush", {}), ("reload", {}), ("queue.delete", {"id": msg_id}),
                           ("connections.kill", {"id": "C1"}), ("queue.bulk", {"action": "delete"})):
        assert _as_user("nobody", running.home, method, **params) == {"ok": False, "code": "forbidden"}
    assert running.query("SELECT count(*) AS n FROM messages")[0]["n"] == 1


def test_users_outside_the_group_cannot_open_the_socket(running):
    assert running.home.stat().st_gid != pwd.getpwnam("nobody").pw_gid
    assert _as_user("nobody", running.home, "status") == {"ok": False, "code": "no-access"}


def test_kill_a_live_connection(running):
    with running.smtp() as s:
        s.ehlo()
        c = ControlClient(running.home)
        live = [r for r in c.call("connections") if r["helo"] == "client.test"]
        assert len(live) == 1 and live[0]["phase"] in ("ehlo", "helo")
        c.call("connections.kill", id=live[0]["id"])
        with pytest.raises(Exception):
            s.noop()
            s.noop()


def test_metrics_endpoint(gateway):
    port = free_port()
    gateway.start("--metrics", f"127.0.0.1:{port}")

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def value(text: str, name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    before = value(scrape(), "mailbox_guard_connections_total")
    with gateway.smtp() as s:
        s.ehlo()
        s.mail("a@sender.test")
        s.rcpt("x@nowhere.test")
    text = scrape()
    assert value(text, "mailbox_guard_connections_total") == before + 1
    assert 'mailbox_guard_check_results_total{check="rcpt_relay",symbol="RELAY_DENIED"} 1' in text
    assert 'mailbox_guard_messages_total{outcome="rejected"} 1' in text
    assert 'mailbox_guard_queue_messages{state="deferred"} 0' in text


def test_bans_through_the_socket(running):
    c = ControlClient(running.home)
    running.policy()
    conn = running.db()
    conn.execute("INSERT INTO auth_bans (kind, key, until, failures, created_at) "
                 "VALUES ('ip', '192.0.2.7', strftime('%s','now') + 3600, 10, strftime('%s','now'))")
    conn.commit()
    conn.close()
    assert [b["key"] for b in c.call("auth.bans")] == ["192.0.2.7"]
    assert c.call("auth.unban", id="192.0.2.7") == {"unbanned": "192.0.2.7"}
    assert c.call("auth.bans") == []


def test_subscription_streams_live_events(running):
    import asyncio
    from mailbox_guard.control.client import AsyncControlClient

    async def collect() -> list[dict]:
        client = AsyncControlClient(running.home)
        events: list[dict] = []
        stream = client.subscribe(["connection", "message"])

        async def read():
            async for event in stream:
                events.append(event)
                if any(e["topic"] == "message" for e in events):
                    return

        task = asyncio.ensure_future(read())
        await asyncio.sleep(0.3)
        await asyncio.to_thread(_send_one, running)
        await asyncio.wait_for(task, 10)
        await stream.aclose()
        return events

    events = asyncio.run(collect())
    topics = [(e["topic"], e.get("action")) for e in events]
    assert ("connection", "opened") in topics and ("message", None) in topics
    msg = next(e for e in events if e["topic"] == "message")
    assert msg["recipients"] == ["bob@example.test"] and msg["message_id"] == "<ctl-2@client.test>"


def _send_one(gw) -> None:
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test"], make_message(message_id="<ctl-2@client.test>"))


def test_bad_parameters_are_refused_not_obeyed(running):
    path = running.home / "control.sock"
    replies_ = raw_exchange(path, b'{"method": "stats", "params": {"minutes": 3000000}}\n'
                                  b'{"method": "stats", "params": {"minutes": "x"}}\n'
                                  b'{"method": "queue.list", "params": {"limit": "lots"}}\n'
                            + b"[" * 60000 + b"\n", 4)
    assert [r["error"]["code"] for r in replies_] == ["bad_request"] * 4
    assert ControlClient(running.home).call("stats", minutes=5)["per_minute"]["accepted"].__len__() == 5


def test_bulk_actions_and_why_through_the_socket(running):
    from mailbox_guard.control.client import ControlCallError
    c = ControlClient(running.home)
    queue_id = running.query("SELECT id FROM messages")[0]["id"]
    assert c.call("queue.bulk", action="hold", to_domain="other.test") == {"action": "hold", "ids": []}
    assert c.call("queue.bulk", action="hold", states=["deferred"], to_domain="EXAMPLE.test") == {
        "action": "hold", "ids": [queue_id]}
    assert running.query("SELECT state FROM messages")[0]["state"] == "hold"
    for params in ({"action": "explode"}, {"action": "hold", "states": "deferred"},
                   {"action": "hold", "to_domain": 7}):
        with pytest.raises(ControlCallError) as err:
            c.call("queue.bulk", **params)
        assert err.value.code == "bad_request", params
    with pytest.raises(ControlCallError) as err:      # release applies to held mail only
        c.call("queue.bulk", action="release", states=["deferred"])
    assert err.value.code == "failed" and "release applies to hold" in err.value.message
    assert c.call("queue.bulk", action="release") == {"action": "release", "ids": [queue_id]}
    why = c.call("messages.why", id="bob@example.test")
    assert why["kind"] == "message" and why["matched"] == 1 and why["detail"]["id"] == queue_id
    with pytest.raises(ControlCallError) as err:
        c.call("messages.why", id="nobody@nowhere.test")
    assert err.value.code == "not_found"
