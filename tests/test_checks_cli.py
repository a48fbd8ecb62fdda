"""`mailbox-guard checks` and the scoped settings of `config`, as an admin runs them
(subprocess): every check listed in order with its phases, kind, modes and
description; modes set and reset at the server, a domain and a user; relay control
cannot be weakened; bad names, modes and scopes are one line and exit 1; what the
commands write is what the engine's policy snapshot reads."""

from __future__ import annotations

import json

import pytest

from mailbox_guard.checks import default_checks
from mailbox_guard.model import Mode
from mailbox_guard.policy.snapshot import Policy
from mailbox_guard.store.db import DB_NAME, connect, policy_sections
from tests.test_cli_policy import cli, ok, refused


def snapshot(home) -> Policy:
    """The policy exactly as the engine builds it from the store."""
    conn = connect(home / DB_NAME, readonly=True)
    try:
        sections = policy_sections(conn)
    finally:
        conn.close()
    return Policy.from_sections(sections.pop("version"), **sections)


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "h"
    ok(home, "domains", "add", "example.org")
    ok(home, "domains", "add", "exämple.net")
    return home


def listed(home, *args) -> list[dict]:
    return json.loads(ok(home, "checks", "list", "--json", *args))


def test_checks_list_is_every_check_in_order_with_what_it_is(home):
    rows = listed(home)
    checks = default_checks()
    assert [r["name"] for r in rows] == [c.name for c in checks]
    assert [r["order"] for r in rows] == list(range(1, len(checks) + 1))
    relay = next(r for r in rows if r["name"] == "rcpt_relay")
    assert relay == {"order": relay["order"], "name": "rcpt_relay", "phases": ["rcpt"], "kind": "gate",
                     "default_mode": "enforce", "fixed": True, "server": "enforce", "server_from": "fixed",
                     "overrides": [], "description": checks[relay["order"] - 1].description}
    assert rows.index(relay) < [r["name"] for r in rows].index("rcpt_recipients")     # relay control first
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds["connect_network"] == "scoring" and kinds["rcpt_recipients"] == "gate"
    assert all(r["description"] and r["server"] == "enforce" for r in rows)
    text = ok(home, "checks", "list")
    assert text.splitlines()[0].split() == ["ORDER", "NAME", "PHASES", "KIND", "SERVER", "OVERRIDES", "DESCRIPTION"]
    assert "enforce (fixed)" in text and "Relay control" in text


def test_modes_at_the_server_a_domain_and_a_user_reach_the_policy(home):
    assert ok(home, "checks", "mode", "rcpt_recipients", "warn").strip() == "rcpt_recipients = warn at the server"
    assert ok(home, "checks", "mode", "rcpt_recipients", "OFF", "--domain", "EXAMPLE.org").strip() == \
        "rcpt_recipients = off at domain example.org"
    assert ok(home, "checks", "mode", "rcpt_recipients", "enforce", "--user", "Bob@example.org").strip() == \
        "rcpt_recipients = enforce at user bob@example.org"
    ok(home, "checks", "mode", "data_hops", "warn", "--domain", "exämple.net")     # any spelling of an IDN
    [row] = [r for r in listed(home) if r["name"] == "rcpt_recipients"]
    assert (row["server"], row["server_from"]) == ("warn", "server")
    assert row["overrides"] == [{"scope": "bob@example.org", "level": "user", "mode": "enforce"},
                                {"scope": "example.org", "level": "domain", "mode": "off"}]
    # Where each mode comes from, for one scope: user > domain > server > default.
    at = {r["name"]: (r["mode"], r["from"]) for r in listed(home, "--user", "bob@example.org")}
    assert at["rcpt_recipients"] == ("enforce", "user bob@example.org")
    assert at["rcpt_relay"] == ("enforce", "fixed") and at["data_hops"] == ("enforce", "default")
    at = {r["name"]: (r["mode"], r["from"]) for r in listed(home, "--user", "carol@example.org")}
    assert at["rcpt_recipients"] == ("off", "domain example.org")
    at = {r["name"]: (r["mode"], r["from"]) for r in listed(home, "--domain", "xn--exmple-cua.net")}
    assert at["data_hops"] == ("warn", "domain xn--exmple-cua.net") and at["rcpt_recipients"] == ("warn", "server")
    text = ok(home, "checks", "list", "--domain", "example.org")
    assert text.splitlines()[0].split()[5:7] == ["MODE", "FROM"] and "domain example.org" in text

    # The engine's snapshot reads the same.
    policy = snapshot(home)
    assert policy.scope("bob@example.org").mode("rcpt_recipients") is Mode.ENFORCE
    assert policy.scope("carol@example.org").mode("rcpt_recipients") is Mode.OFF
    assert policy.scope("dave@elsewhere.test").mode("rcpt_recipients") is Mode.WARN
    assert policy.scope("x@xn--exmple-cua.net").mode("data_hops") is Mode.WARN

    # Reset: the next level applies again; resetting nothing says so.
    assert ok(home, "checks", "reset", "rcpt_recipients", "--domain", "example.org").strip() == \
        "rcpt_recipients at domain example.org: now warn (server)"
    assert ok(home, "checks", "reset", "rcpt_recipients", "--domain", "example.org").strip() == \
        "rcpt_recipients had no mode of its own at domain example.org; it is warn (server)"
    ok(home, "checks", "reset", "rcpt_recipients")
    ok(home, "checks", "reset", "rcpt_recipients", "--user", "bob@example.org")
    assert snapshot(home).scope("carol@example.org").mode("rcpt_recipients") is Mode.ENFORCE
    assert [r["overrides"] for r in listed(home) if r["name"] == "rcpt_recipients"] == [[]]


