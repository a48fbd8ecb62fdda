"""Policy edits as an admin meets them in the first hour (issue 7): open-relay networks
need --force, `config export` is a complete backup and `config import` is safe (only
the sections in the file, a diff, a confirmation on a terminal), `recipients import`
is all or nothing, bad values are refused in one line, IDNs normalise one way,
`config show --changed`, `domains show`, and `domains remove` asks first.

The CLI runs as a subprocess; questions are answered on a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import smtplib
import subprocess
import sys
import time
import tomllib

from tests.conftest import ROOT, Gateway, free_port, make_message, wait_for_banner
from tests.test_auth import PASSWORD, insecure, scram_login


def cli(home, *args, input=None):
    return subprocess.run([sys.executable, "-m", "mailbox_guard", "--home", str(home), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, input=input)


def ok(home, *args, input=None) -> str:
    out = cli(home, *args, input=input)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


def refused(home, *args, input=None) -> str:
    """Exit 1 with one line on stderr and no traceback; returns that line."""
    out = cli(home, *args, input=input)
    assert out.returncode == 1, (args, out.stdout, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("mailbox-guard: "), out.stderr
    return out.stderr.strip()


def on_terminal(home, *args, answer: str) -> tuple[int, str]:
    """Run a command with stdin and stderr on a pseudo-terminal, answer its question."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mailbox_guard", "--home", str(home), *args],
                            stdin=slave, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT, text=True)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 30
    while b"[y/N]" not in seen and time.monotonic() < deadline and proc.poll() is None:
        if select.select([master], [], [], 0.2)[0]:
            seen += os.read(master, 4096)
    assert b"[y/N]" in seen, seen
    os.write(master, answer.encode() + b"\n")
    stdout, _ = proc.communicate(timeout=30)
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:       # the child closed its side
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    return proc.returncode, seen.decode(errors="replace") + stdout


def add_user(home, name, password=PASSWORD):
    ok(home, "users", "add", name, "--password-stdin", input=password + "\n")


# ----------------------------------------------------------------- open relay
def test_open_relay_networks_need_force(tmp_path):
    from mailbox_guard.store.db import open_relay_networks
    home = tmp_path / "h"
    for cidr in ("0.0.0.0/0", "::/0", "8.0.0.0/8", "0.0.0.0/1", "2a00::/16", "2000::/3"):
        assert "open relay" in refused(home, "networks", "add", cidr), cidr
    assert json.loads(ok(home, "networks", "list", "--json")) == []
    for cidr in ("10.0.0.0/8", "127.0.0.0/8", "192.0.2.0/24", "9.0.0.0/9", "fc00::/7", "2001:db8::/32"):
        ok(home, "networks", "add", cidr)
    ok(home, "networks", "add", "0.0.0.0/0", "--force", "--comment", "lab")
    listed = [n["cidr"] for n in json.loads(ok(home, "networks", "list", "--json"))]
    assert open_relay_networks(listed) == ["0.0.0.0/0"]
    assert open_relay_networks(["::/0", "2001:db8::/32", "not a network"]) == ["::/0"]
    # A backup holding a forced network restores; a file that would add one needs --force too.
    backup = ok(home, "config", "export")
    assert "no changes" in ok(home, "config", "import", "-", input=backup)
    fresh = tmp_path / "fresh"
    assert "open relay" in refused(fresh, "config", "import", "-", input=backup)
    ok(fresh, "config", "import", "-", "--force", input=backup)


