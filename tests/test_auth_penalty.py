"""Nobody can lock an account: failures ban their sources (an address, its /24 or /64),
and a login under attack only makes networks it never succeeded from wait. The
clients come from several loopback addresses (127.0.x.y), as attackers from several
networks would."""

from __future__ import annotations

import json
import smtplib
import time

import pytest

from tests.conftest import free_port
from tests.test_auth import PASSWORD, _plain, add_user, insecure, submission


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


# ----------------------------------------------------------------- IPv6 networks, the penalty's values
def test_a_source_is_penalised_with_its_network_a_24_or_a_64():
    from mailbox_guard.auth.service import network_of
    assert network_of("192.0.2.7") == network_of("192.0.2.200") == "192.0.2.0/24"
    assert network_of("::ffff:192.0.2.7") == "192.0.2.0/24"          # an IPv4 client on a v6 socket
    same = ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:DB8:1:2:3:4:5:6")
    assert {network_of(ip) for ip in same} == {"2001:db8:1:2::/64"}
    assert network_of("2001:db8:1:3::1") == "2001:db8:1:3::/64"      # the next /64 is another network
    assert network_of("::1") == "::/64"
    assert network_of("fe80::1%eth0") == "fe80::/64"


def test_the_penalty_doubles_from_one_second_up_to_its_cap():
    from mailbox_guard.auth.service import penalty_delay
    assert [penalty_delay(n, 5, 15) for n in range(4, 12)] == [0, 1, 2, 4, 8, 15, 15, 15]
    assert penalty_delay(10 ** 6, 5, 15) == 15                 # no overflow however many
    assert [penalty_delay(n, 1, 3) for n in range(0, 5)] == [0, 1, 2, 3, 3]
    assert penalty_delay(100, 0, 15) == 0                      # auth.penalty_after 0: never


def test_the_service_waits_those_values_and_not_on_a_known_network(monkeypatch):
    """AuthService.gate with the sleeps recorded: what a client from a strange network
    waits before each try, as failures for the login add up."""
    import asyncio
    from types import SimpleNamespace
    from mailbox_guard.auth import service
    waits = []

    async def sleep(seconds):
        waits.append(seconds)
    monkeypatch.setattr(service.asyncio, "sleep", sleep)
    settings = {"auth.penalty_after": 2, "auth.penalty_max": 5.0, "auth.ban_window": 3600.0,
                "auth.ban_after": 0, "auth.net_ban_after": 0}
    auth = service.AuthService(policy=lambda: SimpleNamespace(settings=settings), readers=None, writer=None,
                               home=None)
    auth.known = {"alice@example.test": {"2001:db8:1:2::/64": 0.0}}   # the owner's network

    async def attack():
        seen = []
        for _ in range(7):
            waits.clear()
            assert await auth.gate("2001:db8:9::1", "alice@example.test") is False   # nobody banned
            seen.append(sum(waits))
            await auth.failed("2001:db8:9::1", "alice@example.test")
        waits.clear()
        await auth.gate("2001:db8:1:2::99", "alice@example.test")                    # the owner's /64
        return seen, list(waits)
    seen, owner = asyncio.run(attack())
    assert seen == [0, 0, 1, 2, 4, 5, 5]
    assert owner == []


def test_ipv6_failures_ban_the_64(gateway, sink):
    gateway.policy().add_domain("example.test", sink.hop)
    assert add_user(gateway, "alice@example.test").returncode == 0
    gateway.configure(**{"auth.ban_after": "100", "auth.net_ban_after": "3", "auth.penalty_after": "0",
                         "auth.session_failures": "10"})
    gateway.sub_port = free_port()
    gateway.start("--submission", f"[::1]:{gateway.sub_port}")

    def over_v6() -> smtplib.SMTP:
        s = smtplib.SMTP("::1", gateway.sub_port, local_hostname="client.test", timeout=10)
        s.ehlo()
        s.starttls(context=insecure())
        s.ehlo()
        return s

    def right_password() -> int:
        with over_v6() as s:
            return s.docmd("AUTH", _plain("alice@example.test", PASSWORD))[0]
    with over_v6() as s:
        for i in range(3):
            assert s.docmd("AUTH", _plain("alice@example.test", f"bad-{i}"))[0] == 535
    assert right_password() == 535                                                     # banned
    # The /64 is banned, not the one address (3 is far under auth.ban_after).
    assert [b["key"] for b in json.loads(gateway.cli("auth", "bans", "--json").stdout)] == ["::/64"]
    assert "unknown[::1]: SASL PLAIN authentication failed: user=<alice@example.test>" in gateway.log()
    gateway.cli("auth", "unban", "::/64")
    gateway.wait_until(lambda: right_password() == 235, timeout=10, what="the /64 unbanned")
