"""Nobody can lock an account: failures ban their sources (an address, its /24),
and a login under attack only makes networks it never succeeded from wait. The
clients come from several loopback addresses (127.0.x.y), as attackers from several
networks would."""

from __future__ import annotations

import json
import smtplib
import time

import pytest

from tests.conftest import free_port
from tests.test_auth import PASSWORD, _plain, add_user, submission


def submission_from(gw, source: str) -> smtplib.SMTP:
    return submission(gw, source, timeout=30)


def try_login(gw, source: str, password: str) -> tuple[int, float]:
    with submission_from(gw, source) as s:
        started = time.monotonic()
        code = s.docmd("AUTH", _plain("alice@example.test", password))[0]
        return code, time.monotonic() - started


@pytest.fixture
def attacked(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    # The penalty starts late here, so that the attackers themselves wait little.
    gateway.configure(**{"auth.penalty_after": "19", "auth.penalty_max": "2s", "auth.session_failures": "10"})
    gateway.sub_port = free_port()
    gateway.start("--submission", f"127.0.0.1:{gateway.sub_port}")
    return gateway


def test_a_user_attacked_from_many_addresses_still_logs_in_from_its_own(attacked):
    # The owner's network: 127.0.0.0/24.
    assert try_login(attacked, "127.0.0.1", PASSWORD)[0] == 235
    # 21 wrong passwords from three networks, 7 each: under every address and network ban.
    for net in (1, 2, 3):
        with submission_from(attacked, f"127.0.{net}.1") as s:
            for i in range(7):
                assert s.docmd("AUTH", _plain("alice@example.test", f"guess-{net}-{i}"))[0] == 535
    # The owner logs in as usual, at once, from its own network (another address in it too) ...
    for source in ("127.0.0.1", "127.0.0.77"):
        code, took = try_login(attacked, source, PASSWORD)
        assert code == 235, source
        assert took < 1.5, (source, took)
    # ... and from a network it never used it still logs in, after a wait.
    code, took = try_login(attacked, "127.0.9.1", PASSWORD)
    assert code == 235
    assert took >= 1.8
    # The attackers' addresses are not banned either (7 < auth.ban_after): nothing was locked.
    bans = json.loads(attacked.cli("auth", "bans", "--json").stdout)
    assert bans == []


def test_sources_are_banned_by_address_and_by_network(attacked):
    attacked.stop()
    attacked.configure(**{"auth.ban_after": "3", "auth.net_ban_after": "5", "auth.penalty_after": "0"})
    attacked.start("--submission", f"127.0.0.1:{attacked.sub_port}")
    # Three failures from one address: that address is banned (the right password fails).
    with submission_from(attacked, "127.0.4.1") as s:
        for i in range(3):
            assert s.docmd("AUTH", _plain("alice@example.test", f"bad-{i}"))[0] == 535
    assert try_login(attacked, "127.0.4.1", PASSWORD)[0] == 535
    # Two more from a neighbour: five from 127.0.4.0/24, so the whole /24 is banned ...
    with submission_from(attacked, "127.0.4.2") as s:
        for i in range(2):
            assert s.docmd("AUTH", _plain("alice@example.test", f"bad-{i}"))[0] == 535
    assert try_login(attacked, "127.0.4.3", PASSWORD)[0] == 535
    # ... and nothing else: the account works from any other network.
    assert try_login(attacked, "127.0.5.1", PASSWORD)[0] == 235
    bans = {b["key"] for b in json.loads(attacked.cli("auth", "bans", "--json").stdout)}
    assert bans == {"127.0.4.1", "127.0.4.0/24"}
    # Every failure is logged with the client address, as fail2ban-style tools expect.
    assert "unknown[127.0.4.2]: SASL PLAIN authentication failed: user=<alice@example.test>" in attacked.log()
    # An admin lifts the network ban; the address ban stays.
    attacked.cli("auth", "unban", "127.0.4.0/24")
    attacked.wait_until(lambda: try_login(attacked, "127.0.4.3", PASSWORD)[0] == 235, timeout=10,
                        what="the network ban lifted")
    assert try_login(attacked, "127.0.4.1", PASSWORD)[0] == 535