# ----------------------------------------------------------------- export / import
def build_policy(home, sink_hop: str) -> None:
    ok(home, "domains", "add", "example.test", "--next-hop", sink_hop)
    ok(home, "domains", "add", "exämple.org", "--next-hop", "[::1]:2600")
    ok(home, "domains", "set", "exämple.org", "--anti-impersonation", "off")
    ok(home, "recipients", "add", "bob@example.test")
    ok(home, "recipients", "add", "carol@exämple.org")
    ok(home, "networks", "add", "10.0.0.0/8", "--comment", "office")
    ok(home, "listeners", "add", "mx", "inbound", "127.0.0.1:2625", "--require-auth")
    ok(home, "config", "set", "queue.retry_schedule", "30s,5m")
    ok(home, "users", "policy", "--min-length", "13")
    ok(home, "users", "policy", "--domain", "exämple.org", "--min-classes", "4", "--allow-common")
    ok(home, "users", "mechanism", "example.test", "CRAM-MD5", "on")
    add_user(home, "alice@example.test")
    ok(home, "users", "alias", "alice@example.test", "sales@example.test")
    add_user(home, "dave@exämple.org")
    ok(home, "users", "disable", "dave@exämple.org")
    ok(home, "config", "set", "actions.reject", "10", "--domain", "example.test")
    ok(home, "config", "set", "actions.subject_prefix", "[SPAM]", "--user", "bob@example.test")
    ok(home, "checks", "mode", "rcpt_recipients", "warn", "--user", "bob@example.test")
    ok(home, "checks", "mode", "data_hops", "off")


def views(home) -> dict:
    """The policy as an admin sees it: the export, and what the user and domain
    commands show besides."""
    return {"export": ok(home, "config", "export"),
            "users": json.loads(ok(home, "users", "list", "--json")),
            "policies": json.loads(ok(home, "users", "policy", "--json")),
            "domains": [json.loads(ok(home, "domains", "show", d, "--json"))
                        for d in ("example.test", "exämple.org")]}


def exported(home) -> dict:
    return tomllib.loads(ok(home, "config", "export"))


def test_export_is_a_backup_that_restores_exactly_and_users_log_in(tmp_path, sink):
    a = tmp_path / "a"
    build_policy(a, sink.hop)
    backup = tmp_path / "backup.toml"
    backup.write_text("stale")
    os.chmod(backup, 0o644)
    ok(a, "config", "export", "-o", str(backup))
    assert (os.stat(backup).st_mode & 0o777) == 0o600          # it holds password hashes
    text = backup.read_text()
    assert "$argon2id$" in text and "CRAM-MD5" in text and "SCRAM-SHA-256" in text and PASSWORD not in text
    assert "password hashes" in ok(a, "config", "export", "--help")

    gw = Gateway(tmp_path / "b")          # an empty home: nothing configured before the import
    diff = ok(gw.home, "config", "import", str(backup), "--dry-run")
    assert "+ user alice@example.test aliases=sales@example.test" in diff
    assert "$argon2" not in diff and "secret" not in diff.lower()
    assert json.loads(ok(gw.home, "users", "list", "--json")) == []        # a dry run changes nothing
    ok(gw.home, "config", "import", str(backup), "--yes")
    assert views(gw.home) == views(a)
    assert ok(gw.home, "config", "import", str(backup)).strip() == "no changes"

    # The restored user authenticates with every mechanism it had, and keeps its alias.
    gw.configure(**{"smtp.hostname": "gw.test", "smtp.error_sleep": "0", "dns.nameservers": "127.0.0.1:9"})
    sub_port = free_port()
    gw.start("--submission", f"127.0.0.1:{sub_port}")
    wait_for_banner(sub_port, proc=gw.proc)
    try:
        def submission() -> smtplib.SMTP:
            s = smtplib.SMTP("127.0.0.1", sub_port, local_hostname="client.test", timeout=10)
            s.starttls(context=insecure())
            s.ehlo()
            return s
        with submission() as s:
            s.user, s.password = "alice@example.test", PASSWORD
            assert s.auth("PLAIN", s.auth_plain)[0] == 235               # the argon2id hash
            assert s.docmd("MAIL", "FROM:<sales@example.test>")[0] == 250          # the alias
            s.rset()
            assert s.docmd("MAIL", "FROM:<bob@example.test>")[0] == 553
            s.rset()
            s.sendmail("alice@example.test", ["bob@example.test"], make_message(sender="alice@example.test"))
        with submission() as s:
            assert scram_login(s, "alice@example.test", PASSWORD)[0] == 235
        with submission() as s:
            assert s.esmtp_features["auth"].split()[0] == "CRAM-MD5"
            s.user, s.password = "alice@example.test", PASSWORD
            assert s.auth("CRAM-MD5", s.auth_cram_md5)[0] == 235
        with submission() as s:       # disabled stays disabled
            s.user, s.password = "dave@xn--exmple-cua.org", PASSWORD
            try:
                s.auth("PLAIN", s.auth_plain)
                raise AssertionError("a disabled user logged in")
            except smtplib.SMTPAuthenticationError as exc:
                assert exc.smtp_code == 535
        assert sink.wait_for(1)[0].mail_from == "alice@example.test"
    finally:
        gw.stop()