def test_relay_control_cannot_be_weakened_and_bad_input_is_one_line(home):
    for mode in ("warn", "off"):
        for scope in ([], ["--domain", "example.org"], ["--user", "bob@example.org"]):
            assert "rcpt_relay is always enforced and cannot be set to " + mode in refused(
                home, "checks", "mode", "rcpt_relay", mode, *scope)
    assert ok(home, "checks", "mode", "rcpt_relay", "enforce").strip() == "rcpt_relay is always enforced"
    assert "unknown check 'rcpt_nothing'" in refused(home, "checks", "mode", "rcpt_nothing", "warn")
    assert "unknown check 'rcpt_nothing'" in refused(home, "checks", "reset", "rcpt_nothing")
    assert "unknown mode 'maybe' (enforce, warn or off)" in refused(home, "checks", "mode", "data_hops", "maybe")
    assert "elsewhere.test is not a guarded domain" in refused(home, "checks", "mode", "data_hops", "warn",
                                                               "--domain", "elsewhere.test")
    assert "bob@elsewhere.test: elsewhere.test is not a guarded domain" in refused(
        home, "checks", "mode", "data_hops", "warn", "--user", "bob@elsewhere.test")
    assert "is an address, not a domain" in refused(home, "checks", "mode", "data_hops", "warn",
                                                    "--domain", "bob@example.org")
    assert "not an address" in refused(home, "checks", "mode", "data_hops", "warn", "--user", "example.org")
    assert "not a guarded domain" in refused(home, "checks", "list", "--domain", "elsewhere.test")
    assert cli(home, "checks", "mode", "data_hops", "warn", "--domain", "example.org",
               "--user", "bob@example.org").returncode == 2
    assert all(r["overrides"] == [] and r["server_from"] in ("default", "fixed") for r in listed(home))
    assert snapshot(home).modes == {}


def test_checks_list_needs_an_existing_home(tmp_path):
    out = cli(tmp_path / "typo", "checks", "list")
    assert out.returncode == 1 and "no mailbox-guard home" in out.stderr
    assert not (tmp_path / "typo").exists()


