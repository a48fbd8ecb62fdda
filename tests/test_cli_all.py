"""Every CLI command, as a subprocess and through Typer's runner, against a home with
a running engine: --json parsed back, exit codes, one-line errors. A walk of the
command tree fails when a command is missing from this table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from cli.app import app
from tests.conftest import ROOT, make_message

# (command path, arguments after it, takes --json, expected exit code)
TABLE = [
    ("status", [], True, 0),
    ("domains add", ["more.test", "--next-hop", "127.0.0.1:9"], True, 0),
    ("domains list", [], True, 0),
    ("domains set", ["more.test", "--anti-impersonation", "off"], False, 0),
    ("domains show", ["more.test"], True, 0),
    ("domains show", ["absent.test"], False, 1),
    ("domains remove", ["more.test", "--yes"], False, 0),
    ("recipients add", ["bob@example.test"], False, 0),
    ("recipients list", [], True, 0),
    ("recipients remove", ["bob@example.test"], False, 0),
    ("recipients import", ["{recipients}"], False, 0),
    ("networks add", ["192.0.2.0/24"], False, 0),
    ("networks add", ["0.0.0.0/0"], False, 1),             # an open relay needs --force
    ("networks list", [], True, 0),
    ("networks remove", ["192.0.2.0/24"], False, 0),
    ("listeners add", ["extra", "inbound", "127.0.0.1:2999"], False, 0),
    ("listeners list", [], True, 0),
    ("listeners remove", ["extra"], False, 0),
    ("config show", [], True, 0),
    ("config show", ["--changed"], True, 0),
    ("config get", ["smtp.max_recipients"], False, 0),
    ("config set", ["smtp.max_recipients", "500"], False, 0),
    ("config unset", ["smtp.max_recipients"], False, 0),
    ("config set", ["actions.reject", "10", "--domain", "example.test"], False, 0),
    ("config set", ["smtp.timeout", "30s", "--domain", "example.test"], False, 1),   # not a scoped setting
    ("config show", ["--domain", "example.test"], True, 0),
    ("config show", ["--user", "bob@example.test", "--changed"], True, 0),
    ("config unset", ["actions.reject", "--domain", "example.test"], False, 0),
    ("checks list", [], True, 0),
    ("checks list", ["--user", "bob@example.test"], True, 0),
    ("checks mode", ["rcpt_recipients", "warn", "--domain", "example.test"], False, 0),
    ("checks mode", ["rcpt_relay", "off"], False, 1),                               # never weakened
    ("checks mode", ["rcpt_recipients", "sometimes"], False, 1),
    ("checks reset", ["rcpt_recipients", "--domain", "example.test"], False, 0),
    ("checks reset", ["no_such_check"], False, 1),
    ("config export", [], False, 0),
    ("config import", ["{policy}", "--dry-run"], True, 0),
    ("config import", ["{policy}", "--yes"], True, 0),
    ("config import", ["{policy}", "--replace", "--dry-run"], True, 0),
    ("queue list", [], True, 0),
    ("queue list", ["--state", "quarantine"], True, 0),
    ("queue show", ["{id}"], True, 0),
    ("queue show", ["{id}", "--raw"], False, 0),
    ("queue show", ["{id}", "--body"], False, 0),
    ("queue summary", [], True, 0),
    ("queue hold", ["--all", "--to-domain", "nosuch.test"], False, 0),
    ("queue release", ["--all", "--state", "hold"], False, 0),
    ("queue hold", ["{id}"], False, 0),
    ("queue release", ["{id}"], False, 0),
    ("queue retry", ["{id}"], False, 1),          # just released: it may be active; both are fine
    ("queue flush", [], True, 0),
    ("queue delete", ["NOSUCHID", "--yes"], False, 1),
    ("queue delete", ["--all", "--state", "hold", "--to-domain", "nosuch.test", "--yes"], False, 0),
    ("queue purge", ["--older-than", "1d"], True, 0),
    ("connections list", [], True, 0),
    ("connections kill", ["C-NO-SUCH"], False, 1),
    ("messages why", ["{msgid}"], True, 0),
    ("messages why", ["bob@example.test"], True, 0),
    ("messages why", ["C-NO-SUCH"], False, 1),
    ("rejects", [], True, 0),
    ("rejects", ["--since", "1h", "--check", "RELAY_DENIED", "--client", "127.0.0.1"], True, 0),
    ("tls show", [], True, 0),
    ("users add", ["u1@example.test", "--password-stdin"], False, 0),
    ("users passwd", ["u1@example.test", "--password-stdin"], False, 0),
    ("users alias", ["u1@example.test", "u1-alias@example.test"], False, 0),
    ("users unalias", ["u1-alias@example.test"], False, 0),
    ("users disable", ["u1@example.test"], False, 0),
    ("users enable", ["u1@example.test"], False, 0),
    ("users list", [], True, 0),
    ("users mechanism", ["example.test", "DIGEST-MD5", "on"], False, 0),
    ("users policy", [], True, 0),
    ("users policy", ["--domain", "nosuch.example", "--min-length", "14"], True, 1),
    ("users remove", ["u1@example.test"], False, 0),
    ("auth bans", [], True, 0),
    ("auth unban", ["192.0.2.99"], False, 1),
    ("auth gssapi", ["--keytab", "/nonexistent.keytab", "--principal", "smtp/gw.test"], False, 1),
    ("tls install", ["--cert", "/nonexistent.pem", "--key", "/nonexistent.key"], False, 1),
]
ELSEWHERE = {"serve": "tests/test_lifecycle.py", "tui": "tests/test_tui.py", "policy test": "tests/test_decision.py"}


def leaf_commands() -> set[str]:
    out = set()

    def walk(cmd, path):
        sub = getattr(cmd, "commands", None)
        if sub:
            for name, child in sub.items():
                walk(child, path + [name])
        else:
            out.add(" ".join(path))
    walk(typer.main.get_command(app), [])
    return out


def test_table_covers_every_command():
    assert leaf_commands() == {c for c, *_ in TABLE} | set(ELSEWHERE)


@pytest.fixture(scope="module")
def engine_home(tmp_path_factory):
    from tests.conftest import new_gateway
    gw = new_gateway(tmp_path_factory.mktemp("cli") / "home")
    gw.configure(**{"queue.retry_schedule": "1h"})      # stays deferred: never "active" under our feet
    gw.policy().add_domain("example.test", "127.0.0.1:9")
    gw.start()
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test"], make_message(message_id="<cli-1@client.test>"))
    gw.wait_until(lambda: gw.query("SELECT state FROM messages")[0]["state"] == "deferred", what="deferred")
    policy = gw.home.parent / "policy.toml"
    policy.write_text(gw.cli("config", "export").stdout)
    yield gw, gw.query("SELECT id FROM messages")[0]["id"], policy
    gw.stop()


def expand(args, queue_id, policy):
    recipients = policy.parent / "recipients.txt"
    recipients.write_text("# staff\nalice@example.test\ncarol@example.test  # new\n\n")
    return [a.format(id=queue_id, msgid="<cli-1@client.test>", policy=policy, recipients=recipients)
            for a in args]


@pytest.mark.parametrize("command,args,takes_json,code", TABLE, ids=[t[0] for t in TABLE])
def test_every_command_as_subprocess(engine_home, command, args, takes_json, code):
    gw, queue_id, policy = engine_home
    argv = command.split() + expand(args, queue_id, policy) + (["--json"] if takes_json else [])
    out = subprocess.run([sys.executable, "-m", "mailbox_guard", "--home", str(gw.home), *argv],
                         capture_output=True, text=True, timeout=60, cwd=ROOT,
                         input="Another-Str0ng-Passphrase\n" if "--password-stdin" in argv else None)
    if command == "queue retry":
        assert out.returncode in (0, 1)
    else:
        assert out.returncode == code, (argv, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    if out.returncode == 1:
        assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("mailbox-guard: ")
    elif takes_json:
        json.loads(out.stdout)        # parses back


@pytest.mark.parametrize("command,args,takes_json,code", TABLE, ids=[t[0] for t in TABLE])
def test_every_command_through_the_runner(engine_home, command, args, takes_json, code):
    gw, queue_id, policy = engine_home
    argv = ["--home", str(gw.home), *command.split(), *expand(args, queue_id, policy)]
    result = CliRunner().invoke(app, argv + (["--json"] if takes_json else []),
                                input="Another-Str0ng-Passphrase\n" if "--password-stdin" in argv else None)
    if command == "queue retry":
        assert result.exit_code in (0, 1)
        return
    assert result.exit_code == code, result.output
    if code == 1:
        assert result.stderr.startswith("mailbox-guard: ") and len(result.stderr.strip().splitlines()) == 1
    if not takes_json or code != 0:
        return
    data = json.loads(result.stdout)
    if command == "queue show":
        assert data["message_id"] == "<cli-1@client.test>" and data["trace"]
    if command == "status":
        assert data["running"] is True and data["pid"] == gw.proc.pid


def test_usage_errors_exit_2(engine_home):
    gw, _, _ = engine_home
    for argv in (["queue", "list", "--state", "nonsense"], ["queue"], ["queue", "show"],
                 ["config", "import"], ["connections", "kill"], ["serve", "--metrics", "nope"]):
        out = subprocess.run([sys.executable, "-m", "mailbox_guard", "--home", str(gw.home), *argv],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 2, (argv, out.stderr)
        assert "Traceback" not in out.stderr


def test_status_when_the_engine_is_down_still_reads_the_store(tmp_path):
    home = tmp_path / "h"
    from mailbox_guard.store.db import ensure_home
    ensure_home(home)            # status on a home that does not exist fails (tests/test_cli_ops.py)
    out = subprocess.run([sys.executable, "-m", "mailbox_guard", "--home", str(home), "status", "--json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1
    data = json.loads(out.stdout)
    assert data["running"] is False and data["queue"]["deferred"] == 0


def test_queue_actions_work_on_the_store_when_the_engine_is_stopped(tmp_path):
    from tests.conftest import new_gateway
    gw = new_gateway(tmp_path / "home")
    gw.policy().add_domain("example.test", "127.0.0.1:9")
    gw.start()
    with gw.smtp() as s:
        s.sendmail("alice@sender.test", ["bob@example.test"], make_message())
    gw.wait_until(lambda: gw.query("SELECT state FROM messages")[0]["state"] == "deferred", what="deferred")
    gw.stop()
    queue_id = gw.query("SELECT id FROM messages")[0]["id"]
    gw.cli("queue", "hold", queue_id)
    assert gw.query("SELECT state FROM messages")[0]["state"] == "hold"
    gw.cli("queue", "delete", queue_id, "--yes")
    assert gw.query("SELECT count(*) AS n FROM messages")[0]["n"] == 0


def test_config_round_trip_on_a_fresh_home(tmp_path):
    def cli(home, *args, input=None):
        out = subprocess.run([sys.executable, "-m", "mailbox_guard", "--home", str(home), *args],
                             capture_output=True, text=True, timeout=60, cwd=ROOT, input=input)
        assert out.returncode == 0, out.stderr
        return out.stdout
    a, b = tmp_path / "a", tmp_path / "b"
    cli(a, "domains", "add", "example.test", "--next-hop", "10.0.0.5:25")
    cli(a, "domains", "add", "mx.test")
    cli(a, "recipients", "add", "bob@example.test")
    cli(a, "networks", "add", "10.0.0.0/8", "--comment", "office")
    cli(a, "listeners", "add", "mx", "inbound", "0.0.0.0:25")
    cli(a, "config", "set", "queue.retry_schedule", "30s,5m")
    cli(a, "config", "set", "smtp.max_message_size", "20480000")
    exported = cli(a, "config", "export")
    dry = cli(b, "config", "import", "-", "--dry-run", input=exported)
    assert "+ domain example.test next_hop=10.0.0.5:25" in dry and "+ recipient bob@example.test" in dry
    assert cli(b, "config", "export") != exported           # dry run changed nothing
    cli(b, "config", "import", "-", input=exported)
    assert cli(b, "config", "export") == exported
    assert cli(b, "config", "import", "-", input=exported).strip() == "no changes"
    # A bad file changes nothing and says why in one line.
    out = subprocess.run([sys.executable, "-m", "mailbox_guard", "--home", str(b), "config", "import", "-"],
                         input='[[domains]]\nname = "not a domain"\n', capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert cli(b, "config", "export") == exported


def test_shell_completion_is_offered():
    result = CliRunner().invoke(app, ["--help"])
    assert "--install-completion" in result.output