def test_import_of_one_section_leaves_the_others_alone(tmp_path):
    home = tmp_path / "h"
    build_policy(home, "127.0.0.1:9")
    before = exported(home)
    out = ok(home, "config", "import", "-", input='format = 1\n[settings]\n"smtp.max_recipients" = "50"\n')
    assert out.splitlines() == ["~ setting queue.retry_schedule: 30s,5m -> 1m,5m,15m,1h,4h (default)",
                                "~ setting smtp.max_recipients: 1000 (default) -> 50"]
    after = exported(home)
    assert after.pop("settings") == {"smtp.max_recipients": "50"}
    assert before.pop("settings") == {"queue.retry_schedule": "30s,5m"}
    assert after == before and len(after["users"]) == 2 and len(after["domains"]) == 2
    # A domains section without exämple.org: it goes, and its recipient and user with it
    # (the diff says so); example.test loses the options the file does not give it.
    out = ok(home, "config", "import", "-", "--yes",
             input='format = 1\n[[domains]]\nname = "example.test"\nnext_hop = "127.0.0.1:9"\n')
    assert "- domain xn--exmple-cua.org" in out and "- recipient carol@xn--exmple-cua.org" in out
    assert "- user dave@xn--exmple-cua.org" in out, out
    assert "~ domain example.test: next_hop=127.0.0.1:9 mechanisms=CRAM-MD5 -> next_hop=127.0.0.1:9" in out
    assert [u["name"] for u in json.loads(ok(home, "users", "list", "--json"))] == ["alice@example.test"]
    assert json.loads(ok(home, "recipients", "list", "--json")) == [{"address": "bob@example.test"}]
    assert json.loads(ok(home, "networks", "list", "--json")) == [{"cidr": "10.0.0.0/8", "comment": "office"}]
    # --replace: what the file lacks is emptied.
    ok(home, "config", "import", "-", "--replace", input="format = 1\n")
    assert json.loads(ok(home, "domains", "list", "--json")) == []
    assert json.loads(ok(home, "users", "list", "--json")) == []


def test_import_refuses_unknown_formats_and_asks_on_a_terminal(tmp_path):
    home = tmp_path / "h"
    build_policy(home, "127.0.0.1:9")
    before = ok(home, "config", "export")
    for text, says in (('[settings]\n"smtp.max_recipients" = "50"\n', "no 'format' key"),
                       ('format = 2\n[settings]\n', "format 2 is not supported"),
                       ('format = "one"\n', "not supported"),
                       ('format = 1\n[[domains]]\nname = "192.0.2.1"\n', "not a domain"),
                       ('format = 1\n[[users]]\nname = "x@example.test"\npassword_hash = "plain"\n', "argon2"),
                       ('format = 1\nrecipients = ["a b@example.test"]\n', "not an address"),
                       ("not toml [", "not valid TOML")):
        assert says in refused(home, "config", "import", "-", input=text), text
    assert ok(home, "config", "export") == before
    policy = tmp_path / "p.toml"
    policy.write_text('format = 1\n[settings]\n"smtp.max_recipients" = "50"\n')
    assert "smtp.max_recipients: 1000 (default) -> 50" in ok(home, "config", "import", str(policy), "--dry-run")
    code, seen = on_terminal(home, "config", "import", str(policy), answer="n")
    assert code == 1 and "apply these 2 change(s)?" in seen and "nothing changed" in seen
    assert ok(home, "config", "export") == before
    code, seen = on_terminal(home, "config", "import", str(policy), answer="y")
    assert code == 0 and ok(home, "config", "get", "smtp.max_recipients").strip() == "50"