# ----------------------------------------------------------------- scoped settings
def test_scoped_settings_set_show_unset_and_reach_the_policy(home):
    assert ok(home, "config", "set", "actions.reject", "12").strip() == "actions.reject = 12"
    assert ok(home, "config", "set", "actions.reject", "10", "--domain", "example.org").strip() == \
        "actions.reject = 10 (domain example.org)"
    assert ok(home, "config", "set", "--user", "Bob@Example.org", "--", "actions.tag", "-2").strip() == \
        "actions.tag = -2 (user bob@example.org)"
    ok(home, "config", "set", "actions.subject_prefix", "[SPAM]", "--domain", "example.org")

    rows = {r["key"]: r for r in json.loads(ok(home, "config", "show", "--user", "bob@example.org", "--json"))}
    assert set(rows) == {"actions.tag", "actions.quarantine", "actions.tempfail", "actions.reject",
                         "actions.subject_prefix"}                       # only what has scopes
    assert [(k, rows[k]["value"], rows[k]["from"]) for k in sorted(rows)] == [
        ("actions.quarantine", "off", "default"), ("actions.reject", "10", "domain example.org"),
        ("actions.subject_prefix", "[SPAM]", "domain example.org"), ("actions.tag", "-2", "user bob@example.org"),
        ("actions.tempfail", "off", "default")]
    rows = {r["key"]: r for r in json.loads(ok(home, "config", "show", "--domain", "example.org", "--json"))}
    assert (rows["actions.tag"]["value"], rows["actions.tag"]["from"]) == ("6", "default")
    assert (rows["actions.reject"]["value"], rows["actions.reject"]["from"]) == ("10", "domain example.org")
    changed = json.loads(ok(home, "config", "show", "--user", "carol@example.org", "--changed", "--json"))
    assert [(r["key"], r["from"]) for r in changed] == [("actions.reject", "domain example.org"),
                                                        ("actions.subject_prefix", "domain example.org")]
    text = ok(home, "config", "show", "--domain", "example.org")
    assert text.splitlines()[0].split()[:3] == ["KEY", "VALUE", "FROM"] and "domain example.org" in text
    server = {r["key"]: r for r in json.loads(ok(home, "config", "show", "--json"))}
    assert server["actions.reject"]["value"] == "12" and server["actions.reject"]["scoped"] is True
    assert server["actions.reject"]["overrides"] == [{"scope": "example.org", "value": "10"}]
    assert server["smtp.timeout"]["scoped"] is False and "overrides" not in server["smtp.timeout"]

    policy = snapshot(home)
    assert policy.scope("bob@example.org")["actions.tag"] == -2.0
    assert policy.scope("bob@example.org")["actions.reject"] == 10.0
    assert policy.scope("carol@example.org")["actions.tag"] == 6.0
    assert policy.scope("x@elsewhere.test")["actions.reject"] == 12.0
    assert policy.scope("carol@example.org")["actions.subject_prefix"] == "[SPAM]"

    assert ok(home, "config", "unset", "actions.reject", "--domain", "example.org").strip() == \
        "actions.reject = 12 (server) at domain example.org"
    assert ok(home, "config", "unset", "actions.tag", "--user", "bob@example.org").strip() == \
        "actions.tag = 6 (default) at user bob@example.org"
    assert snapshot(home).scope("bob@example.org")["actions.reject"] == 12.0


def test_scoped_settings_refuse_what_does_not_fit_in_one_line(home):
    before = snapshot(home).version
    for args, says in (
            (("config", "set", "smtp.timeout", "30s", "--domain", "example.org"),
             "smtp.timeout applies to the whole server; only these may be set per domain or user: actions.tag"),
            (("config", "unset", "queue.retry_schedule", "--user", "bob@example.org"), "applies to the whole server"),
            (("config", "set", "actions.reject", "lots", "--domain", "example.org"), "not a score or 'off'"),
            (("config", "set", "actions.subject_prefix", "x" * 65, "--domain", "example.org"), "at most 64"),
            (("config", "set", "no.such", "1", "--domain", "example.org"), "unknown setting 'no.such'"),
            (("config", "set", "actions.reject", "10", "--domain", "elsewhere.test"), "not a guarded domain"),
            (("config", "set", "actions.reject", "10", "--user", "a@elsewhere.test"),
             "a@elsewhere.test: elsewhere.test is not a guarded domain"),
            (("config", "set", "actions.reject", "10", "--user", "not an address"), "not an address"),
            (("config", "show", "--domain", "192.0.2.1"), "IP address")):
        assert says in refused(home, *args), args
    assert cli(home, "config", "show", "--domain", "example.org", "--user", "a@example.org").returncode == 2
    assert snapshot(home).version == before and snapshot(home).scoped == {}


def test_a_domain_that_goes_takes_its_settings_and_modes(home):
    ok(home, "config", "set", "actions.reject", "10", "--domain", "example.org")
    ok(home, "config", "set", "actions.reject", "9", "--user", "bob@example.org")
    ok(home, "checks", "mode", "data_hops", "warn", "--user", "bob@example.org")
    ok(home, "checks", "mode", "data_hops", "off", "--domain", "xn--exmple-cua.net")
    ok(home, "domains", "remove", "example.org", "--yes")
    policy = snapshot(home)
    assert policy.scoped == {} and policy.modes == {"xn--exmple-cua.net": {"data_hops": Mode.OFF}}
    ok(home, "domains", "add", "example.org")           # back, without the old overrides
    assert [r["from"] for r in json.loads(ok(home, "config", "show", "--domain", "example.org", "--json"))] == \
        ["default"] * 5