def test_scoped_settings_and_check_modes_export_import_and_diff(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_policy(a, "127.0.0.1:9")
    ok(a, "config", "set", "actions.tag", "3", "--domain", "exämple.org")
    doc = exported(a)
    assert doc["scoped_settings"] == {"bob@example.test": {"actions.subject_prefix": "[SPAM]"},
                                      "example.test": {"actions.reject": "10"},
                                      "xn--exmple-cua.org": {"actions.tag": "3"}}
    assert doc["check_modes"] == [{"check": "data_hops", "mode": "off"},
                                  {"check": "rcpt_recipients", "mode": "warn", "scope": "bob@example.test"}]
    backup = ok(a, "config", "export")
    dry = ok(b, "config", "import", "-", "--dry-run", input=backup)
    assert "~ setting actions.reject for example.test: (unset) -> 10" in dry
    assert "~ check data_hops for the server: (default) -> off" in dry
    assert "~ check rcpt_recipients for bob@example.test: (default) -> warn" in dry
    ok(b, "config", "import", "-", input=backup)
    assert ok(b, "config", "export") == backup
    assert [r["server"] for r in json.loads(ok(b, "checks", "list", "--json")) if r["name"] == "data_hops"] == ["off"]
    assert ok(b, "config", "import", "-", input=backup).strip() == "no changes"

    # A file without the sections leaves them alone; --replace empties them.
    ok(b, "config", "import", "-", input='format = 1\n[settings]\n')
    assert exported(b)["check_modes"] == doc["check_modes"] and exported(b)["scoped_settings"] == doc["scoped_settings"]
    one = ok(b, "config", "import", "-", input='format = 1\n[[check_modes]]\ncheck = "data_hops"\nmode = "warn"\n')
    assert one.splitlines() == ["~ check data_hops for the server: off -> warn",
                                "~ check rcpt_recipients for bob@example.test: warn -> (default)"]
    assert exported(b)["scoped_settings"] == doc["scoped_settings"]
    # A domain that goes takes its settings and modes (the diff says so).
    out = ok(b, "config", "import", "-", input='format = 1\n[[domains]]\nname = "example.test"\n')
    assert "~ setting actions.tag for xn--exmple-cua.org: 3 -> (unset)" in out
    assert exported(b)["scoped_settings"] == {k: v for k, v in doc["scoped_settings"].items()
                                              if not k.endswith("xn--exmple-cua.org")}
    ok(b, "config", "import", "-", "--replace", input='format = 1\n[[domains]]\nname = "example.test"\n')
    assert exported(b)["check_modes"] == [] and exported(b)["scoped_settings"] == {}

    # Bad sections: one line, nothing changed.
    before = ok(a, "config", "export")
    for text, says in (
            ('[[check_modes]]\ncheck = "rcpt_relay"\nmode = "off"\n', "rcpt_relay is always enforced"),
            ('[[check_modes]]\ncheck = "rcpt_nothing"\nmode = "warn"\n', "unknown check 'rcpt_nothing'"),
            ('[[check_modes]]\ncheck = "data_hops"\nmode = "sometimes"\n', "unknown mode 'sometimes'"),
            ('[[check_modes]]\ncheck = "data_hops"\nmode = "warn"\nscope = "elsewhere.test"\n',
             "elsewhere.test is not a domain in the policy"),
            ('[[check_modes]]\ncheck = "data_hops"\nmode = "warn"\n[[check_modes]]\ncheck = "data_hops"\n'
             'mode = "off"\n', "listed twice"),
            ('[scoped_settings."example.test"]\n"smtp.timeout" = "3s"\n', "applies to the whole server"),
            ('[scoped_settings."example.test"]\n"actions.reject" = "lots"\n', "not a score"),
            ('[scoped_settings."a@elsewhere.test"]\n"actions.reject" = "10"\n', "a@elsewhere.test is not a domain"),
            ('[scoped_settings.""]\n"actions.reject" = "10"\n', "go in [settings]")):
        assert says in refused(a, "config", "import", "-", input="format = 1\n" + text), text
    assert ok(a, "config", "export") == before


# ----------------------------------------------------------------- recipients import
def test_recipients_import_is_all_or_nothing_and_names_the_bad_line(tmp_path):
    home = tmp_path / "h"
    ok(home, "domains", "add", "example.test")
    lines = ["# staff"] + [f"user{i}@example.test" for i in range(5000)]
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines[:4000] + ["a b@example.test  # typo"] + lines[4000:]) + "\n")
    line = refused(home, "recipients", "import", str(bad))
    assert "line 4001" in line and "'a b@example.test'" in line and "nothing imported" in line
    assert json.loads(ok(home, "recipients", "list", "--json")) == []
    good = tmp_path / "good.txt"
    good.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    assert ok(home, "recipients", "import", str(good)).strip() == "imported 5000 recipient(s)"
    assert time.monotonic() - started < 5          # it was 18 s with a commit per address
    assert len(json.loads(ok(home, "recipients", "list", "--json"))) == 5000
    assert "line 2" in refused(home, "recipients", "import", "-", input="ok@example.test\nx@elsewhere.test\n")


# ----------------------------------------------------------------- bad values, IDN
def test_bad_values_are_refused_in_one_line(tmp_path):
    home = tmp_path / "h"
    ok(home, "domains", "add", "example.test")
    for args, says in ((("domains", "add", "192.0.2.1"), "IP address"),
                       (("domains", "add", "2001:db8::1"), "IP address"),
                       (("domains", "add", "1.2.3.999"), "IP address"),
                       (("domains", "add", "other.test", "--next-hop", "999.1.1.1:25"), "999.1.1.1"),
                       (("domains", "add", "other.test", "--next-hop", "[2001:db8::zz]:25"), "not an IP"),
                       (("listeners", "add", "mx", "inbound", "300.0.0.1:25"), "300.0.0.1"),
                       (("recipients", "add", "a b@example.test"), "not an address"),
                       (("recipients", "add", '"a b"@example.test'), "not an address"),
                       (("recipients", "add", "bob@[192.0.2.1]"), "not an address"),
                       (("users", "policy", "--domain", "nosuch.example", "--min-length", "14"),
                        "not a guarded domain"),
                       (("domains", "show", "nosuch.example"), "not a guarded domain")):
        assert says in refused(home, *args), args
    assert [d["name"] for d in json.loads(ok(home, "domains", "list", "--json"))] == ["example.test"]
    assert json.loads(ok(home, "recipients", "list", "--json")) == []
    assert [p["scope"] for p in json.loads(ok(home, "users", "policy", "--json"))] == ["*"]
    assert json.loads(ok(home, "listeners", "list", "--json"))[0].get("default") is True


def test_idn_domains_are_found_by_every_spelling(tmp_path):
    home = tmp_path / "h"
    assert "xn--exmple-cua.org (exämple.org)" in ok(home, "domains", "add", "exämple.org")
    assert json.loads(ok(home, "domains", "list", "--json")) == [{"name": "xn--exmple-cua.org", "next_hop": None}]
    assert "exämple.org" in ok(home, "domains", "list")
    nfd = "exa\u0308mple.org"          # the same name, decomposed
    for added, other in (("EXÄMPLE.ORG", nfd), (nfd, "xn--exmple-cua.org"), ("XN--EXMPLE-CUA.ORG.", "exämple.org")):
        ok(home, "domains", "add", added)
        ok(home, "recipients", "add", f"bob@{other}")
        ok(home, "recipients", "remove", f"bob@{added.rstrip('.')}")
        assert json.loads(ok(home, "domains", "show", other, "--json"))["unicode"] == "exämple.org"
        ok(home, "domains", "remove", other)
        assert json.loads(ok(home, "domains", "list", "--json")) == [], (added, other)


# ----------------------------------------------------------------- config show, domains show/remove
def test_config_show_changed_and_the_meaning_column(tmp_path):
    home = tmp_path / "h"
    ok(home, "config", "set", "smtp.max_recipients", "50")
    ok(home, "config", "set", "smtp.timeout", "300")          # = the default 300s: not a change
    rows = json.loads(ok(home, "config", "show", "--changed", "--json"))
    assert [(r["key"], r["value"], r["default"]) for r in rows] == [("smtp.max_recipients", "50", "1000")]
    text = ok(home, "config", "show", "--changed")
    assert "HELP" in text.splitlines()[0] and "Recipients per message; more get 452 4.5.3." in text
    assert len(text.strip().splitlines()) == 2
    assert "Largest message accepted" in ok(home, "config", "show")


def test_domains_show_and_remove_asks_saying_what_goes(tmp_path):
    home = tmp_path / "h"
    build_policy(home, "127.0.0.1:2600")
    for address in ("x1@example.test", "x2@example.test"):
        ok(home, "recipients", "add", address)
    # The domain's own settings and check modes (build_policy set actions.reject 10 for
    # it); those of its addresses and of the server are not the domain's.
    ok(home, "config", "set", "actions.tag", "4", "--domain", "EXAMPLE.test")
    ok(home, "checks", "mode", "rcpt_recipients", "warn", "--domain", "example.test")
    ok(home, "checks", "mode", "data_hops", "enforce", "--domain", "example.test")
    info = json.loads(ok(home, "domains", "show", "example.test", "--json"))
    assert info == {"name": "example.test", "unicode": "example.test", "next_hop": "127.0.0.1:2600",
                    "anti_impersonation": True, "mechanisms": ["CRAM-MD5"],
                    "password_policy": {"scope": "*", "min_length": 13, "min_classes": 3,
                                        "reject_common": True, "reject_name": True},
                    "settings": {"actions.reject": "10", "actions.tag": "4"},
                    "check_modes": {"data_hops": "enforce", "rcpt_recipients": "warn"},
                    "recipients": 3, "users": 1}
    text = ok(home, "domains", "show", "example.test")
    assert "\nsettings            actions.reject=10, actions.tag=4\n" in text, text
    assert "\ncheck modes         data_hops=enforce, rcpt_recipients=warn\n" in text, text
    ok(home, "config", "unset", "actions.tag", "--domain", "example.test")
    ok(home, "checks", "reset", "data_hops", "--domain", "example.test")
    info = json.loads(ok(home, "domains", "show", "example.test", "--json"))
    assert (info["settings"], info["check_modes"]) == ({"actions.reject": "10"}, {"rcpt_recipients": "warn"})
    text = ok(home, "domains", "show", "exämple.org")
    assert "anti-impersonation  off" in text and "this domain's: at least 13 characters, 4 classes" in text
    assert "[::1]:2600" in text
    assert "\nsettings            none of its own (the server's values apply)\n" in text, text
    assert "\ncheck modes         none of its own (the server's modes apply)\n" in text, text
    info = json.loads(ok(home, "domains", "show", "exämple.org", "--json"))
    assert (info["settings"], info["check_modes"]) == ({}, {})
    code, seen = on_terminal(home, "domains", "remove", "example.test", answer="n")
    assert code == 1 and "3 recipient(s) and 1 user(s)?" in seen
    assert json.loads(ok(home, "domains", "show", "example.test", "--json"))["recipients"] == 3
    out = ok(home, "domains", "remove", "example.test", "--yes")
    assert "3 recipient(s) and 1 user(s) removed" in out
    assert [r["address"] for r in json.loads(ok(home, "recipients", "list", "--json"))] == ["carol@xn--exmple-cua.org"]
    assert [u["name"] for u in json.loads(ok(home, "users", "list", "--json"))] == ["dave@xn--exmple-cua.org"]
